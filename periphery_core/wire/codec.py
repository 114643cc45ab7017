"""Encoding and decoding of messages: a msgpack header frame plus raw tensor frames.

Every message a node passes on is decoded and encoded once per hop, so both keep their
per-message work small: each kind's schema is turned into checking functions once, at import
(`_SCHEMAS`), and a dtype's name is looked up, not asked of numpy (`dtype.name` is Python code
in numpy, and costed a quarter of `encode`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from periphery_core.wire.protocol import (
    DEFAULT_LIMITS,
    DTYPES,
    KINDS,
    PROTOCOL_VERSION,
    Field,
    Limits,
)
from periphery_core.wire.shm import SenderGone, ShmError, ShmReader, ShmWriter


class WireError(Exception):
    """A message that does not parse or breaks the protocol. Log it, drop it, keep serving."""


class VersionMismatch(WireError):
    """A message of another protocol version (a peer of another Periphery release): its
    `version` as the header gave it."""

    def __init__(self, version: object) -> None:
        super().__init__(f"protocol version {version!r:.20} is not {PROTOCOL_VERSION}")
        self.version = version


class ShmRefused(WireError):
    """A well-formed message whose tensors lie in shared memory this receiver may not or
    cannot read: its checked header `fields` name the request, to fail it rather than drop
    it; unless `sender_gone` (its sender's process ended since: the recovery from that loss
    replays the request, which must not fail meanwhile)."""

    def __init__(self, reason: str, fields: dict[str, Any], sender_gone: bool = False) -> None:
        super().__init__(reason)
        self.fields = fields
        self.sender_gone = sender_gone


Frame = bytes | memoryview
Check = Callable[[Any], bool]

_BY_NAME = {name: np.dtype(name) for name in DTYPES}
_NAMES = {dtype: name for name, dtype in _BY_NAME.items()}  # native byte order only
# Tensors under this many bytes are copied out of their frames by `Message.keep`. ZeroMQ reads
# small messages into one shared receive buffer (8 KiB by default) and a frame's view keeps that
# whole buffer alive: each 40-byte result of the demo model held 9.7 KB until the caller dropped
# it (0.7 KB with the copy, measured holding 5,000). Bigger messages get a buffer of their own.
KEEP_COPY_BYTES = 64 * 1024


@dataclass(slots=True)
class Message:
    """A decoded message: its kind, header fields, tensors and any raw payload frame."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    payload: bytes | None = None  # deploy_chunk: the bytes of the chunk
    lease: Any = None  # tensors in the sender's shared memory: its hold on them (wire/shm.py)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def keep(self) -> dict[str, np.ndarray]:
        """Make the tensors the receiver's to keep, and return them: out of the sender's
        shared memory (whose slot is released), and small ones out of their frames."""
        if self.lease is not None:
            self.tensors = {k: np.array(v) for k, v in self.tensors.items()}
            self.release()
        else:
            self.tensors = {k: v.copy() if v.nbytes < KEEP_COPY_BYTES else v
                            for k, v in self.tensors.items()}
        return self.tensors

    def release(self) -> None:
        """Done with the tensors: their shared memory (if any) may be written again."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def encode(
    kind: str,
    fields: Mapping[str, Any] | None = None,
    tensors: Mapping[str, np.ndarray] | None = None,
    payload: bytes | memoryview | None = None,
    shm: ShmWriter | None = None,
) -> list[Frame]:
    """Frames for one message. Tensor frames are zero-copy views of C-contiguous arrays; with
    `shm` (a link to a process of this host), big tensors go into its shared memory instead."""
    if kind not in KINDS:
        raise WireError(f"unknown message kind '{kind}'")
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": kind, **(fields or {})}
    frames: list[Frame] = []
    if tensors:
        metas, arrays = [], []
        for name, value in tensors.items():
            arr = np.asarray(value)
            dtype = _NAMES.get(arr.dtype)
            if dtype is None:  # not native: the receiver reads native bytes
                dtype = _NAMES.get(arr.dtype.newbyteorder("="))
                if dtype is None:
                    raise WireError(f"tensor '{name}' has dtype {arr.dtype}, which cannot "
                                    "travel")
                arr = arr.astype(_BY_NAME[dtype])
            if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
                arr = arr.copy(order="C")
            metas.append([name, dtype, list(arr.shape)])
            arrays.append(arr)
        header["tensors"] = metas
        slot = shm.put(arrays) if shm is not None else None
        if slot is not None:
            header["shm"] = slot
        else:
            frames = [arr.data.cast("B") if arr.size else b"" for arr in arrays]
    if payload is not None:
        header["payload"] = len(payload)
        frames.append(payload)
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _frame_bytes(frame: Any) -> memoryview:
    if isinstance(frame, bytes | bytearray | memoryview):
        return memoryview(frame)
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    if buffer is not None:
        return memoryview(buffer)
    raise WireError(f"frame of unexpected type {type(frame).__name__}")


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS,
           shm: ShmReader | None = None) -> Message:
    """Parse and validate a message: its frames, tensor descriptors and header fields.

    A message whose tensors lie in its sender's shared memory is read through `shm` (None:
    refused), and its tensors are views of that memory until `Message.release`.

    Raises:
        WireError: anything malformed (and nothing else): the reason says what.
    """
    try:
        return _decode(frames, limits, shm)
    except WireError:
        raise
    except Exception as exc:  # a check missed below must still be a rejected message
        raise WireError(f"malformed message ({type(exc).__name__})") from None


def _decode(frames: Sequence[Any], limits: Limits, shm: ShmReader | None) -> Message:
    if not frames:
        raise WireError("empty message")
    head = _frame_bytes(frames[0])
    if len(head) > limits.max_header_bytes:
        raise WireError(f"header of {len(head)} bytes exceeds {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_bin_len=0,
                                 max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for garbage
        raise WireError(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r:.60}")
    for key, spec, check in _SCHEMAS[kind]:
        if key not in header:
            if spec.required:
                raise WireError(f"'{kind}' needs field '{key}' ({spec.describe()})")
        elif not check(header[key]):
            raise WireError(f"'{kind}' field '{key}' must be {spec.describe()} "
                            f"(got {type(header[key]).__name__})")
    metas = header.pop("tensors", [])
    payload_len = header.pop("payload", None)
    slot = header.pop("shm", None)
    if slot is not None and shm is None:
        raise WireError(f"'{kind}' with tensors in shared memory is not taken here")
    in_frames = 0 if slot is not None else len(metas) if isinstance(metas, list) else 0
    expected = 1 + in_frames + (payload_len is not None)
    if not isinstance(metas, list) or len(metas) > limits.max_tensors:
        raise WireError("tensor list is malformed or too long")
    if len(frames) != expected:
        raise WireError(f"'{kind}' declares {expected} frames but {len(frames)} arrived")
    tensors: dict[str, np.ndarray] = {}
    specs: list[tuple[str, np.dtype, tuple[int, ...], int]] = []  # (in shared memory)
    total = 0
    for i, meta in enumerate(metas):
        name, dtype, shape = _check_meta(meta, i, limits)
        if name in tensors:
            raise WireError(f"tensor '{name}' appears twice")
        itemsize = _BY_NAME[dtype].itemsize
        count = extent = 1
        for d in shape:
            count *= d
            extent *= max(d, 1)  # an empty tensor's other dims still size its array
        nbytes = count * itemsize
        if extent * itemsize > limits.max_tensor_bytes:
            raise WireError(f"tensor '{name}' declares {extent * itemsize} bytes, "
                            "over the limit")
        total += nbytes
        if total > limits.max_total_bytes:
            raise WireError("message declares more tensor bytes than allowed")
        if slot is not None:
            specs.append((name, _BY_NAME[dtype], shape, nbytes))
            continue
        buf = _frame_bytes(frames[1 + i])
        if len(buf) != nbytes:
            raise WireError(f"tensor '{name}' ({dtype} {shape}) needs {nbytes} bytes, "
                            f"frame has {len(buf)}")
        tensors[name] = np.frombuffer(buf, dtype=_BY_NAME[dtype]).reshape(shape) if nbytes \
            else np.zeros(shape, dtype=_BY_NAME[dtype])
    payload = None
    if payload_len is not None:
        raw = _frame_bytes(frames[-1])
        if (not isinstance(payload_len, int) or isinstance(payload_len, bool)
                or payload_len != len(raw)):
            raise WireError("payload length does not match its frame")
        if len(raw) > limits.max_chunk_bytes:
            raise WireError(f"payload of {len(raw)} bytes exceeds {limits.max_chunk_bytes}")
        payload = bytes(raw)
    lease = None  # (last: nothing may fail once the slot is held)
    if slot is not None:
        assert shm is not None
        peer = frames[0].get("Peer-Address") if hasattr(frames[0], "get") else ""
        try:
            tensors, lease = shm.tensors(slot, peer, specs)
        except ShmError as exc:
            raise ShmRefused(str(exc), header, isinstance(exc, SenderGone)) from None
    header.pop("v", None)
    header.pop("kind", None)
    return Message(kind=kind, fields=header, tensors=tensors, payload=payload, lease=lease)


def _check_meta(meta: Any, i: int, limits: Limits) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(meta, list) or len(meta) != 3:
        raise WireError(f"tensor descriptor {i} is not [name, dtype, shape]")
    name, dtype, shape = meta
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise WireError(f"tensor descriptor {i} has a bad name")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"tensor '{name}' has unsupported dtype {dtype!r:.40}")
    if not isinstance(shape, list) or len(shape) > limits.max_rank:
        raise WireError(f"tensor '{name}' has a bad shape {shape!r:.80}")
    for d in shape:
        if not _DIM(d):
            raise WireError(f"tensor '{name}' has a bad shape {shape!r:.80}")
    return name, dtype, tuple(shape)


def _compile(spec: Field) -> Check:
    """A function that tells whether a header value fits `spec` (see `protocol.Field`).

    A bool is an int to Python, never to the protocol.
    """
    lo, hi, max_len = spec.lo, spec.hi, spec.max_len
    if spec.type == "bool":
        return lambda v: v is True or v is False
    if spec.type == "int":
        return lambda v: (isinstance(v, int) and v.__class__ is not bool and lo <= v <= hi)
    if spec.type == "number":
        return lambda v: (((isinstance(v, float) and math.isfinite(v))
                           or (isinstance(v, int) and v.__class__ is not bool))
                          and lo <= v <= hi)
    if spec.type == "str":
        match = re.compile(spec.pattern).fullmatch if spec.pattern else None
        return lambda v: (isinstance(v, str) and len(v) <= max_len
                          and (match is None or match(v) is not None))
    item = _compile(spec.items) if spec.items is not None else None

    def check_list(v: Any) -> bool:
        if not isinstance(v, list) or len(v) > max_len:
            return False
        if item is not None:
            for x in v:
                if not item(x):
                    return False
        return True

    return check_list


_SCHEMAS: dict[str, tuple[tuple[str, Field, Check], ...]] = {
    kind: tuple((key, spec, _compile(spec)) for key, spec in fields.items())
    for kind, fields in KINDS.items()
}
_DIM = _compile(Field("int", lo=0, hi=2**40 - 1))
