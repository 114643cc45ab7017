"""A shard's bytes for upload, made in parts: the interpreter lock is never held for long.

protobuf's serializer holds Python's interpreter lock for a whole message (0.66 s for 512 MiB
here; a 1.25 GiB model's deploy stalled every other thread of the master for up to 3.2 s, the
app's screen with them). An encoding may repeat an embedded message field, which a parser
merges, appending to its repeated fields. So a shard travels as its model without its big
initializers, then one `ModelProto{graph{initializer: [t]}}` per big initializer, each
serialized on its own: the node receives the concatenation and parses it to the same model.
"""

from __future__ import annotations

import onnx

from periphery_core.errors import PlanError

PART_MIN = 1 << 20  # initializers of at least this many bytes are parts of their own
PROTOBUF_LIMIT = (1 << 31) - 1  # what a protobuf parser accepts in one message

_GRAPH = b"\x3a"  # ModelProto.graph: field 7, length-delimited
_INITIALIZER = b"\x2a"  # GraphProto.initializer: field 5, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def shard_parts(shard: onnx.ModelProto, stage: int = 0) -> list[bytes]:
    """The encoding of `shard` as parts whose concatenation parses to the same model.

    Takes the big initializers out of `shard` (one made for this upload: the caller lets it
    go). Raises PlanError for a shard protobuf cannot carry (2 GiB), naming what to do.
    """
    graph = shard.graph
    big = [t for t in graph.initializer if len(t.raw_data) >= PART_MIN]
    if big:
        small = [t for t in graph.initializer if len(t.raw_data) < PART_MIN]
        del graph.initializer[:]  # (the objects in `big` and `small` stay whole)
        graph.initializer.extend(small)
    parts = [shard.SerializeToString()]
    for tensor in big:
        data = tensor.SerializeToString()  # the lock is held for this tensor alone
        inner = _INITIALIZER + _varint(len(data))
        parts += [_GRAPH + _varint(len(inner) + len(data)) + inner, data]  # (data not copied)
    size = sum(map(len, parts))
    if size > PROTOBUF_LIMIT:
        raise PlanError(f"stage {stage}'s shard is {size / (1 << 30):.2f} GiB, more than the "
                        "2 GiB one ONNX model can hold: plan more stages (--shards)")
    return parts
