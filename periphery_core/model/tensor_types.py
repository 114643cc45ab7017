"""Typing every tensor of a model: three sources, tried in order.

ONNX shape inference first; where it gives up (com.microsoft contrib ops, data-dependent
shapes), ONNX Runtime's symbolic shape inference; and for what is still unknown, one recorded
run of the model in ONNX Runtime with the untyped tensors exposed as outputs. The analysis
records which source typed each tensor.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx

from periphery_core.errors import AnalysisError
from periphery_core.model.graph import subgraphs
from periphery_core.model.shapes import InputSpec, elem_dtype, is_fixed

log = logging.getLogger(__name__)


class ValueType(NamedTuple):
    """A value's type as far as it is known: a tensor, or a sequence of tensors."""

    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown; always None for sequences
    kind: str = "tensor"
    nbytes: int | None = None  # sequences: total bytes when a run recorded them

    @property
    def known(self) -> bool:
        return self.kind == "sequence" or is_concrete(self.shape)


TypeMap = dict[str, ValueType]


def _type_of(tp: onnx.TypeProto) -> ValueType | None:
    kind = "tensor"
    if tp.HasField("sequence_type") and tp.sequence_type.elem_type.HasField("tensor_type"):
        tp, kind = tp.sequence_type.elem_type, "sequence"
    if not tp.HasField("tensor_type") or tp.tensor_type.elem_type == 0:
        return None
    tt = tp.tensor_type
    shape: tuple[int | None, ...] | None = None
    if tt.HasField("shape") and kind == "tensor":
        shape = tuple(d.dim_value if is_fixed(d) else None for d in tt.shape.dim)
    try:
        return ValueType(elem_dtype(tt.elem_type), shape, kind)
    except (KeyError, TypeError, ValueError):
        return None


def _collect_types(graph: onnx.GraphProto, into: TypeMap, overwrite: bool = True) -> None:
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = _type_of(vi.type)
        if t is not None and (overwrite or vi.name not in into or not into[vi.name].known):
            into[vi.name] = t
    for node in graph.node:
        for sub in subgraphs(node):
            _collect_types(sub, into, overwrite)


def is_concrete(shape: tuple[int | None, ...] | None) -> bool:
    """Whether the rank and every dimension are known."""
    return shape is not None and all(d is not None for d in shape)


def fix_inputs(model: onnx.ModelProto, specs: Sequence[InputSpec]) -> onnx.ModelProto:
    """A copy with concrete input shapes (a weight-free skeleton unless `model` is one)."""
    fixed = copy.deepcopy(model)
    by_name = {s.name: s for s in specs}
    for vi in fixed.graph.input:
        spec = by_name.get(vi.name)
        if spec is None or spec.kind != "tensor":
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in spec.shape:
            shape.dim.add().dim_value = d
    return fixed


def onnx_types(model: onnx.ModelProto) -> TypeMap:
    """Types from ONNX shape inference, with data propagation; best effort, never raises."""
    types: TypeMap = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # inference is best effort; later sources fill the gaps
        log.debug("onnx shape inference failed: %s", exc)
        inferred = model
    _collect_types(inferred.graph, types)
    return types


def symbolic_types(model: onnx.ModelProto) -> TypeMap:
    """Types from ONNX Runtime's symbolic shape inference; empty where it fails."""
    types: TypeMap = {}
    try:
        inferred = _symbolic_infer(model)
    except Exception as exc:
        log.debug("symbolic shape inference failed: %s", exc)
        return types
    if inferred is not None:
        _collect_types(inferred.graph, types)
    return types


def _symbolic_infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's `SymbolicShapeInference.infer_shapes(auto_merge, guess_output_rank)`,
    without its debugging dump.

    Where inference is incomplete, ORT's `infer_shapes` saves the partial model as
    `sym_shape_infer_temp.onnx` (weights in uuid-named files beside it) in the current
    directory, the user's, before it raises; no option turns that off or moves it, and changing
    directory would move every thread of the process. So this takes the same steps itself and
    raises without saving. Should those steps (private to ORT) change, it falls back to
    `infer_shapes`; tests/test_no_stray_files.py then fails.
    """
    from onnxruntime.tools import symbolic_shape_infer as ssi

    cls = ssi.SymbolicShapeInference
    if not all(hasattr(cls, a) for a in ("_preprocess", "_infer_impl", "_update_output_from_vi")):
        return cls.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    opset = ssi.get_opset(model)
    if not opset or opset < 7:
        return None
    inference = cls(2**31 - 1, True, True, 0)
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise AnalysisError("incomplete symbolic shape inference")
    out: onnx.ModelProto = inference.out_mp_
    return out


def recorded_types(
    model: onnx.ModelProto,
    names: Sequence[str],
    specs: Sequence[InputSpec],
    feeds: Mapping[str, Any] | None,
) -> TypeMap:
    """Run the model once (on `feeds`, else random data) with `names` exposed as outputs."""
    from periphery_core.runtime.feeds import random_feeds
    from periphery_core.runtime.session import SessionConfig, make_session, run_session

    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory(prefix="periphery-probe-") as tmp:
        sess = make_session(probe, SessionConfig(exact=True), scratch_dir=Path(tmp))
        values = run_session(
            sess, dict(feeds) if feeds is not None else random_feeds(specs), list(names)
        )
    return {n: _recorded(n, v) for n, v in zip(names, values, strict=True)}


def _recorded(name: str, value: Any) -> ValueType:
    if isinstance(value, list):
        items = [np.asarray(v) for v in value]
        dtype = items[0].dtype if items else np.dtype(np.float32)
        return ValueType(dtype, None, "sequence", sum(int(v.nbytes) for v in items))
    if isinstance(value, np.ndarray):
        return ValueType(value.dtype, tuple(value.shape))
    raise AnalysisError(f"tensor '{name}' holds a {type(value).__name__}: Periphery handles "
                        "tensors and sequences of tensors")
