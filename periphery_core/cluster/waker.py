"""Waking a thread that waits in `zmq.Poller.poll` from another thread.

A control loop that polls its sockets with a short timeout, to notice work queued by other
threads, wakes hundreds of times a second for nothing: CPU taken from the stages that share the
host, and up to a timeout's delay on every queued command. A `Waker` is a pipe whose read end
sits in the poller beside the sockets; any thread may `wake` it, and the loop then sleeps until
a socket or a queued command needs it (or its own next deadline).
"""

from __future__ import annotations

import contextlib
import os
import threading


class Waker:
    """A self-pipe: `wake` from any thread, `fd` in the poller, `drain` when it fires."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._closed = False
        self._lock = threading.Lock()  # no write to a closed (and maybe reused) descriptor

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        """The end to register with `zmq.Poller` (POLLIN)."""
        return self._read

    def wake(self) -> None:
        """Make the poller return; cheap, never blocks (a full pipe is already awake)."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._write, b"\0")

    def drain(self) -> None:
        """Consume every pending wake-up (the loop is about to look at its queue)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read, 4096):
                pass

    def close(self) -> None:
        """Close the pipe; a later `wake` does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)
