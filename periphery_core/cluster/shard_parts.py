"""A shard's bytes for upload, made in parts: its model, then its big weights' bytes.

The first part is the shard's model with each big initializer (>= PART_MIN) declared external:
its bytes follow the model in the upload, at the offset and length its `external_data` names
(no file: the node decides where they go, shard_load.py). Each offset is a multiple of ALIGN.
So the master serializes only the small model (protobuf's serializer holds Python's lock for a
whole message: 0.66 s for 512 MiB, which stalled the app's screen), and a node can write the
weights to a file as they arrive and hold one copy of them, ONNX Runtime's (shard_load.py).

A big weight still in the model's data file (`iter_shards(weights_on_disk=True)`) is not
copied at all: its part is a `FilePart`, the file's bytes read a chunk at a time as they are
hashed and sent. The master then holds the model's weights once, never a stage's again.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

from periphery_core.errors import ClusterError, ModelLoadError, PlanError
from periphery_core.model.loading import approx_nbytes, external_range
from periphery_core.partition.extract import ON_DISK_MIN

# Initializers of at least this many bytes are parts of their own: the size above which the
# extraction leaves a weight in its data file (weights_on_disk), so either way it is one part.
PART_MIN = ON_DISK_MIN
PROTOBUF_LIMIT = (1 << 31) - 1  # what a protobuf parser accepts in one message
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


Part = bytes | FilePart


def _bytes(tensor: onnx.TensorProto) -> bytes:
    """A tensor's data as raw_data holds it (little-endian), whichever field holds it."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data  # (one copy, the part's; the tensor lets its own go)
    array = numpy_helper.to_array(tensor)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def shard_parts(shard: onnx.ModelProto, stage: int = 0,
                weights_dir: Path | None = None) -> list[Part]:
    """`shard` as parts: its model with its big weights declared external, then their bytes
    (see the module docstring). The first part alone parses (the model); the weights' offsets
    count from the end of it.

    Takes the big initializers' bytes out of `shard` (one made for this upload: the caller
    lets it go). One whose bytes lie in a data file (in `weights_dir`) becomes a `FilePart`.

    Raises:
        PlanError: a shard whose model, without its big weights, protobuf cannot carry (2 GiB).
        ModelLoadError: a weight's data file is missing or shorter than it says.
    """
    external = onnx.TensorProto.EXTERNAL
    weights: list[Part] = []
    at = 0
    for tensor in shard.graph.initializer:
        if tensor.data_location == external:  # its bytes go from the file
            if weights_dir is None:
                raise ModelLoadError(f"weight '{tensor.name}' lies in a data file and no folder "
                                     "to read it from was given")
            source, offset, length = external_range(tensor, weights_dir)
            part: Part = FilePart(source, offset, length)
        elif approx_nbytes(tensor) >= PART_MIN and tensor.data_type != onnx.TensorProto.STRING:
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
        if isinstance(part, FilePart):
            for start in range(0, len(part), READ_BLOCK):
                digest.update(part.read(start, READ_BLOCK))
        else:
            digest.update(part)
    return digest.hexdigest()


def chunked(parts: Sequence[Part],
            block: int) -> list[tuple[int, Callable[[], bytes | memoryview]]]:
    """The parts' concatenation as (offset, read) per chunk of at most `block` bytes, each
    read only when called: a view of bytes already held, or the file's bytes."""
    chunks: list[tuple[int, Callable[[], bytes | memoryview]]] = []
    size = 0
    for part in parts:
        if isinstance(part, FilePart):
            chunks += [(size + off, functools.partial(part.read, off, block))
                       for off in range(0, len(part), block)]
        else:
            view = memoryview(part)  # (a slice of a view copies nothing)
            chunks += [(size + off, functools.partial(_view, view, off, block))
                       for off in range(0, len(part), block)]
        size += len(part)
    return chunks


def _view(view: memoryview, start: int, size: int) -> memoryview:
    return view[start:start + size]
