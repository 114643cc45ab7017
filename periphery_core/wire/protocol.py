"""Protocol version, message kinds with the header fields each requires, and size limits."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 1

# kind -> {field: accepted Python types}. Fields beyond these are allowed (forward
# compatibility within a version) but never trusted without their own check.
_INT = (int,)
_STR = (str,)
_FLOAT = (int, float)
_LIST = (list,)
_MAP = (dict,)

KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    # control: master <-> node
    "hello": {"master": _STR},
    "info": {"node": _STR, "device": _STR, "data": _STR, "cores": _INT, "memory": _INT},
    "ping": {"t": _FLOAT},
    "pong": {"t": _FLOAT},
    "deploy_begin": {"stage": _INT, "stages": _INT, "sha256": _STR, "size": _INT,
                     "inputs": _LIST, "outputs": _LIST, "next": _STR, "results": _STR},
    "deploy_chunk": {"offset": _INT},
    "deploy_end": {"sha256": _STR},
    "ready": {"stage": _INT, "provider": _STR},
    "error": {"reason": _STR},
    "stats": {"node": _STR, "cpu": _FLOAT, "rss": _INT},
    "shutdown": {},
    # data: stage -> stage, last stage -> master
    "activation": {"id": _INT, "times": _LIST},
    "result": {"id": _INT, "times": _LIST},
    "failure": {"id": _INT, "reason": _STR, "stage": _INT},
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
