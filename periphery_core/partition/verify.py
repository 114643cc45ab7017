"""Verification: the chain of shards against the whole model, on the same inputs.

With `exact=True` both sides run with graph optimizations off (fusions cannot cross a shard
boundary) and every output must be bit-identical, NaNs included.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from periphery_core.errors import PlanError
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.session import SessionConfig, make_session, run_session


@dataclass(frozen=True, slots=True)
class OutputComparison:
    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    bit_identical: bool
    shape_match: bool
    within_tolerance: bool  # |got - ref| <= atol + rtol * |ref| everywhere (NaN matches NaN)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    exact: bool
    outputs: tuple[OutputComparison, ...]
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        if self.exact:
            return all(o.bit_identical for o in self.outputs)
        return all(o.bit_identical or o.within_tolerance for o in self.outputs)


def bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return bool(np.array_equal(a, b))
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# Results of optimized shards differ from the whole model's in the last bits (fusions reorder
# float sums): within this tolerance they match.
RTOL = 1e-3
ATOL = 1e-4


def compare(
    name: str, ref: Any, got: Any, rtol: float = RTOL, atol: float = ATOL
) -> OutputComparison:
    if isinstance(ref, list) or isinstance(got, list):
        return _compare_sequences(name, ref, got, rtol, atol)
    ref, got = np.asarray(ref), np.asarray(got)
    same_shape = ref.shape == got.shape
    max_abs = max_rel = 0.0
    close = same_shape
    if same_shape and ref.size and ref.dtype != object and got.dtype != object:
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(r - g)
            both_nan = np.isnan(r) & np.isnan(g)
            same_inf = np.isinf(r) & (r == g)
            diff = np.where(both_nan | same_inf, 0.0, diff)
            diff = np.where(np.isnan(diff), np.inf, diff)
            rel = diff / np.maximum(np.abs(r), 1e-12)
            close = bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(r))))
        max_abs = float(diff.max())
        max_rel = float(rel.max())
    elif not same_shape:
        max_abs = max_rel = float("inf")
    return OutputComparison(
        name=name, dtype=str(ref.dtype), shape=tuple(ref.shape), max_abs=max_abs,
        max_rel=max_rel, bit_identical=bit_identical(ref, got), shape_match=same_shape,
        within_tolerance=close,
    )


def _compare_sequences(name: str, ref: Any, got: Any, rtol: float, atol: float
                       ) -> OutputComparison:
    if not (isinstance(ref, list) and isinstance(got, list)) or len(ref) != len(got):
        inf = float("inf")
        return OutputComparison(name, "sequence", (), inf, inf, False, False, False)
    parts = [
        compare(f"{name}[{i}]", r, g, rtol, atol)
        for i, (r, g) in enumerate(zip(ref, got, strict=True))
    ]
    return OutputComparison(
        name=name, dtype=f"sequence({parts[0].dtype if parts else ''})", shape=(len(parts),),
        max_abs=max((p.max_abs for p in parts), default=0.0),
        max_rel=max((p.max_rel for p in parts), default=0.0),
        bit_identical=all(p.bit_identical for p in parts),
        shape_match=all(p.shape_match for p in parts),
        within_tolerance=all(p.within_tolerance for p in parts),
    )


def verify_chain(
    model: onnx.ModelProto | str | Path,
    shards: Sequence[onnx.ModelProto | str | Path],
    feeds: Mapping[str, np.ndarray],
    *,
    exact: bool = True,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> VerifyReport:
    """Run the whole model and the chain on `feeds` and compare every model output."""
    config = SessionConfig(exact=exact)
    with tempfile.TemporaryDirectory(prefix="periphery-verify-") as tmp:
        whole = make_session(model, config, scratch_dir=Path(tmp))
    names = [o.name for o in whole.get_outputs()]
    reference = dict(zip(names, run_session(whole, dict(feeds), names), strict=True))
    del whole
    values: Mapping[str, Any] = feeds
    for shard in shards:  # one session at a time: a big model's shards are never all loaded
        values = StageRunner(shard, config).run(values)
    got = dict(values)
    absent = [n for n in names if n not in got]
    if absent:
        raise PlanError(f"the shards do not produce model output '{absent[0]}'")
    comparisons = tuple(compare(n, reference[n], got[n], rtol, atol) for n in names)
    return VerifyReport(exact=exact, outputs=comparisons, rtol=rtol, atol=atol)
