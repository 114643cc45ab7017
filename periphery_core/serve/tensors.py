"""`POST /v1/infer`: named tensors in, named tensors out, for models that are not language models.

Two encodings of the same body, chosen by `Content-Type`:

- JSON (`application/json`), for small tensors: `{"inputs": {NAME: {"dtype": "float32",
  "shape": [1, 3], "data": [0.5, 1.0, 2.0]}}}` (`data` flat or nested, row-major);
- msgpack (`application/msgpack`), for large ones: the same map with `data` the tensor's raw
  little-endian bytes, as the wire carries tensors between nodes.

The reply has the same shape under `"outputs"`, in the request's encoding. Only the wire's plain
numeric and boolean dtypes travel; nothing is ever unpickled. Inputs are checked against the
model (names, dtypes, ranks, fixed dimensions) before anything is sent to a node, so a wrong
request is one 400 line, never a failure deep in a stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from periphery_core.errors import PeripheryError
from periphery_core.generate.service import Slots
from periphery_core.model.loading import LoadedModel
from periphery_core.model.shapes import graph_inputs
from periphery_core.serve.schema import first_error
from periphery_core.wire.protocol import DTYPES

MSGPACK = "application/msgpack"
MAX_TENSORS = 256
MAX_ELEMENTS = 1 << 28


class InferError(PeripheryError):
    """A request to /v1/infer that does not fit the model."""


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: str
    shape: list[int] = Field(max_length=32)
    data: Any


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: dict[str, _Tensor] = Field(min_length=1, max_length=MAX_TENSORS)


_EXAMPLES = {
    "_Tensor": '{"dtype": "float32", "shape": [1, 3], "data": [0.5, 1.0, 2.0]}',
    "_Request": '{"inputs": {NAME: {"dtype": ..., "shape": [...], "data": [...]}}}',
}


def _array(name: str, t: _Tensor, raw: bool) -> np.ndarray:
    if t.dtype not in DTYPES:
        raise InferError(f"input {name!r}: dtype {t.dtype!r} is not one of "
                         f"{', '.join(sorted(DTYPES))}")
    if any(d < 0 for d in t.shape):
        raise InferError(f"input {name!r}: a shape has no negative dimensions")
    count = int(np.prod(t.shape, dtype=np.int64))
    if count > MAX_ELEMENTS:
        raise InferError(f"input {name!r}: {count} elements is too many")
    dtype = np.dtype(t.dtype).newbyteorder("<")
    if raw:
        if not isinstance(t.data, bytes):
            raise InferError(f"input {name!r}: data must be the tensor's raw bytes")
        if len(t.data) != count * dtype.itemsize:
            raise InferError(f"input {name!r}: {len(t.data)} bytes of data for shape "
                             f"{t.shape} of {t.dtype} ({count * dtype.itemsize} expected)")
        return np.frombuffer(t.data, dtype=dtype).astype(t.dtype).reshape(t.shape)
    try:
        values = np.asarray(t.data, dtype=t.dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InferError(f"input {name!r}: data is not {t.dtype} numbers: {exc}") from None
    if values.size != count:
        raise InferError(f"input {name!r}: {values.size} values for shape {t.shape} "
                         f"({count} expected)")
    return values.reshape(t.shape)


def decode_request(body: bytes, content_type: str) -> dict[str, np.ndarray]:
    """The named tensors of a request body (InferError: what is wrong, in one line)."""
    raw = content_type.split(";")[0].strip().lower() == MSGPACK
    try:
        parsed = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=len(body),
                                 max_str_len=1 << 16, max_array_len=1 << 16,
                                 max_map_len=MAX_TENSORS + 8) if raw else json.loads(body)
    except (ValueError, msgpack.UnpackException, UnicodeDecodeError) as exc:
        what = "msgpack" if raw else "JSON"
        raise InferError(f"the body is not {what}: {exc}") from None
    try:
        request = _Request.model_validate(parsed)
    except ValidationError as exc:
        raise InferError(first_error(exc, _EXAMPLES)) from None
    return {name: _array(name, t, raw) for name, t in request.inputs.items()}


def encode_reply(outputs: Mapping[str, np.ndarray], msgpack_reply: bool) -> bytes:
    """The reply body: each output as dtype, shape and data (raw bytes in msgpack)."""
    if msgpack_reply:
        return bytes(msgpack.packb({"outputs": {
            name: {"dtype": a.dtype.name, "shape": list(a.shape),
                   "data": np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()}
            for name, a in outputs.items()}}))
    return json.dumps({"outputs": {
        name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}
        for name, a in outputs.items()}}).encode()


class TensorService(Slots):
    """Requests of named tensors over a deployed (stateless) `Pipeline`."""

    routes = "/v1/infer"  # what an endpoint of it answers, in a word

    def __init__(self, pipeline: Any, loaded: LoadedModel, name: str,
                 max_concurrent: int = 8, timeout: float = 120.0) -> None:
        super().__init__(max_concurrent)
        self.pipeline = pipeline
        self.name = name
        self.timeout = timeout
        self.inputs: dict[str, tuple[str, tuple[int | None, ...]]] = {}
        for vi in graph_inputs(loaded.proto):
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                         for d in t.shape.dim)
            dtype = np.dtype(_np_dtype(t.elem_type)).name if t.elem_type else "float32"
            self.inputs[vi.name] = (dtype, dims)

    def check(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Refuse inputs the model cannot take, in one line."""
        missing = [n for n in self.inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self.inputs]
        if missing or unknown:
            raise InferError(
                "inputs must be exactly " + ", ".join(
                    f"{n} ({dt} {_shape(dims)})" for n, (dt, dims) in self.inputs.items())
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        for name, (dtype, dims) in self.inputs.items():
            a = feeds[name]
            if a.dtype.name != dtype:
                raise InferError(f"input {name!r} is {dtype}, not {a.dtype.name}")
            if len(a.shape) != len(dims) or any(
                    d is not None and d != s for d, s in zip(dims, a.shape, strict=True)):
                raise InferError(f"input {name!r} has shape {_shape(dims)}, not "
                                 f"{list(a.shape)}")

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request through the pipeline (call within a slot)."""
        result: dict[str, np.ndarray] = self.pipeline.submit(dict(feeds)).result(
            timeout=self.timeout)
        return result


    def close(self) -> None:
        """Nothing of its own to stop (the pipeline is its owner's)."""


def _np_dtype(elem_type: int) -> Any:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def _shape(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
