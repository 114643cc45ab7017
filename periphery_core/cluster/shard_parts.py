"""A shard's bytes for upload, made in parts: the interpreter lock is never held for long.

protobuf's serializer holds Python's interpreter lock for a whole message (0.66 s for 512 MiB
here; a 1.25 GiB model's deploy stalled every other thread of the master for up to 3.2 s, the
app's screen with them). An encoding may repeat an embedded message field, which a parser
merges, appending to its repeated fields. So a shard travels as its model without its big
initializers, then one `ModelProto{graph{initializer: [t]}}` per big initializer, each
serialized on its own: the node receives the concatenation and parses it to the same model.

A big weight still in the model's data file (`iter_shards(weights_on_disk=True)`) is not
serialized at all: its part is a `FilePart`, the file's bytes read a chunk at a time as they are
hashed and sent, after a header that makes them the tensor's raw_data. The master then holds
the model's weights once, never a stage's again (a 2.98 GiB model's deploy: 2.39x its size
in the master before, 1.12x now).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from periphery_core.errors import ClusterError, ModelLoadError, PlanError
from periphery_core.model.loading import approx_nbytes, external_range
from periphery_core.partition.extract import ON_DISK_MIN

# Initializers of at least this many bytes are parts of their own: the size above which the
# extraction leaves a weight in its data file (weights_on_disk), so either way it is one part.
PART_MIN = ON_DISK_MIN
PROTOBUF_LIMIT = (1 << 31) - 1  # what a protobuf parser accepts in one message

_GRAPH = b"\x3a"  # ModelProto.graph: field 7, length-delimited
_INITIALIZER = b"\x2a"  # GraphProto.initializer: field 5, length-delimited
_RAW_DATA = b"\x4a"  # TensorProto.raw_data: field 9, length-delimited
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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def _wrapped(tensor: bytes, size: int) -> bytes:
    """What goes before a serialized initializer of `size` bytes (`tensor`, its start) to make
    it a model whose graph holds it."""
    inner = _INITIALIZER + _varint(size)
    return _GRAPH + _varint(len(inner) + size) + inner + tensor


def shard_parts(shard: onnx.ModelProto, stage: int = 0,
                weights_dir: Path | None = None) -> list[Part]:
    """The encoding of `shard` as parts whose concatenation parses to the same model.

    Takes the big initializers out of `shard` (one made for this upload: the caller lets it
    go). One whose bytes lie in a data file (in `weights_dir`) becomes a `FilePart`.

    Raises:
        PlanError: a shard protobuf cannot carry (2 GiB), naming what to do.
        ModelLoadError: a weight's data file is missing or shorter than it says.
    """
    graph = shard.graph
    external = onnx.TensorProto.EXTERNAL
    own = [t.data_location == external or approx_nbytes(t) >= PART_MIN
           for t in graph.initializer]
    big = [t for t, alone in zip(graph.initializer, own, strict=True) if alone]
    if big:
        small = [t for t, alone in zip(graph.initializer, own, strict=True) if not alone]
        del graph.initializer[:]  # (the objects in `big` and `small` stay whole)
        graph.initializer.extend(small)
    parts: list[Part] = [shard.SerializeToString()]
    for tensor in big:
        if tensor.data_location == external:  # its bytes go from the file, as raw_data
            if weights_dir is None:
                raise ModelLoadError(f"weight '{tensor.name}' lies in a data file and no folder "
                                     "to read it from was given")
            source, offset, length = external_range(tensor, weights_dir)
            head = onnx.TensorProto()
            head.CopyFrom(tensor)
            del head.external_data[:]
            head.ClearField("data_location")
            start = head.SerializeToString() + _RAW_DATA + _varint(length)
            parts += [_wrapped(start, len(start) + length), FilePart(source, offset, length)]
            continue
        data = tensor.SerializeToString()  # the lock is held for this tensor alone
        parts += [_wrapped(b"", len(data)), data]  # (data not copied)
    size = sum(map(len, parts))
    if size > PROTOBUF_LIMIT:
        raise PlanError(f"stage {stage}'s shard is {size / (1 << 30):.2f} GiB, more than the "
                        "2 GiB one ONNX model can hold: plan more stages (--shards)")
    return parts


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
