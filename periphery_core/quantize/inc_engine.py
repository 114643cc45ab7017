"""The Intel Neural Compressor engine: RTN, GPTQ and AWQ weight-only, and SmoothQuant.

Intel Neural Compressor (`onnx_neural_compressor`, the `inc` extra) is imported only when an
`Inc*` config runs; its graph optimisation is switched off, since fusions rename nodes and
exclusions would stop matching.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import onnx

from periphery_core.errors import PeripheryError
from periphery_core.progress import CancelToken, ProgressFn, check
from periphery_core.quantize.config import (
    IncAwq,
    IncGptq,
    IncRtn,
    IncSmoothQuant,
    QuantConfig,
    QuantizeError,
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
    prepared_model,
    quiet_root_logging,
    read_model,
    write_model,
)

INC_INSTALL = install_hint("inc")


def _inc(method: str) -> Any:
    """Import Intel Neural Compressor's ONNX package, or say how to install it."""
    try:
        with quiet_root_logging():
            return importlib.import_module("onnx_neural_compressor")
    except ImportError:
        raise QuantizeError(
            f"method {method} needs Intel Neural Compressor: {INC_INSTALL}"
        ) from None


def _matmuls_on_inputs(model: onnx.ModelProto) -> list[str]:
    inputs = set(graph_inputs(model))
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and any(x in inputs for x in n.input)]


def run_inc_weight_only(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> RunResult:
    """Weight-only RTN, GPTQ or AWQ with Intel Neural Compressor."""
    if not isinstance(config, IncRtn | IncGptq | IncAwq):
        raise TypeError(config)
    _inc(config.method)
    import onnxruntime as ort
    from onnx_neural_compressor.quantization import matmul_nbits_quantizer as inc_mnb

    notes: list[str] = []
    src = write_model(model, tmp / "model.onnx")
    check(cancel)
    reader: CalibrationReader | None = None
    algo: Any
    if isinstance(config, IncRtn):
        algo = inc_mnb.RTNWeightOnlyQuantConfig()
    else:
        if calib is None:
            raise TypeError(config)
        reader = CalibrationReader(calib, graph_inputs(model), samples=config.samples,
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
                            f"{first_line(exc)}") from None
    out = quantizer.model
    if not isinstance(out, onnx.ModelProto):
        out = out.model
    fed = tuple(reader.seen_names) if reader is not None else ()
    return out, notes, fed


def run_inc_smoothquant(
    model: onnx.ModelProto, config: QuantConfig, calib: FeedSource | None, tmp: Path,
    progress: ProgressFn | None, cancel: CancelToken | None,
) -> RunResult:
    """SmoothQuant static INT8 with Intel Neural Compressor."""
    if not isinstance(config, IncSmoothQuant) or calib is None:
        raise TypeError(config)
    _inc(config.method)
    import onnxruntime as ort
    from onnx_neural_compressor.quantization import CalibrationMethod, QuantFormat
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization import quantize as inc_quantize

    notes: list[str] = []
    src = prepared_model(model, tmp, notes, min_opset=QDQ_MIN_OPSET)
    check(cancel)
    reader = CalibrationReader(calib, graph_inputs(model), samples=config.samples,
                               batch_size=config.batch_size, progress=progress, cancel=cancel)
    batches = math.ceil(config.samples / config.batch_size)
    qconfig = inc_config.SmoothQuantConfig(
        alpha=config.alpha,
        calib_iter=batches,
        calibration_data_reader=reader,
        calibrate_method=getattr(CalibrationMethod, ORT_CALIBRATION[config.calibration]),
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
                            f"{first_line(exc)}") from None
    return read_model(out), notes, tuple(reader.seen_names)
