"""Protocol version, message kinds with the schema of each one's header fields, and size limits.

Every field a peer reads is declared here, with its type, whether it must be present and the
values it may take; `decode` checks a header against its kind's schema before anyone reads it,
so a node and a master never convert an unchecked value (one bad value is a rejected message,
never a dead thread). Fields beyond these are allowed (forward compatibility within a version)
but nothing reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# 2: a message over a same-host link may carry its tensors in the sender's shared memory (its
# "shm" field names the slot), which a receiver of version 1 would take for missing frames.
# 3: a shard is uploaded as its model (deploy_begin's "head" bytes), then its big weights' bytes,
# which the model names by offset and length (cluster/shard_parts.py); a node of version 2 would
# parse the whole upload as one model.
# 4: a node says how much of a shard it has taken ("received") as it takes it: a master of
# version 3 would refuse those, one of 4 counts a node that never says it silent while it drains.
PROTOCOL_VERSION = 4
MAX_WORKERS = 256  # the most requests a node may say it computes at once

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: its type, whether it must be present, and the values it may take.

    `lo`/`hi` bound a number (ints are int64 unless told otherwise; floats must be finite);
    `max_len` bounds a string or a list; `pattern` is a regular expression a string must match
    whole, described by `what`; `items` is the schema of each item of a list.
    """

    type: Literal["int", "number", "str", "bool", "list"]
    required: bool = True
    lo: float = INT64_MIN
    hi: float = INT64_MAX
    max_len: int = 4096
    pattern: str = ""
    what: str = ""
    items: Field | None = None

    def describe(self) -> str:
        """What the field must be, for a one-line reason."""
        if self.what:
            return self.what
        if self.type in ("int", "number"):
            what = "an integer" if self.type == "int" else "a finite number"
            lo = "" if self.lo == INT64_MIN else self._bound(self.lo)
            hi = "" if self.hi == INT64_MAX else self._bound(self.hi)
            return f"{what} in {lo}..{hi}" if lo or hi else what
        if self.type == "str":
            return f"a string of at most {self.max_len} characters"
        if self.type == "list":
            return f"a list of at most {self.max_len} items"
        return "a boolean"

    def _bound(self, x: float) -> str:
        return str(int(x)) if self.type == "int" else f"{x:g}"


def optional(f: Field) -> Field:
    """The same field, allowed to be absent."""
    return replace(f, required=False)


# A ZeroMQ TCP endpoint a peer may connect to (a name, an IPv4 or a bracketed IPv6 address),
# and a Unix socket on the same host (cluster/same_host.py checks its folder).
_TCP = r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}"
_IPC = r"ipc:///[A-Za-z0-9_./-]+"
_ENDPOINT = Field("str", max_len=256, what="a tcp://host:port endpoint", pattern=_TCP)
_LINK = Field("str", max_len=256, what="a tcp://host:port or ipc:///path endpoint",
              pattern=f"{_TCP}|{_IPC}")
_SHA256 = Field("str", pattern="[0-9a-f]{64}", what="a sha256 in 64 lowercase hex digits")
_NAME = Field("str", max_len=256)
_KEY = Field("str", max_len=64)  # a Z85 CurveZMQ public key (40), or empty when insecure
_REASON = Field("str", max_len=1 << 16)  # (the header limit bounds it anyway)
_STAGE = Field("int", lo=0, hi=65535)
_COUNT = Field("int", lo=0)
_BYTES = Field("int", lo=0)
_TIME = Field("number")
# One stage's stamps: [stage, received, started, finished(, sent)]; one per stage so far.
_TIMES = Field("list", max_len=1024, items=Field("list", max_len=8, items=Field("number")))
_EPOCH = optional(Field("int", lo=0))
_SPEED = optional(Field("number", lo=0.0, hi=1e6))  # 0: older nodes' "not measured yet"

# A step of a decoder's sequence (stateful stages): its id, the tokens cached, the new ones;
# or a decode step of several sequences batched into one run (one new token each, rows in the
# order of `seqs`, `poss` their cached lengths).
_SEQ = Field("int", lo=0)
_POS = Field("int", lo=0, hi=1 << 24)
MAX_BATCH = 256
_STEP = {"seq": optional(_SEQ), "pos": optional(_POS),
         "new": optional(Field("int", lo=1, hi=1 << 24)),
         "seqs": optional(Field("list", max_len=MAX_BATCH, items=_SEQ)),
         "poss": optional(Field("list", max_len=MAX_BATCH, items=_POS)),
         # the caller picks greedily: the last stage sends each row's best token, not logits
         "greedy": optional(Field("bool"))}
# The tensors lie in the sender's shared memory, not in frames (wire/shm.py): [pid, fd, inode].
_SHM = optional(Field("list", max_len=3, items=Field("int", lo=0)))

KINDS: dict[str, dict[str, Field]] = {
    # control: master <-> node
    "hello": {"master": _ENDPOINT},
    "info": {
        "node": _NAME, "name": optional(_NAME), "device": _NAME, "data": _ENDPOINT,
        "cores": Field("int", lo=1, hi=1 << 20), "memory": _BYTES, "free": optional(_BYTES),
        "speed": _SPEED, "key": optional(_KEY), "stage": optional(Field("int", lo=-1, hi=65535)),
        "sha256": optional(Field("str", pattern="([0-9a-f]{64})?",
                                 what="a sha256 in 64 lowercase hex digits, or empty")),
        "exact": optional(Field("bool")), "master_silent_s": optional(Field("number")),
        # the node's data socket on its host, and who and where that host is (same_host.py)
        "ipc": optional(Field("str", max_len=256, pattern=f"({_IPC})?",
                              what="an ipc:///path endpoint, or empty")),
        "host": optional(Field("str", pattern="[0-9a-f]{0,64}", what="a hex digest")),
        "workers": optional(Field("int", lo=1, hi=MAX_WORKERS)),  # requests it computes at once
    },
    "ping": {"t": _TIME},
    "pong": {"t": _TIME, "node": optional(_NAME)},  # node: the answering process's id
    "deploy_begin": {
        "stage": _STAGE, "stages": Field("int", lo=1, hi=65536), "sha256": _SHA256,
        "size": _BYTES, "inputs": Field("list", items=_NAME),
        "outputs": Field("list", items=_NAME), "next": _LINK, "results": _LINK,
        "exact": optional(Field("bool")), "epoch": _EPOCH, "next_key": optional(_KEY),
        "results_key": optional(_KEY), "reuse": optional(Field("bool")),
        "head": optional(_BYTES),  # the model's bytes, before its weights' (default: all)
    },
    "deploy_chunk": {"offset": _BYTES},
    "deploy_end": {"sha256": _SHA256},
    "received": {"stage": _STAGE, "bytes": _BYTES},  # a node has taken this much of a shard
    "building": {"stage": _STAGE},  # a node has its whole shard and builds its session
    "ready": {"stage": _STAGE, "provider": _NAME},
    "error": {"reason": _REASON, "stage": optional(Field("int", lo=-1, hi=65535))},
    "stats": {
        "node": _NAME, "cpu": Field("number", lo=0.0, hi=1e5), "rss": _BYTES,
        "mem": optional(Field("number", lo=0.0, hi=100.0)), "rejected": optional(_COUNT),
        "speed": _SPEED, "kv": optional(_BYTES), "seqs": optional(_COUNT),
        "gpu": optional(Field("number", lo=0.0, hi=100.0)), "gmem": optional(_BYTES),
    },
    "shutdown": {},
    # a decoder's sequences ended: their KV caches may go
    "release": {"seqs": Field("list", max_len=1 << 16, items=_SEQ)},
    # data: stage -> stage, last stage -> master
    "activation": {"id": Field("int"), "times": _TIMES, "epoch": _EPOCH, "shm": _SHM, **_STEP},
    "result": {"id": Field("int"), "times": _TIMES, "epoch": _EPOCH, "shm": _SHM, **_STEP},
    "failure": {"id": Field("int"), "reason": _REASON, "stage": Field("int", lo=-1, hi=65535),
                "epoch": _EPOCH},
}

# Only plain numeric and boolean dtypes travel; object and string arrays never do.
DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
})


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes checked before anything is allocated."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 256
    max_tensor_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_rank: int = 16
    max_chunk_bytes: int = 8 << 20


DEFAULT_LIMITS = Limits()
