"""Running a quantization method on a model: ONNX Runtime's quantizers and Intel Neural Compressor.

`quantize(model, config, calib)` is the one entry point; the config's type picks the method.
Every method works on files in a temporary folder (ONNX Runtime's and INC's quantizers read
paths, and a model over 2 GB must go through external data), and the result comes back as an
in-memory `onnx.ModelProto` with its weights loaded.

Design choices, measured on the corpus:
- Nodes are named before quantizing (unnamed or duplicate names get the analysis' node keys),
  so `exclude` and the accuracy-aware search can address every node.
- Pre-processing (static QDQ and SmoothQuant) is `quant_pre_process` with shape inference
  only. ORT's graph optimisation step fuses Add into Conv on mnist-8, after which the static
  quantizer crashes (a bias-scale ValueError), and fusions rename nodes so exclusions stop
  matching; shape inference alone gives the same INT8 accuracy (98.91% on mnist-8). Dynamic
  INT8 skips it: MiniLM's outputs were identical with and without, and it costs seconds.
- Static QDQ needs opset 13 for per-channel weights: older models are converted first.
- Calibration data arrive through `FeedSource.batches()`; the reader adapter reports progress
  per batch and checks the cancel token before each, so a cancelled calibration stops at the
  next batch with `Cancelled`.
- Intel Neural Compressor (`onnx_neural_compressor`, the `inc` extra) is imported only when an
  `Inc*` config runs; its graph optimisation is switched off for the same naming reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from periphery_core.errors import PeripheryError
from periphery_core.model.analysis import node_keys
from periphery_core.model.loading import (
    EXTERNAL_DATA_THRESHOLD,
    LoadedModel,
    load_model,
    save_model,
)
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
    with_exclude,
)

ModelInput = LoadedModel | onnx.ModelProto | str | os.PathLike[str]

QDQ_MIN_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights) arrived in opset 13
INC_INSTALL = "pip install 'periphery[inc]'"
TORCH_INSTALL = "pip install 'periphery[quantize-gptq]'"


class FeedSource(Protocol):
    """What quantization needs from a calibration data source: batches of model feeds."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]: ...


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


# --------------------------------------------------------------------------- calibration


class CalibrationReader:
    """Adapts a `FeedSource` to ORT's and INC's calibration reader protocol.

    It hands out at most `samples` samples in batches of `batch_size`, keeps only the feeds the
    model reads, reports progress per batch and checks `cancel` before each. `rewind()` starts
    a new pass (INC makes several); a deep copy (ORT's GPTQ takes one) is a fresh reader over
    the same source, since progress callbacks and cancel tokens must not be copied.
    """

    def __init__(
        self,
        source: FeedSource,
        input_names: Sequence[str],
        *,
        samples: int,
        batch_size: int,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        task: str = "calibrate",
    ) -> None:
        self.source = source
        self.input_names = tuple(input_names)
        self.samples = samples
        self.batch_size = batch_size
        self.progress = progress
        self.cancel = cancel
        self.task = task
        self.seen_names: dict[str, None] = {}
        self.batches_read = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._given = 0

    @property
    def total(self) -> int:
        try:
            available = len(self.source)
        except TypeError:
            available = self.samples
        return max(1, min(self.samples, available))

    def get_next(self) -> dict[str, np.ndarray] | None:
        check(self.cancel)
        if self._given >= self.samples:
            return None
        if self._it is None:
            self._it = iter(self.source.batches(self.batch_size))
        batch = next(self._it, None)
        if batch is None:
            return None
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise QuantizeError(
                f"the calibration data have no input '{missing[0]}' (they have: "
                f"{', '.join(sorted(batch)) or 'nothing'})"
            )
        feeds = {n: np.asarray(batch[n]) for n in self.input_names}
        self.seen_names.update(dict.fromkeys(feeds))
        first = next(iter(feeds.values()), None)
        self._given += int(first.shape[0]) if first is not None and first.ndim else 1
        self.batches_read += 1
        report(self.progress, self.task, min(self._given, self.total), self.total,
               f"batch {self.batches_read}")
        return feeds

    def rewind(self) -> None:
        self._it = None
        self._given = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds

    def __deepcopy__(self, memo: dict[int, Any]) -> CalibrationReader:
        return CalibrationReader(
            self.source, self.input_names, samples=self.samples, batch_size=self.batch_size,
            progress=self.progress, cancel=self.cancel, task=self.task,
        )


def _ort_reader(reader: CalibrationReader) -> Any:
    """`reader` as a subclass of ORT's abstract `CalibrationDataReader` (its type check)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

        def rewind(self) -> None:
            reader.rewind()

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            return _ort_reader(reader.__deepcopy__(memo))

    return _Reader()


# --------------------------------------------------------------------------- entry point


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
    work, renamed = _named(proto)
    names = {n.name for n in work.graph.node}
    unknown = [n for n in config.exclude if n not in names]
    if unknown:
        raise QuantizeError(f"cannot exclude node '{unknown[0]}': the model has no node of "
                            "that name")
    notes = ["unnamed or duplicate nodes were named by position"] if renamed else []
    report(progress, "quantize", 0, 1, config.method)
    with tempfile.TemporaryDirectory(prefix="periphery-quant-") as tmp:
        tmp_dir = Path(tmp)
        run = _RUNNERS[type(config)]
        out, more_notes, fed = run(work, config, calib, tmp_dir, progress, cancel)
    report(progress, "quantize", 1, 1, config.method)
    return QuantResult(
        model=out, method=config.method, config=config, excluded=tuple(config.exclude),
        notes=(*notes, *more_notes), calibrated_on=fed,
    )


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


def _is_large(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= EXTERNAL_DATA_THRESHOLD


def _write(model: onnx.ModelProto, path: Path) -> Path:
    save_model(model, path)
    return path


def _read(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))  # loads external data from beside the file
    except Exception as exc:
        raise QuantizeError(f"the quantized model could not be read back: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "input array dimensions" in line:  # INC stacks calibration batches along axis 0
        return ("its calibration batches differ in shape; give them one shape (for text "
                "sources add padding=max_length to --calib)")
    return line[:240]


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def _quiet_root_logging() -> Iterator[None]:
    """ORT's MatMulNBits module calls `logging.basicConfig(level=INFO)` on import: undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def _prepared(
    model: onnx.ModelProto, tmp: Path, notes: list[str], min_opset: int = 0,
    infer_shapes: bool = True,
) -> Path:
    """Write `model` for a quantizer: opset raised to `min_opset`, shapes inferred."""
    if min_opset and 0 < _opset(model) < min_opset:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, min_opset)
        except Exception as exc:
            raise QuantizeError(
                f"the model's opset {_opset(model)} is too old for QDQ quantization and could "
                f"not be converted to opset {min_opset}: {_first(exc)}"
            ) from None
        notes.append(f"converted to opset {min_opset}")
    if min_opset and model.ir_version < 7:
        model = _modern_ir(model)
    raw = _write(model, tmp / "model.onnx")
    if not infer_shapes:
        return raw
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    large = _is_large(model)
    # ONNX shape inference only. ORT's symbolic inference gives up on MiniLM ("Incomplete
    # symbolic shape inference") and then dumps the model into the working directory; with
    # auto_merge it rewrote a MiniLM shard's mask input from [b, 1, s, s] to [b, 12, s, s].
    # The quantized graphs were the same either way.
    try:
        quant_pre_process(
            str(raw), str(pre), skip_optimization=True, skip_symbolic_shape=True,
            save_as_external_data=large, all_tensors_to_one_file=True,
            external_data_location="pre.onnx.data" if large else None,
        )
    except Exception as exc:
        notes.append(f"pre-processing skipped ({_first(exc)[:80]})")
        return raw
    return pre


def _modern_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR 7 (what opset 13 needs), initializers no longer listed among the graph inputs.

    IR 3 models list every weight as an input too; INC's SmoothQuant rescales weights and then
    trips over the stale input declarations ("Can't merge shape info" on mnist-8).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name for i in out.graph.initializer}
    keep = [i for i in out.graph.input if i.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.ir_version = 7
    return out


# --------------------------------------------------------------------------- ORT methods

_RunResult = tuple[onnx.ModelProto, list[str], tuple[str, ...]]


def _run_dynamic(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> _RunResult:
    if not isinstance(config, DynamicInt8):
        raise TypeError(config)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notes: list[str] = []
    # Shape inference changes nothing here (identical MiniLM outputs) and costs seconds.
    src = _prepared(model, tmp, notes, min_opset=11, infer_shapes=False)
    check(cancel)
    out = tmp / "quant.onnx"
    try:
        quantize_dynamic(
            str(src), str(out),
            op_types_to_quantize=list(config.op_types) if config.op_types else None,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=list(config.exclude),
            use_external_data_format=_is_large(model),
        )
    except PeripheryError:
        raise
    except Exception as exc:
        raise QuantizeError(f"dynamic INT8 quantization failed: {_first(exc)}") from None
    return _read(out), notes, ()


_ORT_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _run_static(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> _RunResult:
    if not isinstance(config, StaticInt8) or calib is None:
        raise TypeError(config)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    notes: list[str] = []
    src = _prepared(model, tmp, notes, min_opset=QDQ_MIN_OPSET)
    check(cancel)
    reader = CalibrationReader(calib, _graph_inputs(model), samples=config.samples,
                               batch_size=config.batch_size, progress=progress, cancel=cancel)
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra: dict[str, Any] = {}
    if config.calibration == "percentile":
        extra["CalibPercentile"] = float(config.percentile)
    out = tmp / "quant.onnx"
    try:
        quantize_static(
            str(src), str(out), _ort_reader(reader),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type],
            nodes_to_exclude=list(config.exclude),
            calibrate_method=getattr(CalibrationMethod, _ORT_CALIBRATION[config.calibration]),
            use_external_data_format=_is_large(model),
            extra_options=extra,
        )
    except PeripheryError:
        raise
    except Exception as exc:
        raise QuantizeError(f"static INT8 quantization failed: {_first(exc)}") from None
    if reader.batches_read == 0:
        raise QuantizeError("the calibration data are empty: static quantization needs samples")
    return _read(out), notes, tuple(reader.seen_names)


def _run_weight_only(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> _RunResult:
    if not isinstance(config, WeightOnly4Bit):
        raise TypeError(config)
    if config.method in ("gptq", "hqq") and importlib.util.find_spec("torch") is None:
        raise QuantizeError(f"method {config.method} needs torch: {TORCH_INSTALL}")
    if config.method == "gptq" and calib is None:
        raise QuantizeError("method gptq needs calibration data: give a calibration source")
    with _quiet_root_logging():
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb
    notes: list[str] = []
    src = _write(model, tmp / "model.onnx")
    check(cancel)
    algo: Any
    reader: CalibrationReader | None = None
    if config.method == "rtn":
        algo = mnb.DefaultWeightOnlyQuantConfig(
            block_size=config.block_size, is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level, op_types_to_quantize=("MatMul",), bits=4,
        )
    elif config.method == "hqq":
        algo = mnb.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    else:
        if calib is None:
            raise TypeError(config)
        reader = CalibrationReader(calib, _graph_inputs(model), samples=config.samples,
                                   batch_size=1, progress=progress, cancel=cancel)
        algo = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_ort_reader(reader))
    try:
        quantizer = mnb.MatMulNBitsQuantizer(
            str(src), block_size=config.block_size, is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level, nodes_to_exclude=list(config.exclude),
            algo_config=algo,
        )
        quantizer.process()
    except PeripheryError:
        raise
    except Exception as exc:
        raise QuantizeError(f"4-bit {config.method} quantization failed: {_first(exc)}") from None
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        notes.append("no MatMul with constant weights was quantized")
    fed = tuple(reader.seen_names) if reader is not None else ()
    return out, notes, fed


# --------------------------------------------------------------------------- INC methods


def _inc(method: str) -> Any:
    """Import Intel Neural Compressor's ONNX package, or say how to install it."""
    try:
        with _quiet_root_logging():
            return importlib.import_module("onnx_neural_compressor")
    except ImportError:
        raise QuantizeError(
            f"method {method} needs Intel Neural Compressor: {INC_INSTALL}"
        ) from None


def _matmuls_on_inputs(model: onnx.ModelProto) -> list[str]:
    inputs = set(_graph_inputs(model))
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and any(x in inputs for x in n.input)]


def _run_inc_weight_only(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> _RunResult:
    if not isinstance(config, IncRtn | IncGptq | IncAwq):
        raise TypeError(config)
    _inc(config.method)
    import onnxruntime as ort
    from onnx_neural_compressor.quantization import matmul_nbits_quantizer as inc_mnb

    notes: list[str] = []
    src = _write(model, tmp / "model.onnx")
    check(cancel)
    reader: CalibrationReader | None = None
    algo: Any
    if isinstance(config, IncRtn):
        algo = inc_mnb.RTNWeightOnlyQuantConfig()
    else:
        if calib is None:
            raise TypeError(config)
        reader = CalibrationReader(calib, _graph_inputs(model), samples=config.samples,
                                   batch_size=config.batch_size, progress=progress,
                                   cancel=cancel)
        if isinstance(config, IncGptq):
            algo = inc_mnb.GPTQWeightOnlyQuantConfig(
                calibration_data_reader=reader, percdamp=config.percdamp,
                actorder=config.act_order,
            )
        else:
            algo = inc_mnb.AWQWeightOnlyQuantConfig(calibration_data_reader=reader)
    quantizer = inc_mnb.MatMulNBitsQuantizer(
        str(src), block_size=config.group_size, is_symmetric=config.scheme == "sym",
        nodes_to_exclude=list(config.exclude), algo_config=algo, n_bits=config.bits,
        optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    )
    try:
        quantizer.process()
    except PeripheryError:
        raise
    except KeyError as exc:
        on_inputs = _matmuls_on_inputs(model)
        if isinstance(config, IncAwq) and on_inputs:
            raise QuantizeError(
                f"AWQ (Intel Neural Compressor) cannot handle MatMul '{on_inputs[0]}', which "
                "reads a model input directly: exclude it or use rtn/gptq"
            ) from None
        raise QuantizeError(f"{config.method} (Intel Neural Compressor) failed: "
                            f"missing key {exc}") from None
    except Exception as exc:
        raise QuantizeError(f"{config.method} (Intel Neural Compressor) failed: "
                            f"{_first(exc)}") from None
    out = quantizer.model
    if not isinstance(out, onnx.ModelProto):
        out = out.model
    fed = tuple(reader.seen_names) if reader is not None else ()
    return out, notes, fed


def _run_inc_smoothquant(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> _RunResult:
    if not isinstance(config, IncSmoothQuant) or calib is None:
        raise TypeError(config)
    _inc(config.method)
    import onnxruntime as ort
    from onnx_neural_compressor.quantization import CalibrationMethod, QuantFormat
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization import quantize as inc_quantize

    notes: list[str] = []
    src = _prepared(model, tmp, notes, min_opset=QDQ_MIN_OPSET)
    check(cancel)
    reader = CalibrationReader(calib, _graph_inputs(model), samples=config.samples,
                               batch_size=config.batch_size, progress=progress, cancel=cancel)
    batches = math.ceil(config.samples / config.batch_size)
    qconfig = inc_config.SmoothQuantConfig(
        alpha=config.alpha,
        calib_iter=batches,
        calibration_data_reader=reader,
        calibrate_method=getattr(CalibrationMethod, _ORT_CALIBRATION[config.calibration]),
        quant_format=QuantFormat.QDQ,
        per_channel=config.per_channel,
        nodes_to_exclude=list(config.exclude),
        calibration_sampling_size=batches,
        # Without this flag INC's quantize() runs plain static INT8 and skips smoothing.
        extra_options={"SmoothQuant": True, "SmoothQuantAlpha": config.alpha},
        execution_provider="CPUExecutionProvider",
    )
    out = tmp / "quant.onnx"
    try:
        inc_quantize(str(src), str(out), qconfig,
                     optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    except PeripheryError:
        raise
    except Exception as exc:
        raise QuantizeError(f"smoothquant (Intel Neural Compressor) failed: "
                            f"{_first(exc)}") from None
    return _read(out), notes, tuple(reader.seen_names)


_Runner = Callable[
    [onnx.ModelProto, QuantConfig, FeedSource | None, Path, ProgressFn | None,
     CancelToken | None],
    _RunResult,
]
_RUNNERS: dict[type, _Runner] = {
    DynamicInt8: _run_dynamic,
    StaticInt8: _run_static,
    WeightOnly4Bit: _run_weight_only,
    IncRtn: _run_inc_weight_only,
    IncGptq: _run_inc_weight_only,
    IncAwq: _run_inc_weight_only,
    IncSmoothQuant: _run_inc_smoothquant,
}


# --------------------------------------------------------------------------- accuracy-aware


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


# --------------------------------------------------------------------------- sizes


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        length = next((e.value for e in t.external_data if e.key == "length"), "")
        if length:
            return int(length)
    return int(onnx.numpy_helper.to_array(t).nbytes)


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the model's initializers by element type (`float`, `int8`, `uint8`, ...)."""
    totals: dict[str, int] = {}
    for init in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type).lower()
        totals[name] = totals.get(name, 0) + _tensor_bytes(init)
    return totals


def matmul_weight_ratio(fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    """Storage of the 4-bit MatMul weights over the float bytes of the weights they replace.

    The numerator counts every MatMulNBits node's packed weights, scales and zero points; the
    denominator the float weights of the original MatMuls whose weights no MatMul reads any
    more. Packed 4-bit with fp32 scales per block of 32 is about 0.16.

    Raises:
        QuantizeError: the quantized model holds no MatMulNBits node.
    """
    q_inits = {i.name: i for i in quantized.graph.initializer}
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    if not nbits:
        raise QuantizeError("the quantized model holds no MatMulNBits node")
    stored = sum(
        _tensor_bytes(q_inits[name])
        for n in nbits for name in n.input[1:4] if name in q_inits
    )
    still_float = {n.input[1] for n in quantized.graph.node
                   if n.op_type == "MatMul" and len(n.input) > 1}
    f_inits = {i.name: i for i in fp32.graph.initializer}
    replaced = {n.input[1] for n in fp32.graph.node
                if n.op_type == "MatMul" and n.input[1] in f_inits
                and n.input[1] not in still_float}
    original = sum(_tensor_bytes(f_inits[name]) for name in replaced)
    if original == 0:
        raise QuantizeError("no float MatMul weights were replaced")
    return stored / original
