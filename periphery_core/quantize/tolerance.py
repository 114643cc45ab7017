"""The accuracy-aware search: quantize, keeping the most sensitive nodes in float as needed.

Exclusions double (0, 1, 2, 4, ...) until the metric is within tolerance, so the search costs
about log2 of the nodes it may exclude in quantize-and-evaluate runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import onnx

from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.quantize.config import QuantConfig, QuantizeError, with_exclude
from periphery_core.quantize.engine import FeedSource
from periphery_core.quantize.methods import ModelInput, QuantResult, quantize


def quantize_within_tolerance(
    model: ModelInput,
    config: QuantConfig,
    calib: FeedSource | None,
    eval_fn: Callable[[onnx.ModelProto], float],
    baseline: float,
    tolerance: float,
    sensitivity: Sequence[str],
    *,
    max_excluded: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> QuantResult:
    """Quantize, then keep the most sensitive nodes in float until the metric holds.

    Tries 0, 1, 2, 4, ... of the first nodes of `sensitivity` excluded (and finally exactly
    `max_excluded`), so at most about log2(max_excluded) + 2 quantize-and-evaluate runs.

    Args:
        model: the float model.
        config: the method; its own `exclude` stays excluded.
        calib: calibration data when the method needs them.
        eval_fn: scores a model, higher is better (accuracy, Spearman, -loss).
        baseline: the float model's score.
        tolerance: how far below `baseline` the score may drop.
        sensitivity: node names, most sensitive first.
        max_excluded: the most nodes to exclude (default: all of `sensitivity`).

    Raises:
        QuantizeError: even `max_excluded` exclusions leave the score out of tolerance, or
            a bad argument.
        Cancelled: `cancel` was set.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise QuantizeError(f"tolerance must be a number of at least 0, got {tolerance!r}")
    if not (isinstance(baseline, int | float) and math.isfinite(baseline)):
        raise QuantizeError(f"baseline must be a finite number, got {baseline!r}")
    order = list(dict.fromkeys(n for n in sensitivity if n not in config.exclude))
    limit = len(order) if max_excluded is None else min(max_excluded, len(order))
    if limit < 0:
        raise QuantizeError(f"max_excluded must be at least 0, got {max_excluded!r}")
    counts = [0]
    while counts[-1] < limit:
        counts.append(min(limit, max(1, counts[-1] * 2)))
    notes: list[str] = []
    metric = math.nan
    for step, count in enumerate(counts):
        check(cancel)
        report(progress, "tolerance", step, len(counts), f"{count} nodes excluded")
        tried = with_exclude(config, tuple(order[:count]))
        result = quantize(model, tried, calib, progress=progress, cancel=cancel)
        check(cancel)
        metric = float(eval_fn(result.model))
        notes.append(f"{count} excluded: metric {metric:.6g}")
        if baseline - metric <= tolerance:
            report(progress, "tolerance", len(counts), len(counts), f"{count} nodes excluded")
            return QuantResult(
                model=result.model, method=result.method, config=tried,
                excluded=tuple(tried.exclude),
                notes=(*result.notes, *notes,
                       f"metric {metric:.6g} vs baseline {baseline:.6g} "
                       f"(tolerance {tolerance:.6g})"),
                calibrated_on=result.calibrated_on,
            )
    raise QuantizeError(
        f"even with {limit} most sensitive nodes excluded the metric is {metric:.4g}, "
        f"{baseline - metric:.4g} below the baseline {baseline:.4g} (tolerance {tolerance:.4g}): "
        "allow more exclusions, a larger tolerance or another method"
    )
