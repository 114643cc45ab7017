"""A shard's bytes for upload, made in parts: its model, then its big weights' bytes.

The first part is the shard's model with each big initializer (>= PART_MIN) declared external:
its bytes follow the model in the upload, at the offset and length its `external_data` names
(no file: the node decides where they go, shard_load.py). Each offset is a multiple of ALIGN.
So the master serializes only the small model (protobuf's serializer holds Python's lock for a
whole message: 0.66 s for 512 MiB, which stalled the app's screen), and a node can write the
weights to a file as they arrive and hold one copy of them, ONNX Runtime's (shard_load.py).

A big weight still in the model's data file (`iter_shards(weights_on_disk=True)`) is not
copied at all: its part is a `FilePart`, the file's bytes read a chunk at a time as they are
hashed and sent. One the loaded model holds in memory is a `HeldPart`: its bytes are made when
it is hashed, and again when it is sent, one weight at a time. The master then holds the
model's weights once, and a copy of one weight at most, never a stage's.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from periphery_core.errors import ClusterError, ModelLoadError, PlanError
from periphery_core.model.loading import (
    PROTOBUF_LIMIT,
    approx_nbytes,
    external_location,
    external_range,
)
from periphery_core.partition.extract import HELD, ON_DISK_MIN, raw_bytes_known, raw_nbytes

# Initializers of at least this many bytes are parts of their own: the size above which the
# extraction leaves a weight in its data file (weights_on_disk), so either way it is one part.
PART_MIN = ON_DISK_MIN
ALIGN = 4096  # each weight's offset among the parts after the model (a page: mappable)
_TYPED = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class FilePart:
    """`length` bytes of a file from `offset`, read only when hashed or sent."""

    path: Path
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, size: int) -> bytes:
        """`size` bytes from `start` (within the part)."""
        size = max(0, min(size, self.length - start))
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset + start)
                data = handle.read(size)
        except OSError as exc:
            raise ClusterError(f"cannot read the model's weights from {self.path}: "
                               f"{exc.strerror or exc}") from None
        if len(data) != size:
            raise ClusterError(f"{self.path} ended early while its weights were sent (was it "
                               "changed?): load the model again")
        return data


class HeldPart:
    """A weight of the model the master holds in memory, its bytes made (one copy of this
    tensor alone) when first read and let go once its last byte is read: hashing a stage, then
    sending it, the master holds one weight's copy at a time, not the stage's."""

    def __init__(self, tensor: onnx.TensorProto) -> None:
        self._tensor = tensor
        self._lock = threading.Lock()
        self._data: bytes | None = None
        self.length = raw_nbytes(tensor)

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, size: int) -> memoryview:
        """`size` bytes from `start` (within the part)."""
        with self._lock:
            data = self._data if self._data is not None else _bytes(self._tensor)
            if len(data) != self.length:
                raise ClusterError(f"weight '{self._tensor.name}' holds {len(data)} bytes where "
                                   f"its shape says {self.length}: the model is malformed")
            self._data = None if start + size >= self.length else data
        return memoryview(data)[start:start + size]


Part = bytes | FilePart | HeldPart


def _bytes(tensor: onnx.TensorProto) -> bytes:
    """A tensor's data as raw_data holds it (little-endian), whichever field holds it."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data  # (one copy, the part's; the tensor lets its own go)
    array = numpy_helper.to_array(tensor)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def shard_parts(shard: onnx.ModelProto, stage: int = 0, weights_dir: Path | None = None,
                held: Mapping[str, onnx.TensorProto] | None = None) -> list[Part]:
    """`shard` as parts: its model with its big weights declared external, then their bytes
    (see the module docstring). The first part alone parses (the model); the weights' offsets
    count from the end of it.

    Takes the big initializers' bytes out of `shard` (one made for this upload: the caller
    lets it go). One whose bytes lie in a data file (in `weights_dir`) becomes a `FilePart`;
    one the extraction left to the model in memory (`extract.HELD`), a `HeldPart` of `held`'s.

    Raises:
        PlanError: a shard whose model, without its big weights, protobuf cannot carry (2 GiB).
        ModelLoadError: a weight's data file is missing or shorter than it says.
    """
    external = onnx.TensorProto.EXTERNAL
    weights: list[Part] = []
    at = 0
    for tensor in shard.graph.initializer:
        if tensor.data_location == external and external_location(tensor) == HELD:
            if held is None or tensor.name not in held:
                raise ModelLoadError(f"weight '{tensor.name}' is the loaded model's and its "
                                     "initializers were not given")
            part: Part = HeldPart(held[tensor.name])
        elif tensor.data_location == external:  # its bytes go from the file
            if weights_dir is None:
                raise ModelLoadError(f"weight '{tensor.name}' lies in a data file and no folder "
                                     "to read it from was given")
            source, offset, length = external_range(tensor, weights_dir)
            part = FilePart(source, offset, length)
        elif approx_nbytes(tensor) >= PART_MIN and raw_bytes_known(tensor):
            part = _bytes(tensor)
        else:
            continue
        if pad := -at % ALIGN:
            weights.append(bytes(pad))
            at += pad
        del tensor.external_data[:]
        for name in ("raw_data", *_TYPED):
            tensor.ClearField(name)
        tensor.data_location = external
        for key, value in (("offset", at), ("length", len(part))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        weights.append(part)
        at += len(part)
    model = shard.SerializeToString()
    if len(model) > PROTOBUF_LIMIT:
        raise PlanError(f"stage {stage}'s model is {len(model) / (1 << 30):.2f} GiB without its "
                        "big weights, more than the 2 GiB one ONNX model can hold: plan more "
                        "stages (--shards)")
    return [model, *weights]


def parts_sha256(parts: Sequence[Part]) -> str:
    """The sha256 of the parts' concatenation (a file's bytes read a block at a time)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            digest.update(part)
        else:
            for start in range(0, len(part), READ_BLOCK):
                digest.update(part.read(start, READ_BLOCK))
    return digest.hexdigest()


def chunked(parts: Sequence[Part],
            block: int) -> list[tuple[int, Callable[[], bytes | memoryview]]]:
    """The parts' concatenation as (offset, read) per chunk of at most `block` bytes, each
    read only when called: a view of bytes already held, or the file's bytes."""
    chunks: list[tuple[int, Callable[[], bytes | memoryview]]] = []
    size = 0
    for part in parts:
        if isinstance(part, bytes):
            view = memoryview(part)  # (a slice of a view copies nothing)
            chunks += [(size + off, functools.partial(_view, view, off, block))
                       for off in range(0, len(part), block)]
        else:
            chunks += [(size + off, functools.partial(part.read, off, block))
                       for off in range(0, len(part), block)]
        size += len(part)
    return chunks


def _view(view: memoryview, start: int, size: int) -> memoryview:
    return view[start:start + size]
