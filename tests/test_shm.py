"""Tensors through shared memory between processes of one host (wire/shm.py).

Real ZeroMQ sockets over a Unix socket and over TCP, and a second real process as the sender
where the kernel's view of who sent a message matters.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from periphery_core.wire import PROTOCOL_VERSION, WireError, decode, encode
from periphery_core.wire.codec import ShmRefused
from periphery_core.wire.shm import MIN_BYTES, SLOTS, ShmReader, ShmWriter, layout

BIG = np.arange(MIN_BYTES // 4 * 3, dtype=np.float32).reshape(3, -1)  # 192 KiB
SMALL = np.arange(16, dtype=np.int64)


class Link:
    """A PULL bound on a private Unix socket and on TCP, a PUSH connected to each."""

    def __init__(self, folder: str) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.ipc_endpoint = f"ipc://{folder}/data"
        self.pull.bind(self.ipc_endpoint)
        self.tcp_endpoint = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
        self.near = self._push(self.ipc_endpoint)
        self.far = self._push(self.tcp_endpoint)

    def _push(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def recv(self) -> list[zmq.Frame]:
        assert self.pull.poll(10_000), "nothing arrived"
        return self.pull.recv_multipart(copy=False)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def writer() -> Iterator[ShmWriter]:
    """A sender's slots, given back at the end."""
    w = ShmWriter()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def link() -> Iterator[Link]:
    with tempfile.TemporaryDirectory() as folder:
        lk = Link(folder)
        try:
            yield lk
        finally:
            lk.close()


def test_big_tensors_go_through_shared_memory_and_the_slot_is_used_again_once_released(
        link: Link, writer: ShmWriter) -> None:
    reader = ShmReader()
    frames = encode("activation", {"id": 1, "times": []}, {"a": BIG, "b": SMALL},
                    shm=writer)
    assert len(frames) == 1, "the tensors should travel in shared memory, not frames"
    link.near.send_multipart(frames, copy=False)
    msg = decode(link.recv(), shm=reader)
    np.testing.assert_array_equal(msg.tensors["a"], BIG)
    np.testing.assert_array_equal(msg.tensors["b"], SMALL)
    assert not msg.tensors["a"].flags.writeable
    assert "shm" not in msg.fields  # (the codec's, not a field for anyone to read)
    # Held: the next message takes another slot; released: the same one again.
    second = encode("activation", {"id": 2, "times": []}, {"a": BIG + 1}, shm=writer)
    msg.release()
    third = encode("activation", {"id": 3, "times": []}, {"a": BIG + 2}, shm=writer)
    desc = [msgpack_header(f)["shm"] for f in (frames, second, third)]
    assert desc[1] != desc[0] and desc[2] == desc[0]


def msgpack_header(frames: list) -> dict:
    return msgpack.unpackb(frames[0])


def test_small_tensors_and_a_sender_out_of_slots_use_frames(writer: ShmWriter) -> None:
    assert len(encode("activation", {"id": 1, "times": []}, {"s": SMALL},
                      shm=writer)) == 2
    held = [encode("activation", {"id": i, "times": []}, {"a": BIG}, shm=writer)
            for i in range(SLOTS)]
    assert all(len(f) == 1 for f in held)
    # Every slot busy (a receiver slow or gone): the bytes travel in frames.
    frames = encode("activation", {"id": 99, "times": []}, {"a": BIG}, shm=writer)
    assert len(frames) == 2
    np.testing.assert_array_equal(decode(frames).tensors["a"], BIG)


def test_a_senders_slots_stay_within_its_budget_and_frames_carry_the_rest(link: Link) -> None:
    """Slots are made and grown only while their sizes together stay within the budget (the
    memory a link may pin); past it, the bytes travel in frames."""
    need = layout([BIG.nbytes])[1]
    writer = ShmWriter(budget=3 * need)
    reader = ShmReader()
    try:
        held = [encode("activation", {"id": i, "times": []}, {"a": BIG}, shm=writer)
                for i in range(3)]
        assert all(len(f) == 1 for f in held)  # three slots fit
        over = encode("activation", {"id": 3, "times": []}, {"a": BIG}, shm=writer)
        assert len(over) == 2  # a fourth would pass the budget, slots to spare or not
        np.testing.assert_array_equal(decode(over).tensors["a"], BIG)
        link.near.send_multipart(held[0], copy=False)
        msg = decode(link.recv(), shm=reader)
        msg.release()  # one slot free again, of BIG's size
        bigger = np.tile(BIG, (2, 1))
        frames = encode("activation", {"id": 4, "times": []}, {"a": bigger}, shm=writer)
        assert len(frames) == 2  # growing it would pass the budget too
        assert len(encode("activation", {"id": 5, "times": []}, {"a": BIG}, shm=writer)) == 1
    finally:
        writer.close()


def test_a_slot_grows_for_a_bigger_message_and_the_receiver_maps_it_again(
        link: Link, writer: ShmWriter) -> None:
    reader = ShmReader()
    for scale in (1, 5, 2):
        big = np.tile(BIG, (scale, 1)) * scale
        link.near.send_multipart(encode("activation", {"id": scale, "times": []},
                                        {"a": big}, shm=writer), copy=False)
        msg = decode(link.recv(), shm=reader)
        np.testing.assert_array_equal(msg.tensors["a"], big)
        msg.release()


def test_shared_memory_named_over_tcp_or_to_a_receiver_without_a_reader_is_rejected(
        link: Link, writer: ShmWriter) -> None:
    reader = ShmReader()
    frames = encode("activation", {"id": 1, "times": []}, {"a": BIG}, shm=writer)
    link.far.send_multipart(frames, copy=False)
    with pytest.raises(WireError, match="only over this host's private socket"):
        decode(link.recv(), shm=reader)
    link.near.send_multipart(frames, copy=False)
    with pytest.raises(WireError, match="shared memory is not taken here"):
        decode(link.recv())


def _send_naming(endpoint: str, desc: list[int], done: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    header = {"v": PROTOCOL_VERSION, "kind": "activation", "id": 1, "times": [], "shm": desc,
              "tensors": [["a", "float32", [4]]]}
    sock.send(msgpack.packb(header))
    done.get(timeout=30)  # alive (its fds open) until the receiver has looked
    ctx.destroy(linger=1000)


@pytest.mark.parametrize("whose,refusal", [
    ("another process's slot", "a process may name only its own shared memory"),
    ("a file of its own", "is not one of Periphery's"),
])
def test_a_process_may_name_only_a_slot_of_its_own(link: Link, tmp_path: Path, whose: str,
                                                   refusal: str) -> None:
    """Another process of this host cannot make a receiver read this process's memory, nor
    any file it has open (a key, say) dressed up as a slot."""
    writer = ShmWriter()
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"\x01" * 4096)
    fd = os.open(secret, os.O_RDONLY)
    try:
        if whose == "another process's slot":  # this process's slot, named by a child
            header = msgpack_header(encode("activation", {"id": 1, "times": []}, {"a": BIG},
                                           shm=writer))
            desc = header["shm"]
        ctx = mp.get_context("spawn")
        done = ctx.Queue()
        if whose == "a file of its own":  # the child names the secret it opened itself
            child = ctx.Process(target=_send_own_file, args=(link.ipc_endpoint, str(secret),
                                                             done))
        else:
            child = ctx.Process(target=_send_naming, args=(link.ipc_endpoint, desc, done))
        child.start()
        try:
            frames = link.recv()
            with pytest.raises(WireError, match=refusal):
                decode(frames, shm=ShmReader())
        finally:
            done.put("done")
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    finally:
        os.close(fd)
        writer.close()


def _send_in_a_slot_and_end(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    writer = ShmWriter()
    sock.send_multipart(encode("activation", {"id": 7, "times": [], "epoch": 3}, {"a": BIG},
                               shm=writer))
    ctx.destroy(linger=5000)  # sent; then the process ends, and its slot with it


def test_a_message_whose_sender_has_ended_is_told_apart_from_one_refused(link: Link) -> None:
    """A node lost mid-stream leaves messages behind that name its slots: the receiver can no
    longer read them, and says that its sender ended (the recovery from that loss replays the
    request), not that the request is bad (which would fail it)."""
    child = mp.get_context("spawn").Process(target=_send_in_a_slot_and_end,
                                            args=(link.ipc_endpoint,))
    child.start()
    frames = link.recv()
    child.join(timeout=30)
    assert child.exitcode == 0
    with pytest.raises(ShmRefused) as refused:
        decode(frames, shm=ShmReader())
    assert refused.value.sender_gone and "has ended" in str(refused.value)
    assert refused.value.fields["id"] == 7 and refused.value.fields["epoch"] == 3
    writer = ShmWriter()  # a live sender naming a slot that is not its own: refused as such
    try:
        desc = msgpack_header(encode("activation", {"id": 8, "times": []}, {"a": BIG},
                                     shm=writer))["shm"]
        header = {"v": PROTOCOL_VERSION, "kind": "activation", "id": 8, "times": [],
                  "shm": [desc[0], desc[1] + 1000, desc[2]],
                  "tensors": [["a", "float32", list(BIG.shape)]]}
        link.near.send(msgpack.packb(header))
        with pytest.raises(ShmRefused) as refused:
            decode(link.recv(), shm=ShmReader())
        assert not refused.value.sender_gone
    finally:
        writer.close()


def _send_own_file(endpoint: str, path: str, done: mp.Queue) -> None:  # type: ignore[type-arg]
    fd = os.open(path, os.O_RDONLY)
    _send_naming(endpoint, [os.getpid(), fd, os.fstat(fd).st_ino], done)


def memfds(pid: int | None = None) -> list[str]:
    """The Periphery slots a process (this one: None) holds open (an fd may close as we look)."""
    folder = f"/proc/{pid or os.getpid()}/fd"
    out = []
    for fd in os.listdir(folder):
        try:
            if os.readlink(f"{folder}/{fd}").startswith("/memfd:periphery-shm"):
                out.append(fd)
        except OSError:
            continue
    return out


def test_a_slot_is_a_memfd_that_goes_with_its_writer_and_leaves_no_file() -> None:
    before, held = set(os.listdir("/dev/shm")), set(memfds())
    writer = ShmWriter()
    encode("activation", {"id": 1, "times": []}, {"a": BIG}, shm=writer)
    assert set(memfds()) - held, "the slot should be a memfd"
    writer.close()
    assert set(memfds()) <= held
    assert set(os.listdir("/dev/shm")) <= before
