"""The models an evaluation compares: given as paths or protos, opened in ONNX Runtime.

Key design choice: accuracy and latency are measured with ONNX Runtime's graph optimizations
on, as a quantized model is deployed (that is where INT8 kernels replace the
QuantizeLinear/DequantizeLinear pairs); only the per-node SQNR asks for `exact` sessions.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from periphery_core.errors import EvaluationError
from periphery_core.model import loading
from periphery_core.runtime.session import SessionConfig, make_session

ModelLike = Path | str | onnx.ModelProto


def proto_of(model: ModelLike) -> onnx.ModelProto:
    """The model's proto, loaded (with its external data) when it is given as a path."""
    if isinstance(model, onnx.ModelProto):
        return model
    return loading.load_model(model).proto


def model_bytes(model: ModelLike) -> int:
    """File size including external data files, or the serialized size of a proto."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    path = Path(model)
    header = onnx.load(str(path), load_external_data=False)
    locations = {loading.external_location(init) for init in header.graph.initializer
                 if init.data_location == onnx.TensorProto.EXTERNAL}
    return path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file()
    )


def session_config(threads: int | None, exact: bool = False) -> SessionConfig:
    """Optimizations on unless `exact`; `threads` None or 0: ONNX Runtime's default."""
    return SessionConfig(exact=exact, threads=threads or 0)


def open_session(model: ModelLike, config: SessionConfig, scratch: Path) -> ort.InferenceSession:
    """A session for a path or a proto (a large proto is written under `scratch` first).

    Raises:
        EvaluationError: the model file does not exist.
    """
    if isinstance(model, onnx.ModelProto):
        scratch.mkdir(parents=True, exist_ok=True)
        return make_session(model, config, scratch_dir=scratch)
    path = Path(model)
    if not path.is_file():
        raise EvaluationError(f"model file not found: {path}")
    return make_session(path, config)


def output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def _fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size a model is fixed at (dimension 0 of its inputs), if it is fixed."""
    for inp in sess.get_inputs():
        if inp.shape and isinstance(inp.shape[0], int):
            return inp.shape[0]
    return None


def effective_batch(batch_size: int, *sessions: ort.InferenceSession) -> int:
    """The batch size all `sessions` accept: `batch_size`, or less where a model fixes it.

    Raises:
        EvaluationError: `batch_size` is not positive.
    """
    if batch_size <= 0:
        raise EvaluationError(f"the batch size must be positive, not {batch_size}")
    fixed = {b for b in map(_fixed_batch, sessions) if b is not None}
    # A model exported with a fixed batch of 1 (mnist-8) can only run one sample at a time.
    return min([batch_size, *fixed])
