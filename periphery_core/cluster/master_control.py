"""The master's control thread: one DEALER socket per node, and every action taken on them.

Only this thread touches a control socket, so none is shared and none needs a lock: other
threads `put` a command (a closure) on its queue and wait on a future that the command, or a
node's answer to it, settles. Each turn runs the queued commands, reads what the nodes sent,
then sends heartbeats; a node silent for `lost_after_s` is lost, and one that answers again
rejoins. A node whose connection closes (its process ended, its host rebooted) and does not
come back within `GONE_S` is lost then (ZeroMQ reports the close on each socket's monitor);
one whose address another process answers (it restarted there) is lost on that answer, and the
new process joins as a node of its own. Between turns the thread sleeps in one poll until a
node sends, a command is queued (a `Waker`), or the next heartbeat or retry is due: it never
wakes for nothing (a 5 ms poll timeout cost ~12 ms of CPU a second). Nothing here blocks on
a node: a full send queue is a skipped beat or a retry later; one hung node stalls no other.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.futures import settle
from periphery_core.cluster.handles import NodeHandle, advertised_release, other_release
from periphery_core.cluster.keys import Guard
from periphery_core.cluster.shard_parts import Part, chunked
from periphery_core.cluster.speeds import parse_speed
from periphery_core.cluster.waker import Waker
from periphery_core.discovery import NodeAddress
from periphery_core.errors import ClusterError
from periphery_core.wire import Limits, Message, WireError, decode, encode
from periphery_core.wire.codec import VersionMismatch

log = logging.getLogger("periphery.master")

CHUNK_BYTES = 1 << 20
_FROM_NODES = frozenset({"info", "pong", "received", "building", "ready", "error", "stats"})
_CHUNKS_PER_TURN = 4  # a few shard chunks per turn, so heartbeats flow during big uploads
RETRY_S = 0.005  # a send that found a node's queue full is tried again this much later
MAX_SLEEP_S = 0.25  # the loop looks at the stop flag at least this often
# A node building a shard's session (ONNX Runtime's optimizations, CUDA starting) may answer no
# ping for seconds: from its "building" (not the last chunk sent: a hung node's buffers take a
# small stage whole) until it says ready or error, it is lost only after this long unanswered.
LOADING_LOST_S = 30.0
# A node whose control connection closed is lost when it has not reconnected within this long
# (ZeroMQ retries every 0.1 s: a live node behind a connection that merely dropped is back by
# then; a process that ended never is).
GONE_S = 0.5
REJOIN_S = 10.0  # how long a process restarted at a node's address has to join as a node
_LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class Control:
    """The control thread's state and commands; `run` is the thread's loop.

    Args:
        ctx, guard: The master's ZeroMQ context and its key guard (sockets are made here).
        bus: Where node joins, losses, stats and upload progress are published.
        limits: What a node's message may declare, checked by `decode`.
        results_endpoint: The master's results socket, sent to nodes in hello and deploys.
        heartbeat_s, lost_after_s: The heartbeat period and the silence that loses a node.
        stop: Set when the master closes; ends the loop.
        on_stage_lost: Called on this thread as ``on_stage_lost(handle, stage)`` when a node
            that runs a stage of the current pipeline is lost.
    """

    def __init__(self, *, ctx: zmq.Context, guard: Guard, bus: EventBus, limits: Limits,
                 results_endpoint: str, heartbeat_s: float, lost_after_s: float,
                 stop: threading.Event,
                 on_stage_lost: Callable[[NodeHandle, int], None]) -> None:
        self.ctx = ctx
        self.guard = guard
        self.bus = bus
        self.limits = limits
        self.results_endpoint = results_endpoint
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self._stop = stop
        self._on_stage_lost = on_stage_lost
        self.nodes: dict[str, NodeHandle] = {}  # by node id, once a node said hello
        self._stage_nodes: list[str] = []  # the node ids of the deployed stages, in order
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._waker = Waker()
        # (due, order, command): retries after a full queue, run once due (control thread only)
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._handles_by_socket: dict[Any, NodeHandle] = {}  # owned by the control thread
        self._monitors: dict[Any, NodeHandle] = {}  # by each control socket's monitor (same)

    def put(self, command: Callable[[], None]) -> None:
        """Run `command` on the control thread, on its next turn (waking it)."""
        self._commands.put(command)
        self._waker.wake()

    def retry(self, command: Callable[[], None]) -> None:
        """Run `command` again `RETRY_S` from now (on the control thread only; a full queue)."""
        heapq.heappush(self._later, (time.monotonic() + RETRY_S, next(self._order), command))

    def wake(self) -> None:
        """Make the loop take a turn now (the master is closing)."""
        self._waker.wake()

    @staticmethod
    def send(handle: NodeHandle, frames: list) -> bool:
        """Send to a node without ever blocking the control thread (call it only there): False
        when its queue is full (a hung or dead node) or its socket failed; the caller decides
        (heartbeats just skip a beat, and silence marks the node lost)."""
        try:
            handle.socket.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.debug("send to node %s failed: %s", handle.name or handle.address.host, exc)
            return False

    def fail_waiters(self, error: ClusterError) -> None:
        """Wake whatever waits on a node (a deploy, a ping) with `error`: the master closed."""
        for handle in list(self.nodes.values()) + list(self._handles_by_socket.values()):
            for f in [f for waiters in handle.waiters.values() for f in waiters]:
                settle(f, error)

    # ------------------------------------------------------------------ connecting

    def connect(self, address: NodeAddress, timeout: float) -> NodeHandle:
        """Say hello to a node, wait for its description, measure the link, publish the join.

        Raises:
            ClusterError: the node does not answer in time, or advertises or answers in another
                protocol version.
        """
        if (mismatch := advertised_release(address)) is not None:
            raise mismatch  # its mDNS record says so: no need to ask
        reply: Future = Future()
        # With keys, a node's public key comes from its mDNS record; a static peer's is not
        # known, so one connection per allowed key is tried and the one that answers is kept.
        candidates = self.guard.candidates(address.properties.get("key"))
        tried: list[NodeHandle] = []

        def start() -> None:
            for key in candidates:
                sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 64)
                self.guard.connect(sock, f"tcp://{address.host}:{address.port}", key, "nodes")
                handle = NodeHandle(address=address, socket=sock, last_seen=time.time(), key=key)
                handle.waiters.setdefault("info", []).append(reply)
                self._handles_by_socket[sock] = handle
                handle.monitor = sock.get_monitor_socket(_LINK_EVENTS)
                self._monitors[handle.monitor] = handle
                tried.append(handle)
                self.send(handle, encode("hello", {"master": self.results_endpoint}))

        def forget_others(keep: NodeHandle | None) -> None:
            for h in tried:
                if h is not keep:
                    self._handles_by_socket.pop(h.socket, None)
                    self._close(h)

        self.put(start)
        try:
            handle: NodeHandle = reply.result(timeout=timeout)
        except ClusterError:  # it answered in another protocol version
            self.put(lambda: forget_others(None))
            raise
        except TimeoutError:
            self.put(lambda: forget_others(None))
            hint = (" and that its keys allow this master" if self.guard.secure
                    else " (or does it need keys? this master runs --insecure)")
            raise ClusterError(f"node {address.host}:{address.port} did not answer within "
                               f"{timeout:.0f} s: check that periphery-node runs there{hint}"
                               ) from None
        self.put(lambda: forget_others(handle))
        self._measure_link(handle)
        self.bus.publish(handle.joined())
        return handle

    def _measure_link(self, handle: NodeHandle, probes: int = 5) -> None:
        """Round-trip time (small pings) and bandwidth (a 1 MiB ping) to a node."""
        small = [self._ping(handle) for _ in range(probes)]
        big = [self._ping(handle, payload=bytes(CHUNK_BYTES)) for _ in range(3)]
        handle.rtt_s = statistics.median(small)
        extra = statistics.median(big) - handle.rtt_s
        handle.bandwidth = CHUNK_BYTES / extra if extra > 0 else None

    def _ping(self, handle: NodeHandle, payload: bytes | None = None) -> float:
        reply: Future = Future()
        t0 = time.perf_counter()

        def send() -> None:
            handle.waiters.setdefault("pong", []).append(reply)
            if not self.send(handle, encode("ping", {"t": time.time()}, payload=payload)):
                settle(reply, ClusterError(f"node {handle.name} takes no messages"))

        self.put(send)
        reply.result(timeout=5)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """The control thread's loop, until the master stops; closes every control socket."""
        next_beat = time.time()
        try:
            while not self._stop.is_set():
                try:
                    next_beat = self._turn(next_beat)
                except Exception:  # one failing send, receive or command never ends the loop
                    log.exception("master control loop")
                    time.sleep(0.01)
        finally:
            for handle in list(self._handles_by_socket.values()):
                self._close(handle)
            self._waker.close()

    def _close(self, handle: NodeHandle) -> None:
        """Close a node's control socket and its monitor."""
        if handle.monitor is not None:
            self._monitors.pop(handle.monitor, None)
            handle.socket.disable_monitor()
            handle.monitor.close(linger=0)
        handle.socket.close(linger=0)

    def _run_commands(self) -> None:
        """The queued commands, then the retries that are due."""
        self._waker.drain()  # before reading the queue: a later put wakes the next poll
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            self._run(command)
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            self._run(heapq.heappop(self._later)[2])

    @staticmethod
    def _run(command: Callable[[], None]) -> None:
        try:
            command()
        except Exception:
            log.exception("master control command")

    def _turn(self, next_beat: float) -> float:
        """One turn of the control loop: commands, then node messages, then heartbeats."""
        self._run_commands()
        # Sleep until a node sends, a command is put, or a heartbeat or retry is due.
        until = next_beat - time.time()
        if self._later:
            until = min(until, self._later[0][0] - time.monotonic())
        gone = [h.gone_since + GONE_S for h in self._handles_by_socket.values()
                if h.gone_since is not None and h.node_id and not h.lost]
        if gone:
            until = min(until, min(gone) - time.time())
        timeout_ms = max(0, min(int(until * 1000) + 1, int(MAX_SLEEP_S * 1000)))
        poller = zmq.Poller()
        poller.register(self._waker.fd, zmq.POLLIN)
        for s in (*self._handles_by_socket, *self._monitors):
            poller.register(s, zmq.POLLIN)
        for sock, _ in poller.poll(timeout_ms):
            handle = self._handles_by_socket.get(sock)
            if handle is not None:
                self._read(sock, handle)
            elif (handle := self._monitors.get(sock)) is not None:
                handle.link_events(sock)
        now = time.time()
        for handle in list(self._handles_by_socket.values()):
            if handle.gone_since is not None and handle.node_id and not handle.lost \
                    and now - handle.gone_since >= GONE_S:
                self._lose(handle, now, f"its connection closed and did not come back within "
                                        f"{GONE_S:g} s (its process ended or its host went down)")
        if now >= next_beat:
            next_beat = now + self.heartbeat_s
            self._heartbeat(now)
        return next_beat

    def _read(self, sock: zmq.Socket, handle: NodeHandle) -> None:
        """Act on every message a node's socket holds (until one has it closed: `_rejoin`)."""
        while not sock.closed:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(frames, self.limits)  # checks every field it reads
                if msg.kind not in _FROM_NODES:
                    raise WireError(f"'{msg.kind}' is not a message nodes send")
            except WireError as exc:  # rejected whole: nothing of it is kept
                log.warning("rejected message from node %s: %s",
                            handle.name or handle.address.host, exc)
                if isinstance(exc, VersionMismatch):  # its answer to hello, say: say why
                    self._mismatched(handle, exc)
                continue
            try:
                self._on_message(handle, msg)
            except Exception:  # a bug with one message: drop it, read the next
                log.exception("message from node %s dropped", handle.name)

    @staticmethod
    def _mismatched(handle: NodeHandle, exc: VersionMismatch) -> None:
        """Fail whoever waits to connect to a node that speaks another protocol version."""
        for f in handle.waiters.pop("info", []):
            settle(f, other_release(handle.address.host, handle.address.port, exc.version))

    def _heartbeat(self, now: float) -> None:
        for handle in list(self._handles_by_socket.values()):
            if not handle.node_id:
                continue
            if handle.lost:  # keep asking: a node that answers again can rejoin
                self.send(handle, encode("ping", {"t": now}))
                continue
            limit = LOADING_LOST_S if now < handle.loading_until else self.lost_after_s
            if handle.unanswered_since is not None and now - handle.unanswered_since > limit:
                self._lose(handle, now, f"no answer for {now - handle.unanswered_since:.1f} s")
                continue
            self.send(handle, encode("ping", {"t": now}))  # a full queue counts as silence
            if handle.unanswered_since is None:
                handle.unanswered_since = now

    def _lose(self, handle: NodeHandle, now: float, reason: str) -> None:
        """Declare a node lost: say so, fail what waits on it, recover its stage."""
        handle.lost = True
        log.warning("node %s lost: %s", handle.name, reason)
        self.bus.publish(ev.NodeLost(t=now, node_id=handle.node_id, reason=reason))
        for waiters in handle.waiters.values():
            for f in waiters:
                settle(f, ClusterError(f"node {handle.name} was lost"))
        handle.waiters.clear()
        if handle.node_id in self._stage_nodes:
            self._on_stage_lost(handle, self._stage_nodes.index(handle.node_id))

    def _rejoin(self, handle: NodeHandle) -> None:
        """Stop asking a node whose process was replaced; connect the new one as a node (on a
        thread: connecting waits for answers this thread reads). The next plan may use it."""
        self._handles_by_socket.pop(handle.socket, None)
        self._close(handle)

        def join() -> None:
            try:
                self.connect(handle.address, REJOIN_S)
            except ClusterError as exc:  # (or the master closed meanwhile)
                log.warning("the process now at %s did not join: %s", handle.address.host, exc)

        threading.Thread(target=join, name="master-rejoin", daemon=True).start()

    def _resolve(self, handle: NodeHandle, kind: str, value: Any) -> bool:
        waiters = handle.waiters.get(kind)
        while waiters and waiters[0].done():  # shared by several candidate connections
            waiters.pop(0)
        if waiters:
            settle(waiters.pop(0), value)
            return True
        return False

    def _on_message(self, handle: NodeHandle, msg: Message) -> None:
        """Act on one message from a node. `decode` has checked the type and range of every
        field read here (wire/protocol.py), so none of these conversions can fail half-way."""
        answering = msg.fields.get("node") if msg.kind in ("pong", "stats") else None
        if answering and handle.node_id and answering != handle.node_id:
            # Another process answers at the node's address (it restarted there, quicker than
            # a loss is noticed): it holds none of the node's stage; the node is gone.
            if not handle.lost:  # (or lost already, its connection closed: joins all the same)
                self._lose(handle, time.time(), "another process answers at its address (it "
                                                "restarted): it joins as a new node")
            self._rejoin(handle)
            return
        handle.last_seen = time.time()
        handle.unanswered_since = None
        f = msg.fields
        if handle.lost and handle.node_id and msg.kind in ("pong", "stats"):
            handle.lost = False  # it answers again: usable by the next plan
            log.info("node %s is back", handle.name)
            self.bus.publish(handle.joined())
        if msg.kind == "info":
            handle.take_info(f)
            self.nodes[handle.node_id] = handle
            self._resolve(handle, "info", handle)
        elif msg.kind == "pong":
            self._resolve(handle, "pong", f["t"])
        elif msg.kind == "building":
            handle.loading_until = time.time() + LOADING_LOST_S
        elif msg.kind == "ready":
            handle.loading_until = 0.0
            self._resolve(handle, "ready", f)
        elif msg.kind == "error":
            handle.loading_until = 0.0
            reason = str(f["reason"])
            if not self._resolve(handle, "ready", ClusterError(f"{handle.name}: {reason}")):
                log.warning("node %s reports: %s", handle.name, reason)
        elif msg.kind == "stats":
            speed = parse_speed(f.get("speed"))  # measured (again) since the node joined
            if speed is not None and speed != handle.speed:
                log.info("node %s speed %s -> %.2fx", handle.name,
                         "unknown" if handle.speed is None else f"{handle.speed:.2f}x", speed)
                handle.speed = speed
            self.bus.publish(ev.NodeStats(
                t=time.time(), node_id=handle.node_id, cpu_percent=float(f["cpu"]),
                rss_bytes=int(f["rss"]), memory_percent=float(f.get("mem", 0.0)),
                gpu_percent=f.get("gpu"), gpu_memory_bytes=f.get("gmem"), speed=speed,
                kv_bytes=f.get("kv"), sequences=f.get("seqs"),
            ))

    # ------------------------------------------------------------------ deploying

    def upload(self, handle: NodeHandle, stage: int, stages: int, shard: Sequence[Part],
               digest: str, *, nxt: str, nxt_key: bytes | None, results: str,
               results_key: bytes | None, exact: bool, epoch: int) -> tuple[Future, Future]:
        """Send one stage's shard (the parts of its bytes, in order) and wiring to a node.
        Two futures: the node is ready; every chunk is with ZeroMQ (or the upload ended early).
        A node that already runs this very shard (a restarted master found it) keeps it: it is
        only rewired. What a node holds is noted as it is ready, and forgotten if it fails."""
        ready: Future = Future()
        sent: Future = Future()
        ready.add_done_callback(lambda _: settle(sent, None))  # lost or refused: no more sent
        chunks = chunked(shard, CHUNK_BYTES)  # read as sent: a shard is not copied again here
        sent.add_done_callback(lambda _: chunks.clear())  # (now, not when GC breaks the cycle)
        size, head = sum(map(len, shard)), len(shard[0])
        reuse = handle.holds == (stage, digest, exact)
        # noted when ready: a deploy that fails at another node has still replaced this one's
        ready.add_done_callback(lambda f: setattr(
            handle, "holds", (stage, digest, exact) if f.exception() is None else None))

        def begin() -> None:
            if handle.lost:  # lost since the deploy began: nothing would ever settle `ready`
                return settle(ready, ClusterError(f"node {handle.name} was lost"))
            handle.waiters.setdefault("ready", []).append(ready)
            if not self.send(handle, encode("deploy_begin", {
                "stage": stage, "stages": stages, "sha256": digest, "size": size,
                "inputs": [], "outputs": [], "next": nxt, "results": results,
                "exact": exact, "epoch": epoch, "next_key": (nxt_key or b"").decode(),
                "results_key": (results_key or b"").decode(),
                "reuse": reuse, "head": head,
            })):
                settle(ready, ClusterError(f"node {handle.name} takes no messages (is it hung?)"))
            elif not reuse:
                self.put(lambda: send_chunks(0))
            else:
                settle(sent, None)

        def send_chunks(i: int) -> None:
            if ready.done():  # the node was lost or refused: stop uploading
                return
            for j, (off, read) in enumerate(chunks[i:i + _CHUNKS_PER_TURN], start=i):
                try:
                    data = read()
                except ClusterError as exc:  # the model's data file changed or went away
                    return settle(ready, exc)
                if not self.send(handle, encode("deploy_chunk", {"offset": off}, payload=data)):
                    self.retry(functools.partial(send_chunks, j))  # a full queue: tried later
                    return
                # Taking chunks it is alive, its answers late on a busy host: loading, for now
                handle.loading_until = max(handle.loading_until, time.time() + self.lost_after_s)
                self.bus.publish(ev.ShardProgress(t=time.time(), node_id=handle.node_id,
                                                  stage=stage, sent_bytes=off + len(data),
                                                  total_bytes=size))
            if i + _CHUNKS_PER_TURN < len(chunks):
                self.put(lambda: send_chunks(i + _CHUNKS_PER_TURN))
            else:
                end()

        def end() -> None:
            if ready.done():
                return
            if self.send(handle, encode("deploy_end", {"sha256": digest})):
                settle(sent, None)  # (its "building" will say it has them all)
            else:
                self.retry(end)

        self.put(begin)
        return ready, sent

    def record_stages(self, handles: Sequence[NodeHandle], digests: Sequence[str],
                      exact: bool) -> None:
        """Note which node runs which stage now that a deploy is ready (on the control thread,
        which alone writes handles)."""
        def record() -> None:
            for i, handle in enumerate(handles):
                handle.stage = i
                handle.holds = (i, digests[i], exact)
            self._stage_nodes = [h.node_id for h in handles]

        self.put(record)

    def send_to_stages(self, frames: list) -> None:
        """Send `frames` to every live node that runs a stage."""
        def send() -> None:
            for handle in list(self.nodes.values()):
                if not handle.lost and handle.stage is not None and handle.stage >= 0:
                    self.send(handle, list(frames))

        self.put(send)
