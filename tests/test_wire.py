"""The wire codec: round trips, and every malformed message rejected as a WireError."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from periphery_core.wire import PROTOCOL_VERSION, Limits, WireError, decode, encode
from periphery_core.wire.codec import VersionMismatch
from periphery_core.wire.protocol import DTYPES

dtypes = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(dtypes, shapes), min_size=0, max_size=4), st.integers(0, 2**62))
def test_round_trip_is_exact(specs: list[tuple[str, tuple[int, ...]]], rid: int) -> None:
    rng = np.random.default_rng(rid % 1000)
    tensors = {
        f"t{i}": (rng.standard_normal(shape) * 100).astype(dtype)
        for i, (dtype, shape) in enumerate(specs)
    }
    msg = decode(encode("activation", {"id": rid, "times": [[0, 1.5]]}, tensors))
    assert msg.kind == "activation"
    assert msg.fields == {"id": rid, "times": [[0, 1.5]]}
    assert list(msg.tensors) == list(tensors)
    for name, value in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == value.tobytes()


def test_tensor_frames_are_zero_copy_views() -> None:
    x = np.arange(1000, dtype=np.float32)
    frames = encode("activation", {"id": 1, "times": []}, {"x": x})
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float32), x)


def _own_bytes(arr: np.ndarray) -> bool:
    """Whether `arr` holds only its own bytes: no buffer it is a view of (a message's frame)."""
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root.base is None and root.nbytes == arr.nbytes


def test_small_tensors_kept_hold_no_receive_buffer() -> None:
    """ZeroMQ receives small messages into one shared buffer; a result kept as a view of its
    frame kept that buffer whole (a 40-byte result held 9.7 KB). `keep` copies small tensors
    out and leaves big ones, which have a buffer of their own, as they came."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        small, big = np.arange(10, dtype=np.float32), np.arange(1 << 16, dtype=np.float32)
        for t in (small, small, big):
            push.send_multipart(encode("result", {"id": 1, "times": [], "epoch": 1}, {"t": t}))
        got = [decode(pull.recv_multipart(copy=False)) for _ in range(3)]
    finally:
        push.close(linger=0), pull.close(linger=0), ctx.term()
    assert not _own_bytes(got[0].tensors["t"])  # as decoded: a view of its frame
    kept = [m.keep()["t"] for m in got]
    assert _own_bytes(kept[0]) and _own_bytes(kept[1])
    assert not _own_bytes(kept[2]) and kept[2].base is not None  # big: not copied
    for k, want in zip(kept, (small, small, big), strict=True):
        np.testing.assert_array_equal(k, want)


def test_scalars_keep_rank_zero() -> None:
    got = decode(encode("activation", {"id": 1, "times": []}, {"s": np.float32(2.5)}))
    assert got.tensors["s"].shape == () and got.tensors["s"] == np.float32(2.5)


def test_non_contiguous_arrays_are_sent_correctly() -> None:
    x = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    got = decode(encode("activation", {"id": 1, "times": []}, {"x": x})).tensors["x"]
    np.testing.assert_array_equal(got, x)


def test_big_endian_arrays_arrive_with_their_values() -> None:
    """A big-endian array (what a file written elsewhere may hold) is sent as native bytes;
    its values, not its raw bytes read the wrong way round, reach the other side."""
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    got = decode(encode("result", {"id": 1, "times": [], "epoch": 1}, {"t": arr}), Limits())
    assert got.tensors["t"].dtype == np.float32 and np.array_equal(got.tensors["t"], arr)


def test_payload_round_trip() -> None:
    msg = decode(encode("deploy_chunk", {"offset": 10}, payload=b"abc"))
    assert msg.payload == b"abc" and msg.fields["offset"] == 10


def _header(**fields: object) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields})


GOOD_ACT = {"kind": "activation", "id": 1, "times": []}
BAD = {
    "empty": [],
    "random bytes": [b"\xc1\xff\x00garbage"],
    "header not a map": [msgpack.packb([1, 2, 3])],
    "wrong version": [msgpack.packb({"v": 99, "kind": "ping", "t": 0.0})],
    "no version": [msgpack.packb({"kind": "ping", "t": 0.0})],
    "unknown kind": [_header(kind="explode")],
    "missing field": [_header(kind="ping")],
    "field of wrong type": [_header(kind="activation", id="one", times=[])],
    "bool for int": [_header(kind="activation", id=True, times=[])],
    "frames missing": [_header(**GOOD_ACT, tensors=[["x", "float32", [2]]])],
    "extra frame": [_header(**GOOD_ACT), b"1234"],
    "truncated tensor": [_header(**GOOD_ACT, tensors=[["x", "float32", [4]]]), b"\0" * 15],
    "oversized tensor frame": [_header(**GOOD_ACT, tensors=[["x", "float32", [4]]]), b"\0" * 17],
    "object dtype": [_header(**GOOD_ACT, tensors=[["x", "object", [1]]]), b"\0" * 8],
    "unknown dtype": [_header(**GOOD_ACT, tensors=[["x", "complex128", [1]]]), b"\0" * 16],
    "negative dim": [_header(**GOOD_ACT, tensors=[["x", "int8", [-1]]]), b""],
    "huge declared size": [_header(**GOOD_ACT, tensors=[["x", "float64", [2**20, 2**20]]]), b""],
    "rank too big": [_header(**GOOD_ACT, tensors=[["x", "int8", [1] * 40]]), b"\0"],
    "bad descriptor": [_header(**GOOD_ACT, tensors=[["x", "int8"]]), b"\0"],
    "duplicate tensor": [_header(**GOOD_ACT, tensors=[["x", "int8", [1]], ["x", "int8", [1]]]),
                         b"\0", b"\0"],
    "payload length lies": [_header(kind="deploy_chunk", offset=0, payload=5), b"abc"],
    "oversized header": [b"\x80" + b"\0" * (70 * 1024)],
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_messages_are_rejected(name: str) -> None:
    with pytest.raises(WireError):
        decode(BAD[name])


@pytest.mark.parametrize("version", [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, "2", None])
def test_another_protocol_version_is_told_apart_from_garbage(version: object) -> None:
    """A peer of another release: the error says which version it spoke (the master names it
    to the user), whatever else its message holds."""
    with pytest.raises(VersionMismatch) as caught:
        decode([msgpack.packb({"v": version, "kind": "info", "anything": 1})])
    assert caught.value.version == version
    with pytest.raises(WireError) as other:
        decode(BAD["unknown kind"])
    assert not isinstance(other.value, VersionMismatch)


def test_limits_are_enforced_before_allocation() -> None:
    small = Limits(max_tensor_bytes=1024)
    frames = encode("activation", {"id": 1, "times": []}, {"x": np.zeros(2048, np.uint8)})
    with pytest.raises(WireError, match="over the limit"):
        decode(frames, small)


def test_encoding_refuses_what_cannot_travel() -> None:
    with pytest.raises(WireError):
        encode("activation", {"id": 1, "times": []}, {"s": np.array(["a"], dtype=object)})
    with pytest.raises(WireError):
        encode("no-such-kind")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_decode_raises_only_wire_errors_on_random_frames(frames: list[bytes]) -> None:
    with contextlib.suppress(WireError):
        decode(frames)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("v", "kind")),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8),
                  st.lists(st.integers(0, 2**32), max_size=3)),
        max_size=5,
    ),
    st.lists(st.binary(max_size=32), max_size=3),
)
def test_decode_raises_only_wire_errors_on_random_headers(
    fields: dict[str, object], rest: list[bytes]
) -> None:
    for kind in ("activation", "deploy_begin", "ping"):
        with contextlib.suppress(WireError):
            decode([_header(kind=kind, **fields), *rest])
