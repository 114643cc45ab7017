"""A shard a node receives, and the session made of it, holding as few copies as it can.

A shard arrives as its model (the first `head` bytes), then its big weights' bytes, which the
model's initializers name by offset and length and by nothing else (shard_parts.py). When the
weights come to FILE_MIN or more and the scratch folder has room, they are written to a file as
they arrive, in a private folder; the model, checked, names that file, and ONNX Runtime reads
it from there: the node holds the weights once, ONNX Runtime's copy. Built from one buffer, a
node of a 0.69 GiB stage peaked at 3.56 GiB (the buffer, a copy for ONNX Runtime, the checked
proto, ONNX Runtime's parse and tensors); parsed from the buffer and rewritten to a file, at
1.48 GiB; now at 0.81 GiB, where plain ONNX Runtime loading the stage's file peaks at 0.76
(`benchmarks/bigmodel.py`). Smaller weights are kept in memory and put back into the model.

A node reads no file a shard names: the model may not name one at all (a shard that sets a
`location`, or external data anywhere but a main-graph initializer, is refused: shard_policy),
and each range must lie within the bytes that came.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import onnx

from periphery_core.cluster.shard_policy import ShardRefused, require_self_contained
from periphery_core.generate.stateful import StageState, stage_state
from periphery_core.model.loading import PROTOBUF_LIMIT
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.session import SessionConfig

FILE_MIN = 64 << 20  # weights of this many bytes or more are written to a file as they arrive
ACK_BYTES = 8 << 20  # a node says how much of a shard it has each time it takes this much more
PREFIX = "periphery-shard-"  # then the node's pid: a folder a killed node left is found
_WEIGHTS = "weights.bin"


class Received:
    """A shard's bytes as they arrive, in order: its model's in memory, its weights' in memory
    or in a file of a private folder (`close` removes it).

    Raises (on construction):
        ShardRefused: a shard that could be held neither way (named, in one line).
    """

    def __init__(self, size: int, head: int, stage: int) -> None:
        self.size, self.head, self.count = size, head, 0
        self.model = bytearray()
        self.weights = bytearray()
        self.folder: Path | None = None
        self._file: BinaryIO | None = None
        self._sha = hashlib.sha256()
        weights = size - head
        if head > PROTOBUF_LIMIT:
            raise ShardRefused(f"stage {stage}: a model of {head / (1 << 30):.2f} GiB without "
                               "its big weights is more than one ONNX model can hold (2 GiB)")
        scratch = Path(tempfile.gettempdir())
        room = shutil.disk_usage(scratch).free if weights >= FILE_MIN else 0
        if weights >= FILE_MIN and room >= weights + FILE_MIN:
            _sweep(scratch)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=scratch))
            self._file = (self.folder / _WEIGHTS).open("wb")
        elif size > PROTOBUF_LIMIT:
            raise ShardRefused(
                f"stage {stage}: a shard of {size / (1 << 30):.2f} GiB is built through a file "
                f"and {scratch} has {room / (1 << 30):.2f} GiB free: free space there or set "
                "TMPDIR to a folder with room")

    def add(self, payload: bytes | memoryview) -> bool:
        """Take the next bytes of the shard; whether they completed another ACK_BYTES short of
        the whole shard, which the node says to its master: the chunks its master sent wait in
        queues (64 MiB and more), and a node that drains them on a busy host would otherwise be
        silent for as long as that takes."""
        before = self.count // ACK_BYTES
        self._sha.update(payload)
        view = memoryview(payload)
        cut = max(0, min(len(view), self.head - self.count))
        self.model += view[:cut]
        if self._file is not None:
            self._file.write(view[cut:])
        else:
            self.weights += view[cut:]
        self.count += len(view)
        return self.count // ACK_BYTES != before and self.count < self.size  # (then: building)

    def finish(self) -> str:
        """Take no more bytes; the sha256 of every byte taken."""
        if self._file is not None:
            self._file.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        """Let the bytes go, the file's folder with them."""
        if self._file is not None:
            self._file.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.model, self.weights = bytearray(), bytearray()


def build_stage(received: Received,
                config: SessionConfig) -> tuple[StageRunner, StageState | None]:
    """The session of the shard `received` holds, and its decoder state, if it keeps one (the
    received bytes are let go: `received.close()`).

    Raises:
        ShardRefused: the shard reads data outside itself, or ranges beyond what came.
        RuntimeFailure: ONNX Runtime cannot load it.
    """
    try:
        model = onnx.ModelProto()
        model.ParseFromString(memoryview(received.model))
        ranges = _claimed(model, received.size - received.head)
        require_self_contained(model)  # (the weights the upload carries are unmarked here)
        state = stage_state(model)
        if received.folder is None:  # in memory: the weights go back into the model
            for tensor, offset, length in ranges:
                tensor.raw_data = bytes(received.weights[offset:offset + length])
            # ONNX Runtime reads the bytes that came when they are the whole model (serializing
            # holds Python's lock throughout: 1.4 s for 250 MB, a node too busy to answer)
            data = bytes(received.model) if not ranges else model.SerializeToString()
            received.close()
            return StageRunner(model, config, serialized=data), state
        received.model = bytearray()
        for tensor, offset, length in ranges:
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", _WEIGHTS), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        path = received.folder / "shard.onnx"
        path.write_bytes(model.SerializeToString())
        del model
        return StageRunner(path, config), state
    finally:
        received.close()


def _claimed(model: onnx.ModelProto, size: int) -> list[tuple[onnx.TensorProto, int, int]]:
    """The main graph's initializers whose bytes came after the model, with their offset and
    length, checked to lie within the `size` bytes that came, their marks taken off.

    Raises:
        ShardRefused: a mark other than an offset and a length, or a range beyond `size`.
    """
    ranges = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        marks = {e.key: e.value for e in tensor.external_data}
        if set(marks) != {"offset", "length"} or len(tensor.external_data) != 2 \
                or not all(v.isdigit() for v in marks.values()):
            raise ShardRefused(f"refused a shard whose weight '{tensor.name}' names external "
                               f"data by {sorted(marks)}: a node takes only an offset and a "
                               "length into the bytes its deploy carries")
        offset, length = int(marks["offset"]), int(marks["length"])
        if offset + length > size:
            raise ShardRefused(f"refused a shard whose weight '{tensor.name}' lies at "
                               f"{offset}+{length}, beyond the {size} bytes that came")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        ranges.append((tensor, offset, length))
    return ranges


def _sweep(scratch: Path) -> None:
    """Remove the folders that nodes killed while building a stage left behind (their pid is
    in the name and no process has it now)."""
    for folder in scratch.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # (alive, another user's)
