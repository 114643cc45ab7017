"""The ONNX Runtime engine: dynamic INT8, static QDQ INT8 and 4-bit weight-only (MatMulNBits).

Dynamic INT8 skips shape inference: MiniLM's outputs were identical with and without, and it
costs seconds. GPTQ and HQQ need torch (the `quantize-gptq` extra), checked before anything
runs so the error names the install command.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from periphery_core.errors import PeripheryError
from periphery_core.progress import CancelToken, ProgressFn, check
from periphery_core.quantize.config import (
    DynamicInt8,
    QuantConfig,
    QuantizeError,
    StaticInt8,
    WeightOnly4Bit,
    install_hint,
)
from periphery_core.quantize.engine import (
    ORT_CALIBRATION,
    QDQ_MIN_OPSET,
    CalibrationReader,
    FeedSource,
    RunResult,
    first_line,
    graph_inputs,
    is_large,
    prepared_model,
    quiet_root_logging,
    read_model,
    write_model,
)

TORCH_INSTALL = install_hint("quantize-gptq")


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


def run_dynamic(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> RunResult:
    """Dynamic INT8 (`DynamicInt8`): weights quantized ahead, activations at run time."""
    if not isinstance(config, DynamicInt8):
        raise TypeError(config)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notes: list[str] = []
    # Shape inference changes nothing here (identical MiniLM outputs) and costs seconds.
    src = prepared_model(model, tmp, notes, min_opset=11, infer_shapes=False)
    check(cancel)
    out = tmp / "quant.onnx"
    try:
        with quiet_root_logging():
            quantize_dynamic(
                str(src), str(out),
                op_types_to_quantize=list(config.op_types) if config.op_types else None,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                weight_type=QuantType.QInt8 if config.weight_type == "int8" else QuantType.QUInt8,
                nodes_to_exclude=list(config.exclude),
                use_external_data_format=is_large(model),
            )
    except PeripheryError:
        raise
    except Exception as exc:
        raise QuantizeError(f"dynamic INT8 quantization failed: {first_line(exc)}") from None
    return read_model(out), notes, ()


def run_static(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> RunResult:
    """Static QDQ INT8 (`StaticInt8`), calibrated on `calib`."""
    if not isinstance(config, StaticInt8) or calib is None:
        raise TypeError(config)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    notes: list[str] = []
    src = prepared_model(model, tmp, notes, min_opset=QDQ_MIN_OPSET)
    check(cancel)
    reader = CalibrationReader(calib, graph_inputs(model), samples=config.samples,
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
            calibrate_method=getattr(CalibrationMethod, ORT_CALIBRATION[config.calibration]),
            use_external_data_format=is_large(model),
            extra_options=extra,
        )
    except PeripheryError:
        raise
    except Exception as exc:
        raise QuantizeError(f"static INT8 quantization failed: {first_line(exc)}") from None
    if reader.batches_read == 0:
        raise QuantizeError("the calibration data are empty: static quantization needs samples")
    return read_model(out), notes, tuple(reader.seen_names)


def run_weight_only(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> RunResult:
    """4-bit weight-only MatMulNBits (`WeightOnly4Bit`: rtn, hqq or gptq)."""
    if not isinstance(config, WeightOnly4Bit):
        raise TypeError(config)
    if config.method in ("gptq", "hqq") and importlib.util.find_spec("torch") is None:
        raise QuantizeError(f"method {config.method} needs torch: {TORCH_INSTALL}")
    if config.method == "gptq" and calib is None:
        raise QuantizeError("method gptq needs calibration data: give a calibration source")
    with quiet_root_logging():
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb
    notes: list[str] = []
    src = write_model(model, tmp / "model.onnx")
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
        reader = CalibrationReader(calib, graph_inputs(model), samples=config.samples,
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
        raise QuantizeError(
            f"4-bit {config.method} quantization failed: {first_line(exc)}"
        ) from None
    out = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        notes.append("no MatMul with constant weights was quantized")
    fed = tuple(reader.seen_names) if reader is not None else ()
    return out, notes, fed
