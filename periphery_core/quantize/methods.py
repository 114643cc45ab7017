"""Running a quantization method on a model: the one entry point, `quantize`.

`quantize(model, config, calib)` checks the request, names the nodes and hands the model to
the engine the config's type picks: ONNX Runtime's quantizers (`ort_engine`) or Intel Neural
Compressor (`inc_engine`). Every engine works on files in a temporary folder (quantizers read
paths, and a model over 2 GB must go through external data), and the result comes back as an
in-memory `onnx.ModelProto` with its weights loaded.

Key design choice: nodes are named before quantizing (unnamed or duplicate names get the
analysis' node keys), so `exclude` and the accuracy-aware search (`tolerance`) can address
every node.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from periphery_core.model.graph import node_keys
from periphery_core.model.loading import LoadedModel, load_model
from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.quantize.config import (
    CONFIG_TYPES,
    DynamicInt8,
    IncAwq,
    IncGptq,
    IncRtn,
    IncSmoothQuant,
    QuantConfig,
    QuantizeError,
    StaticInt8,
    WeightOnly4Bit,
)
from periphery_core.quantize.engine import FeedSource, Runner
from periphery_core.quantize.inc_engine import run_inc_smoothquant, run_inc_weight_only
from periphery_core.quantize.ort_engine import run_dynamic, run_static, run_weight_only
from periphery_core.quantize.prepare import lift_weights, survey

ModelInput = LoadedModel | onnx.ModelProto | str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class QuantResult:
    """A quantized model and how it was made.

    Attributes:
        model: the quantized model, weights in memory.
        method: the method's CLI name (dynamic, static, rtn, gptq, hqq, awq, smoothquant).
        config: the config it ran with (its `exclude` includes `excluded`).
        excluded: nodes left in floating point on purpose.
        notes: one-line remarks for humans (pre-processing skipped, opset converted, tries).
        calibrated_on: names of the tensors the calibration batches fed (empty: no calibration).
    """

    model: onnx.ModelProto
    method: str
    config: QuantConfig
    excluded: tuple[str, ...]
    notes: tuple[str, ...] = ()
    calibrated_on: tuple[str, ...] = ()


def quantize(
    model: ModelInput,
    config: QuantConfig,
    calib: FeedSource | None = None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> QuantResult:
    """Quantize a model with the method `config` describes.

    Args:
        model: a loaded model, a model proto or an .onnx path (external data beside it).
        config: one of the configs in `periphery_core.quantize.config`.
        calib: calibration batches; required by static, gptq, awq and smoothquant.
        progress: called per calibration batch and per step.
        cancel: checked between steps and before every calibration batch.

    Raises:
        QuantizeError: bad config, missing calibration data or optional package, or the
            method failed on this model.
        ModelLoadError: `model` is a path that cannot be loaded.
        Cancelled: `cancel` was set.
    """
    if not isinstance(config, CONFIG_TYPES):
        raise QuantizeError(f"not a quantization config: {type(config).__name__}")
    proto = _proto(model)
    if config.calibrated and calib is None:
        raise QuantizeError(f"method {config.method} needs calibration data: "
                            "give a calibration source")
    check(cancel)
    notes = _already_quantized(proto)
    proto, lifted = lift_weights(proto)
    notes += lifted
    work, renamed = _named(proto)
    names = {n.name for n in work.graph.node}
    unknown = [n for n in config.exclude if n not in names]
    if unknown:
        raise QuantizeError(f"cannot exclude node '{unknown[0]}': the model has no node of "
                            "that name")
    if renamed:
        notes.append("unnamed or duplicate nodes were named by position")
    report(progress, "quantize", 0, 1, config.method)
    with tempfile.TemporaryDirectory(prefix="periphery-quant-") as tmp:
        tmp_dir = Path(tmp)
        run = _RUNNERS[type(config)]
        out, more_notes, fed = run(work, config, calib, tmp_dir, progress, cancel)
    report(progress, "quantize", 1, 1, config.method)
    if not config.exclude and sum(survey(out).quantized.values()) <= \
            sum(survey(work).quantized.values()):
        raise NothingToQuantize(
            f"{config.method} quantized nothing in this model: "
            + ("it takes MatMul weights only, and none here fits"
               if config.method in WEIGHT_ONLY else "no weight it handles was found")
            + "; try --method dynamic or static")
    return QuantResult(
        model=out, method=config.method, config=config, excluded=tuple(config.exclude),
        notes=(*notes, *more_notes), calibrated_on=fed,
    )


WEIGHT_ONLY = ("rtn", "gptq", "hqq", "awq")


class NothingToQuantize(QuantizeError):
    """The model has no float MatMul, Gemm or Conv weight that a quantizer would change."""


def _already_quantized(model: onnx.ModelProto) -> list[str]:
    """Refuse a model with nothing (left) in float to quantize; note one partly quantized."""
    found = survey(model)
    left = len(found.float_weights) + len(found.constant_weights)
    if not left and found.quantized:
        raise NothingToQuantize(
            f"the model is already quantized ({found.quantized_summary}) and has no float "
            "MatMul, Gemm or Conv weights left: nothing to do; use it as it is"
        )
    if not left:
        inside = (f"; its {found.branch_weights} weight ops are inside If/Loop/Scan "
                  "branches, which ONNX Runtime's quantizers do not reach"
                  if found.branch_weights else "")
        raise NothingToQuantize(
            "nothing to quantize: the model has no MatMul, Gemm or Conv with a float weight "
            f"at its top level{inside}; use it as it is"
        )
    if not found.quantized:
        return []
    return [f"the model was already partly quantized ({found.quantized_summary}); the {left} "
            "float MatMul/Gemm/Conv weights left were quantized"]


def _proto(model: ModelInput) -> onnx.ModelProto:
    if isinstance(model, LoadedModel):
        return model.proto
    if isinstance(model, onnx.ModelProto):
        return model
    return load_model(model).proto


def _named(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The model with every top-level node uniquely named (a copy only when names change)."""
    keys = node_keys(model.graph)
    if all(n.name == k for n, k in zip(model.graph.node, keys, strict=True)):
        return model, False
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for node, key in zip(work.graph.node, keys, strict=True):
        node.name = key
    return work, True


_RUNNERS: dict[type, Runner] = {
    DynamicInt8: run_dynamic,
    StaticInt8: run_static,
    WeightOnly4Bit: run_weight_only,
    IncRtn: run_inc_weight_only,
    IncGptq: run_inc_weight_only,
    IncAwq: run_inc_weight_only,
    IncSmoothQuant: run_inc_smoothquant,
}
