"""A node's control channel: its ROUTER socket to masters and the one thread that uses it.

Only the control thread touches the socket. Other threads (stats, a shard being built) `post`
what they want sent; the thread sleeps in one poll until a master sends or something is posted
(a `Waker`), never on a timeout for nothing: a 20 ms poll timeout woke the node 50 times a
second while idle and held each posted message up to 20 ms. A message that does not parse, or
that the handler fails on, is answered with an error and counted; the channel keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from periphery_core.cluster.keys import Guard
from periphery_core.cluster.waker import Waker
from periphery_core.wire import PROTOCOL_VERSION, Limits, Message, WireError, decode, encode
from periphery_core.wire.codec import VersionMismatch

log = logging.getLogger("periphery.node")

SLEEP_S = 0.5  # the loop looks at the stop flag at least this often
# Messages a master may have waiting here: a shard's chunks (1 MiB each) beyond these wait in
# the master's queue, not in this node's memory (ZeroMQ's default of 1000 let a busy node hold
# 0.2-0.3 GiB of chunks it had not yet written: a 0.69 GiB stage's node peaked at 1.47x its
# weights; at 8, 1.17x, as plain ONNX Runtime loading the stage's file does).
RECEIVE_QUEUE = 8


def control_socket(ctx: zmq.Context, guard: Guard, limits: Limits) -> zmq.Socket:
    """The ROUTER socket masters connect to (bind it next): admits masters' keys only, takes
    no message over `limits` allow, and queues few."""
    sock = guard.server(ctx.socket(zmq.ROUTER), admit="masters")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_chunk_bytes + (1 << 20))
    return sock


class ControlChannel:
    """The control socket's loop.

    Args:
        sock: The bound ROUTER socket masters connect to.
        limits: What a message may declare, checked by `decode`.
        handle: Called on the control thread with each message that parses, and the identity
            of the master that sent it; raises `WireError` to reject it.
        stop: Ends the loop (with `wake`, at once).
    """

    def __init__(self, sock: zmq.Socket, limits: Limits,
                 handle: Callable[[bytes, Message], None], stop: threading.Event) -> None:
        self.sock = sock
        self.rejected = 0  # messages that did not parse or could not be handled
        self._limits, self._handle, self._stop = limits, handle, stop
        self._outbox: queue.Queue[tuple[bytes, list[Any]]] = queue.Queue()
        self._waker = Waker()

    def post(self, ident: bytes, frames: list[Any]) -> None:
        """Send `frames` to the master `ident` from the control thread (any thread)."""
        self._outbox.put((ident, frames))
        self._waker.wake()

    def reply(self, ident: bytes, kind: str, fields: dict[str, Any],
              at_once: bool = False) -> None:
        """Send a message to the master `ident`; `at_once` (on the control thread only): now,
        with whatever was posted before it, not when the loop next turns."""
        self.post(ident, encode(kind, fields))
        if at_once:
            self._send_outbox()

    def wake(self) -> None:
        """Make the loop look at its outbox and the stop flag now."""
        self._waker.wake()

    @property
    def closed(self) -> bool:
        """The loop has ended."""
        return self._waker.closed

    def run(self) -> None:
        """The control thread's loop, until `stop` is set."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._waker.fd, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._send_outbox()
                ready = dict(poller.poll(int(SLEEP_S * 1000)))
                if self._waker.fd in ready:
                    self._waker.drain()
                if self.sock in ready:
                    self._receive()
        finally:
            self._waker.close()

    def _send_outbox(self) -> None:
        while True:
            try:
                ident, frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            self.sock.send_multipart([ident, *frames], copy=False)

    def _receive(self) -> None:
        """Read and handle every message waiting, sending what each one's handling posted
        before the next is read: a shard's chunks queue up here by the dozen, and answers
        held until they were all taken (a pong, how much of the shard the node has) left a
        busy node silent for as long as that took, and for as long as the session built next
        held the interpreter lock after it, long enough for its master to lose it."""
        while not self._stop.is_set():
            self._send_outbox()
            try:
                first, *frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # (zmq.Again: none left)
                return
            ident = bytes(first.buffer)
            try:
                self._handle(ident, decode(frames, self._limits))  # checks every field
            except WireError as exc:
                self.rejected += 1
                if isinstance(exc, VersionMismatch):
                    log.warning("a master of another Periphery release (wire protocol %.20s; "
                                "this node speaks %d) sent a message: install the same release "
                                "on both", exc.version, PROTOCOL_VERSION)
                else:
                    log.warning("rejected control message: %s", exc)
                self.reply(ident, "error", {"reason": f"rejected: {exc}"})
            except Exception as exc:  # a bug with one message: drop it, say so, keep serving
                self.rejected += 1
                log.exception("control message dropped")
                self.reply(ident, "error", {"reason": f"the node failed to handle it: "
                                            f"{type(exc).__name__}"})
