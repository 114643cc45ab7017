"""Tensors between two processes of one host through shared memory, not through the socket.

Design choice: a link between stages on one host is a private Unix socket (cluster/same_host.py),
and moving a big activation through it costs far more than the bytes: the kernel copies them
into socket buffers and out again, in rounds, and ZeroMQ's I/O thread on each side wakes for
every round (measured on the 2-core machine: 115 µs of the sender's and 140 µs of the
receiver's CPU for a 768 KiB message, where copying it in memory takes 20 µs). So a sender on
such a link writes a message's tensors into a slot of shared memory of its own (a memfd), and the
message names the slot instead of carrying the bytes; the receiver maps the slot, its stage
reads the tensors where they lie, and it marks the slot free when done. Messages under
`MIN_BYTES` still carry their bytes (a slot saves nothing there), and so does any message while
every slot is taken (a receiver that is slow or gone).

Who may name a slot is settled by the kernel, not the message: the receiver accepts one only on
a message that came over a Unix socket (ZeroMQ's `Peer-Address` of such a peer holds the
credentials the kernel gave for it, SO_PEERCRED), from a process of its own user, naming a
memfd of that very process made by this module. A peer over TCP, with keys or without, can
name nothing; a process of this host can name only its own slots.

A slot is a memfd: `[state byte, padding to HEADER][tensor][pad to ALIGN][tensor]...`, the
tensors laid out in the order of the message's tensor list (`layout`). The sender sets the
state BUSY before sending, the receiver sets it FREE when it has done with the tensors (after
its stage ran and its outputs went on); nothing else is shared. The memfd goes when the sender
closes it and the last mapping of it goes: nothing is left on any file system, whatever way a
process ends.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import threading
from collections.abc import Sequence

import numpy as np

MIN_BYTES = 64 * 1024  # tensors of a message under this travel in frames
SLOTS = 8  # slots a sender keeps per link (more messages in flight go in frames)
# The most a sender's slots on one link hold, together: past it, messages go in frames (the
# memory a long prompt's activations would otherwise pin, eight times over, on every link).
BUDGET = 256 << 20
HEADER = 64  # bytes before the first tensor; the state byte is the first
ALIGN = 64
FREE, BUSY = 0, 1
NAME = "periphery-shm"
_MAPPINGS = 64  # mappings a receiver keeps open (of slots it was sent lately)
# ZeroMQ's Peer-Address of a peer over a Unix socket: localhost:uid:gid:pid (SO_PEERCRED).
_PEER = re.compile(r"localhost:(\d+):(\d+):(\d+)")


class ShmError(Exception):
    """A message names a slot this receiver may not, or cannot, read."""


class SenderGone(ShmError):
    """The slot's process has ended since it sent the message (a node lost mid-stream): its
    request is not lost, the recovery from that loss replays it."""


@functools.cache
def readable_by_peers() -> bool:
    """Whether other processes of this user may open this process's memfds (through /proc):
    not where there is no memfd, nor where the process is not dumpable (set-uid, or one that
    asked not to be), which would have every slot it names refused."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        import ctypes

        pr_get_dumpable = 3
        return int(ctypes.CDLL(None, use_errno=True).prctl(pr_get_dumpable, 0, 0, 0, 0)) == 1
    except (OSError, AttributeError):
        return False


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of tensors of these byte sizes in a slot, and the bytes the slot needs."""
    offsets, end = [], HEADER
    for n in sizes:
        offsets.append(end)
        end += -(-n // ALIGN) * ALIGN
    return offsets, end


class _Slot:
    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create(NAME, os.MFD_CLOEXEC)
        self.ino = os.fstat(self.fd).st_ino
        self.size = 0
        self.map: mmap.mmap | None = None
        self.grow(size)

    def grow(self, size: int) -> None:
        size = max(size, 2 * self.size)  # (a growing activation does not remap every time)
        os.ftruncate(self.fd, size)
        old, self.map, self.size = self.map, mmap.mmap(self.fd, size), size
        if old is not None:
            self.map[0] = old[0]
            old.close()

    def close(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):
                self.map.close()
        os.close(self.fd)


class ShmWriter:
    """A sender's slots on one link (one thread at a time, as the link's socket)."""

    def __init__(self, slots: int = SLOTS, budget: int = BUDGET) -> None:
        self._slots: list[_Slot] = []
        self._most = slots if readable_by_peers() else 0
        self._budget = budget

    def put(self, arrays: Sequence[np.ndarray]) -> list[int] | None:
        """Copy C-contiguous `arrays` into a free slot and mark it busy: the descriptor a
        message carries ([pid, fd, inode]), or None: send them in frames (too small to gain,
        or every slot taken)."""
        sizes = [int(a.nbytes) for a in arrays]
        if sum(sizes) < MIN_BYTES:
            return None
        offsets, need = layout(sizes)
        slot = next((s for s in self._slots if s.map is not None and s.map[0] == FREE), None)
        if slot is None:
            if len(self._slots) >= self._most or self._held() + need > self._budget:
                return None
            try:
                slot = _Slot(need)
            except OSError:  # no memfd here (a sandbox, say): frames from now on
                self._most = 0
                return None
            self._slots.append(slot)
        elif slot.size < need:  # (the budget is looked at only to make or grow a slot)
            if self._held() - slot.size + max(need, 2 * slot.size) > self._budget:
                return None
            try:
                slot.grow(need)
            except OSError:  # (out of memory for it: this one in frames)
                return None
        assert slot.map is not None
        for a, off in zip(arrays, offsets, strict=True):
            if a.nbytes:
                np.copyto(np.ndarray(a.shape, a.dtype, buffer=slot.map, offset=off), a,
                          casting="no")
        slot.map[0] = BUSY
        return [os.getpid(), slot.fd, slot.ino]

    def _held(self) -> int:
        return sum(s.size for s in self._slots)

    def close(self) -> None:
        """Give the slots back (a receiver's mappings keep theirs until it drops them)."""
        for s in self._slots:
            s.close()
        self._slots = []


class Lease:
    """A received message's hold on its slot: `release` marks the slot free (once)."""

    __slots__ = ("_map",)

    def __init__(self, mapped: mmap.mmap) -> None:
        self._map: mmap.mmap | None = mapped

    def release(self) -> None:
        mapped, self._map = self._map, None
        if mapped is not None:
            with contextlib.suppress(ValueError):  # (closed meanwhile: nothing to free)
                mapped[0] = FREE


class ShmReader:
    """A receiver's mappings of the slots it was sent (any thread)."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}
        self._lock = threading.Lock()

    def tensors(self, desc: object, peer: str,
                specs: Sequence[tuple[str, np.dtype, tuple[int, ...], int]],
                ) -> tuple[dict[str, np.ndarray], Lease]:
        """Read-only views of the tensors (name, dtype, shape, bytes: as the codec checked
        them) a message says lie in a slot.

        Raises:
            ShmError: the sender may not name that slot, or it cannot be read.
        """
        match = _PEER.fullmatch(peer)
        if match is None:
            raise ShmError("shared-memory tensors are taken only over this host's private "
                           "socket")
        if not (isinstance(desc, list) and len(desc) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in desc)):
            raise ShmError("the shared-memory slot is not [pid, fd, inode]")
        pid, fd, ino = desc
        if int(match[1]) != os.getuid() or int(match[3]) != pid:
            raise ShmError("a process may name only its own shared memory")
        offsets, need = layout([nbytes for *_, nbytes in specs])
        mapped = self._mapping(pid, fd, ino, need)
        out = {}
        for (name, dtype, shape, _), off in zip(specs, offsets, strict=True):
            arr = np.ndarray(shape, dtype, buffer=mapped, offset=off)
            arr.flags.writeable = False
            out[name] = arr
        return out, Lease(mapped)

    def _mapping(self, pid: int, fd: int, ino: int, need: int) -> mmap.mmap:
        with self._lock:
            held = self._maps.get((pid, fd))
            if held is not None and held[0] == ino and len(held[1]) >= need:
                return held[1]
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if not os.readlink(path).startswith(f"/memfd:{NAME} "):
                    raise ShmError("the shared-memory slot named is not one of Periphery's")
                f = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if _ended(pid):
                    raise SenderGone(f"its sender (process {pid}) has ended") from None
                raise ShmError(f"cannot open the shared-memory slot: {exc.strerror}") from None
            try:
                st = os.fstat(f)
                if st.st_ino != ino or st.st_uid != os.getuid():
                    raise ShmError("the shared-memory slot named is not the sender's")
                if st.st_size < need:
                    raise ShmError(f"the shared-memory slot holds {st.st_size} bytes, the "
                                   f"message's tensors need {need}")
                mapped = mmap.mmap(f, st.st_size)
            finally:
                os.close(f)
            # Dropped, not closed: views of a mapping keep it alive until they go.
            self._maps.pop((pid, fd), None)
            self._forget_ended()
            while len(self._maps) >= _MAPPINGS:
                self._maps.pop(next(iter(self._maps)))
            self._maps[(pid, fd)] = (ino, mapped)
            return mapped

    def _forget_ended(self) -> None:  # (under _lock)
        """Drop the mappings of senders whose process has ended: a mapping is the last hold
        on its slot's memory then (a node restarted, say, and its successor has slots of its
        own). Looked at only when a slot is mapped, which a sender's steady stream never does."""
        ended = {pid for pid in {pid for pid, _ in self._maps} if _ended(pid)}
        for key in [k for k in self._maps if k[0] in ended]:
            del self._maps[key]

    def clear(self) -> None:
        """Drop every mapping (the receiver closes); views handed out keep theirs alive."""
        with self._lock:
            self._maps.clear()


def _ended(pid: int) -> bool:
    """Whether a process has ended (a zombie its parent has not waited for yet included)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True

