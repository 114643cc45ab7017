"""The master: finds nodes, deploys a plan's shards to them, and streams requests through them.

Threads: a control thread owns one DEALER socket per node (hello, heartbeats, shard uploads,
stats) and runs every control action as a command in its loop, so no socket is shared; a
results thread owns the PULL socket the last stage sends to; `submit` sends to the first stage
under a lock. Requests carry ids end to end; each stage appends its timestamps, from which the
master derives per-stage queue, compute and transfer times. Everything observable is published
as typed events (see `events.py`) on an `EventBus` (`bus.py`), which the CLI and the app fold
into state.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.keys import Guard, KeyRing
from periphery_core.cluster.speeds import NodeSpeed, parse_speed, planning_speeds
from periphery_core.discovery import NodeAddress
from periphery_core.errors import ClusterBusy, ClusterError, RequestFailed
from periphery_core.partition.plan import DEFAULT_BANDWIDTH, DeviceSpec
from periphery_core.wire import Limits, Message, WireError, decode, encode

log = logging.getLogger("periphery.master")

CHUNK_BYTES = 1 << 20
_FROM_NODES = frozenset({"info", "pong", "ready", "error", "stats"})  # on the control socket


def _settle(future: Future, value: Any) -> None:
    """Resolve a future unless it is already done (a caller may have cancelled it)."""
    if future.done():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled between the check and here
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


@dataclass
class NodeHandle:
    """What the master knows of one node."""

    address: NodeAddress
    node_id: str = ""
    name: str = ""
    device: str = ""
    data_endpoint: str = ""
    cores: int = 0
    memory: int = 0
    free_memory: int = 0
    speed: float | None = None  # None: not measured yet
    rtt_s: float | None = None
    bandwidth: float | None = None
    last_seen: float = 0.0
    lost: bool = False
    stage: int | None = None
    key: bytes | None = None  # the node's CurveZMQ public key (None: insecure)
    holds: tuple[int, str, bool] | None = None  # (stage, sha256, exact) the node already runs
    master_silent_s: float = 0.0  # how long the node had heard from no master, at hello
    socket: Any = None
    waiters: dict[str, list[Future]] = field(default_factory=dict)


@dataclass
class _Pending:
    future: Future
    t_submit: float
    feeds: Mapping[str, np.ndarray]  # kept until the result arrives, to replay after a loss
    step: Mapping[str, Any] | None = None  # a decoder step: seq, pos, new (or seqs, poss)


class Master:
    """Connects to nodes, deploys shards and runs requests through the pipeline."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        heartbeat_s: float = 0.5,
        lost_after_s: float = 2.5,  # + one heartbeat period: a lost node is known within 3 s
        bus: EventBus | None = None,
        limits: Limits | None = None,
        keys: KeyRing | None = None,
        max_pending: int = 1024,
    ) -> None:
        self.host = host
        self.max_pending = max_pending
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.bus = bus or EventBus()
        self.limits = limits or Limits()
        self.ctx = zmq.Context()
        self.guard = Guard(self.ctx, keys, "master")
        self.nodes: dict[str, NodeHandle] = {}
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._first: zmq.Socket | None = None
        self._stage_nodes: list[str] = []
        # Each deploy starts an epoch; activations and results carry it, so whatever an old
        # pipeline still delivers after a redeploy is dropped, and replayed requests complete
        # exactly once.
        self.epoch = 0
        # With `keep_on_loss`, requests survive a lost node to be replayed (see Pipeline);
        # `_open` is cleared while a recovery runs, holding new submissions back.
        self.keep_on_loss = False
        self._open = threading.Event()
        self._open.set()
        self._handles_by_socket: dict[Any, NodeHandle] = {}  # owned by the control thread
        # Set when a thread of the master died despite its guards: every later call says so
        # instead of waiting on a loop that no longer runs.
        self.failure: str | None = None
        self.results = self.guard.server(self.ctx.socket(zmq.PULL), admit="nodes")
        self.results.setsockopt(zmq.LINGER, 0)
        port = self.results.bind_to_random_port(f"tcp://{host}")
        self.results_endpoint = f"tcp://{host}:{port}"
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._control_loop, "control"),
                             name="master-control", daemon=True),
            threading.Thread(target=self._guarded, args=(self._results_loop, "results"),
                             name="master-results", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            _settle(p.future, RequestFailed("the master was closed"))
        for handle in list(self.nodes.values()) + list(self._handles_by_socket.values()):
            for waiters in handle.waiters.values():  # a deploy or ping waiting: wake it now
                for f in waiters:
                    _settle(f, ClusterError("the master was closed"))
        self.guard.close()
        self.ctx.destroy(linger=0)

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guarded(self, loop: Callable[[], None], name: str) -> None:
        """Run a thread's loop; if it dies anyway, say so and fail what waits on it."""
        try:
            loop()
        except BaseException as exc:
            self.failure = f"the master's {name} thread stopped: {type(exc).__name__}: {exc}"
            log.error("%s", self.failure, exc_info=True)
            self.fail_pending(self.failure)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise ClusterError(f"{self.failure}; restart the master")
        if self._stop.is_set():
            raise ClusterError("the master was closed")

    def alive_nodes(self) -> list[NodeHandle]:
        """The connected nodes not lost, in the order they joined (a snapshot)."""
        return [h for h in list(self.nodes.values()) if not h.lost]

    @staticmethod
    def _control_send(handle: NodeHandle, frames: list) -> bool:
        """Send to a node without ever blocking the control thread.

        False when the node's queue is full (a hung or dead node) or its socket failed: the
        caller decides; heartbeats just skip a beat, and silence marks the node lost.
        """
        try:
            handle.socket.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.debug("send to node %s failed: %s", handle.name or handle.address.host, exc)
            return False

    # ------------------------------------------------------------------ nodes

    def connect(self, address: NodeAddress, timeout: float = 5.0) -> NodeHandle:
        """Say hello to a node and wait for its description.

        Raises:
            ClusterError: the node does not answer in time.
        """
        reply: Future = Future()
        # With keys, a node's public key comes from its mDNS record; a static peer's is not
        # known, so one connection per allowed key is tried and the one that answers is kept.
        candidates = self.guard.candidates(address.properties.get("key"))
        tried: list[NodeHandle] = []

        def start() -> None:
            for key in candidates:
                sock = self.guard.client(self.ctx.socket(zmq.DEALER), key, "nodes")
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 64)
                sock.connect(f"tcp://{address.host}:{address.port}")
                handle = NodeHandle(address=address, socket=sock, last_seen=time.time(), key=key)
                handle.waiters.setdefault("info", []).append(reply)
                self._handles_by_socket[sock] = handle
                tried.append(handle)
                self._control_send(handle, encode("hello", {"master": self.results_endpoint}))

        def forget_others(keep: NodeHandle | None) -> None:
            for h in tried:
                if h is not keep:
                    self._handles_by_socket.pop(h.socket, None)
                    h.socket.close(linger=0)

        self._check_alive()
        self._commands.put(start)
        try:
            handle: NodeHandle = reply.result(timeout=timeout)
        except TimeoutError:
            self._commands.put(lambda: forget_others(None))
            hint = (" and that its keys allow this master" if self.guard.secure
                    else " (or does it need keys? this master runs --insecure)")
            raise ClusterError(f"node {address.host}:{address.port} did not answer within "
                               f"{timeout:.0f} s: check that periphery-node runs there{hint}"
                               ) from None
        self._commands.put(lambda: forget_others(handle))
        self._measure_link(handle)
        self.bus.publish(self._joined(handle))
        return handle

    @staticmethod
    def _joined(handle: NodeHandle) -> ev.NodeJoined:
        a = handle.address
        return ev.NodeJoined(
            t=time.time(), node_id=handle.node_id, name=handle.name, host=a.host, port=a.port,
            device=handle.device, cores=handle.cores, memory_bytes=handle.memory,
            speed=handle.speed, rtt_s=handle.rtt_s, bandwidth=handle.bandwidth)

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
            if not self._control_send(handle, encode("ping", {"t": time.time()},
                                                     payload=payload)):
                _settle(reply, ClusterError(f"node {handle.name} takes no messages"))

        self._commands.put(send)
        reply.result(timeout=5)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ control thread

    def _control_loop(self) -> None:
        next_beat = time.time()
        while not self._stop.is_set():
            try:
                next_beat = self._control_turn(next_beat)
            except Exception:  # one failing send, receive or command never ends the loop
                log.exception("master control loop")
                time.sleep(0.01)
        for sock in self._handles_by_socket:
            sock.close(linger=0)

    def _control_turn(self, next_beat: float) -> float:
        """One turn of the control loop: commands, then node messages, then heartbeats."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                command()
            except Exception:
                log.exception("master control command")
        socks = list(self._handles_by_socket)
        if not socks:
            time.sleep(0.005)
        else:
            poller = zmq.Poller()
            for s in socks:
                poller.register(s, zmq.POLLIN)
            for sock, _ in poller.poll(5):
                handle = self._handles_by_socket.get(sock)
                while handle is not None:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        msg = decode(frames, self.limits)  # checks every field it reads
                        if msg.kind not in _FROM_NODES:
                            raise WireError(f"'{msg.kind}' is not a message nodes send")
                    except WireError as exc:  # rejected whole: nothing of it is kept
                        log.warning("rejected message from node %s: %s",
                                    handle.name or handle.address.host, exc)
                        continue
                    try:
                        self._on_control(handle, msg)
                    except Exception:  # a bug with one message: drop it, read the next
                        log.exception("message from node %s dropped", handle.name)
        now = time.time()
        if now >= next_beat:
            next_beat = now + self.heartbeat_s
            self._heartbeat(now)
        return next_beat

    def _heartbeat(self, now: float) -> None:
        for handle in list(self._handles_by_socket.values()):
            if not handle.node_id:
                continue
            if handle.lost:  # keep asking: a node that answers again can rejoin
                self._control_send(handle, encode("ping", {"t": now}))
                continue
            if now - handle.last_seen > self.lost_after_s:
                handle.lost = True
                reason = f"no answer for {now - handle.last_seen:.1f} s"
                log.warning("node %s lost: %s", handle.name, reason)
                self.bus.publish(ev.NodeLost(t=now, node_id=handle.node_id, reason=reason))
                for waiters in handle.waiters.values():
                    for f in waiters:
                        _settle(f, ClusterError(f"node {handle.name} was lost"))
                handle.waiters.clear()
                if handle.node_id in self._stage_nodes and not self.keep_on_loss:
                    self.fail_pending(f"node {handle.name} (stage "
                                   f"{self._stage_nodes.index(handle.node_id)}) was lost")
                continue
            self._control_send(handle, encode("ping", {"t": now}))

    def _resolve(self, handle: NodeHandle, kind: str, value: Any) -> bool:
        waiters = handle.waiters.get(kind)
        while waiters and waiters[0].done():  # shared by several candidate connections
            waiters.pop(0)
        if waiters:
            _settle(waiters.pop(0), value)
            return True
        return False

    def _on_control(self, handle: NodeHandle, msg: Message) -> None:
        """Act on one message from a node. `decode` has checked the type and range of every
        field read here (wire/protocol.py), so none of these conversions can fail half-way."""
        handle.last_seen = time.time()
        f = msg.fields
        if handle.lost and handle.node_id and msg.kind in ("pong", "stats"):
            handle.lost = False  # it answers again: usable by the next plan
            log.info("node %s is back", handle.name)
            self.bus.publish(self._joined(handle))
        if msg.kind == "info":
            handle.node_id, handle.name = str(f["node"]), str(f.get("name", f["node"]))
            handle.device, handle.data_endpoint = str(f["device"]), str(f["data"])
            handle.cores, handle.memory = int(f["cores"]), int(f["memory"])
            handle.free_memory = int(f.get("free", 0) or 0)
            held = (f.get("stage"), f.get("sha256"))
            handle.holds = (int(held[0]), str(held[1]), bool(f.get("exact", True))) \
                if isinstance(held[0], int) and held[0] >= 0 and held[1] else None
            handle.master_silent_s = float(f.get("master_silent_s", 0.0) or 0.0)
            handle.speed = parse_speed(f.get("speed"))
            if handle.lost:
                handle.lost = False
            self.nodes[handle.node_id] = handle
            self._resolve(handle, "info", handle)
        elif msg.kind == "pong":
            self._resolve(handle, "pong", f["t"])
        elif msg.kind == "ready":
            self._resolve(handle, "ready", f)
        elif msg.kind == "error":
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
                gpu_percent=None, speed=speed, kv_bytes=f.get("kv"), sequences=f.get("seqs"),
            ))

    # ------------------------------------------------------------------ deploy

    def deploy(
        self,
        shards: Sequence[bytes],
        assignment: Sequence[str],
        *,
        exact: bool = True,
        timeout: float = 120.0,
    ) -> None:
        """Ship shard i to node `assignment[i]`, wire the stages in order, wait until all ready.

        Raises:
            ClusterError: an unknown or lost node, a refused shard, or a timeout.
        """
        if len(shards) != len(assignment):
            raise ClusterError(f"{len(shards)} shards but {len(assignment)} nodes assigned")
        if len(set(assignment)) != len(assignment):
            raise ClusterError("each stage needs a node of its own")
        self._check_alive()
        handles = []
        for node_id in assignment:
            handle = self.nodes.get(node_id)
            if handle is None or handle.lost:
                raise ClusterError(f"node {node_id[:12]} is not connected")
            handles.append(handle)
        self.bus.publish(ev.DeployStarted(t=time.time(), plan_stages=len(shards),
                                          assignment=tuple(assignment)))
        with self._pending_lock:
            self.epoch += 1
        readies: list[Future] = []
        own = self.guard.ring.public if self.guard.ring else None
        digests = [hashlib.sha256(shard).hexdigest() for shard in shards]
        for i, (shard, handle) in enumerate(zip(shards, handles, strict=True)):
            last = i + 1 == len(handles)
            nxt = self.results_endpoint if last else handles[i + 1].data_endpoint
            nxt_key = own if last else handles[i + 1].key
            readies.append(self._upload(handle, i, len(shards), shard, digests[i], nxt,
                                        nxt_key, exact))
        deadline = time.time() + timeout
        for i, (ready, handle) in enumerate(zip(readies, handles, strict=True)):
            try:
                info = ready.result(timeout=max(0.0, deadline - time.time()))
            except TimeoutError:
                error = ClusterError(f"stage {i} on {handle.name} was not ready within "
                                     f"{timeout:.0f} s")
                self.bus.publish(ev.DeployFailed(t=time.time(), node_id=handle.node_id,
                                                 stage=i, reason=error.message))
                raise error from None
            except ClusterError as exc:
                self.bus.publish(ev.DeployFailed(t=time.time(), node_id=handle.node_id,
                                                 stage=i, reason=exc.message))
                raise
            self.bus.publish(ev.StageReady(t=time.time(), node_id=handle.node_id, stage=i,
                                           provider=str(info.get("provider", "?"))))
        def record() -> None:  # node handles are written by the control thread only
            for i, handle in enumerate(handles):
                handle.stage = i
                handle.holds = (i, digests[i], exact)
            self._stage_nodes = list(assignment)

        self._commands.put(record)

        def connect_first() -> zmq.Socket:
            sock = self.guard.client(self.ctx.socket(zmq.PUSH), handles[0].key, "nodes")
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 8)
            sock.connect(handles[0].data_endpoint)
            return sock

        with self._send_lock:
            if self._first is not None:
                self._first.close(linger=0)
            self._first = connect_first()
        self.bus.publish(ev.DeployFinished(t=time.time()))

    def _upload(self, handle: NodeHandle, stage: int, stages: int, shard: bytes, digest: str,
                nxt: str, nxt_key: bytes | None, exact: bool) -> Future:
        ready: Future = Future()
        chunks = [(off, shard[off:off + CHUNK_BYTES]) for off in range(0, len(shard), CHUNK_BYTES)]
        # A node that already runs this very shard (a restarted master found it) keeps it:
        # it is only rewired, nothing is uploaded again.
        reuse = handle.holds == (stage, digest, exact)

        def refused() -> None:
            _settle(ready, ClusterError(f"node {handle.name} takes no messages (is it hung?)"))

        def begin() -> None:
            handle.waiters.setdefault("ready", []).append(ready)
            if not self._control_send(handle, encode("deploy_begin", {
                "stage": stage, "stages": stages, "sha256": digest, "size": len(shard),
                "inputs": [], "outputs": [], "next": nxt, "results": self.results_endpoint,
                "exact": exact, "epoch": self.epoch, "next_key": (nxt_key or b"").decode(),
                "results_key": (self.guard.ring.public if self.guard.ring else b"").decode(),
                "reuse": reuse,
            })):
                refused()
            elif not reuse:
                self._commands.put(lambda: send_chunks(0))

        def send_chunks(i: int) -> None:
            if ready.done():  # the node was lost or refused: stop uploading
                return
            # A few chunks per loop turn, so heartbeats keep flowing during big uploads; a
            # full queue is retried on a later turn.
            for j in range(i, min(i + 4, len(chunks))):
                off, data = chunks[j]
                if not self._control_send(
                        handle, encode("deploy_chunk", {"offset": off}, payload=data)):
                    self._commands.put(functools.partial(send_chunks, j))
                    return
                self.bus.publish(ev.ShardProgress(
                    t=time.time(), node_id=handle.node_id, stage=stage,
                    sent_bytes=off + len(data), total_bytes=len(shard)))
            if i + 4 < len(chunks):
                self._commands.put(lambda: send_chunks(i + 4))
            else:
                end()

        def end() -> None:
            if not ready.done() and not self._control_send(
                    handle, encode("deploy_end", {"sha256": digest})):
                self._commands.put(end)

        self._commands.put(begin)
        return ready

    # ------------------------------------------------------------------ requests

    def submit(self, feeds: Mapping[str, np.ndarray],
               step: Mapping[str, Any] | None = None) -> Future:
        """Send one request into the pipeline; the future resolves to its outputs by name.

        `step` ({"seq", "pos", "new"}) makes it one step of a decoder's sequence, for stages
        that keep KV caches (generate.stateful); {"seqs", "poss"} a decode step of several
        sequences batched into one run, a row each."""
        self._check_alive()
        if self._first is None:
            raise ClusterError("nothing is deployed: deploy a plan first")
        future: Future = Future()
        while not self._open.wait(0.1):  # a recovery is running: wait for the new pipeline
            if self._stop.is_set():
                raise ClusterError("the master was closed")
        with self._pending_lock:
            if len(self._pending) >= self.max_pending:
                raise ClusterBusy(f"busy: {len(self._pending)} requests are in flight (the "
                                  f"limit is {self.max_pending}); wait for results first")
            rid = next(self._ids)
            self._pending[rid] = _Pending(future, time.time(), feeds, step)
            epoch = self.epoch
        self._send(rid, feeds, lambda: not self._open.is_set() or self.epoch != epoch, step)
        future.request_id = rid  # type: ignore[attr-defined]
        return future

    def _send(self, rid: int, feeds: Mapping[str, np.ndarray],
              abandon: Callable[[], bool], step: Mapping[str, Any] | None = None) -> None:
        """Send one request to the first stage, waiting while it is full (backpressure).

        Gives up, leaving the request pending, when `abandon()` says a recovery has begun or
        the pipeline changed (the recovery replays it), or when the request no longer waits
        (it failed): a send to a dead first stage must never hold the lock a redeploy needs.
        """
        with self._send_lock:
            frames = encode("activation", {"id": rid, "times": [], "epoch": self.epoch,
                                           **(step or {})}, feeds)
            if self._first is None:
                raise ClusterError("nothing is deployed: deploy a plan first")
            while not self._stop.is_set():
                if self._first.poll(100, zmq.POLLOUT):
                    self._first.send_multipart(frames, copy=False)
                    return
                with self._pending_lock:
                    waiting = rid in self._pending
                if not waiting or abandon():
                    return

    def release_sequences(self, seqs: Sequence[int]) -> None:
        """Tell every stage that these decoder sequences ended: their caches may go."""
        if not seqs:
            return
        frames = encode("release", {"seqs": [int(s) for s in seqs]})

        def send() -> None:  # control sockets belong to the control thread
            for handle in self.alive_nodes():
                if handle.stage is not None and handle.stage >= 0:
                    self._control_send(handle, list(frames))

        self._commands.put(send)

    def pending_count(self) -> int:
        """Requests sent and still waiting for their result."""
        with self._pending_lock:
            return len(self._pending)

    def hold(self) -> None:
        """Hold new submissions back (a recovery is starting)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def replay(self) -> int:
        """Send every request still waiting for its result into the current pipeline again."""
        with self._pending_lock:
            waiting = sorted(((rid, p.feeds, p.step) for rid, p in self._pending.items()),
                             key=lambda w: w[0])
        epoch = self.epoch
        for rid, feeds, step in waiting:
            self._send(rid, feeds, lambda: self.epoch != epoch, step)
        return len(waiting)

    def submit_batch(self, feeds: Mapping[str, np.ndarray], micro_batch: int) -> Future:
        """Split a batch along axis 0 into micro-batches, pipeline them, join the outputs.

        Only for models whose outputs along the batch axis depend on that row alone (true of
        most inference graphs; not of ones that mix rows, e.g. batch statistics).
        """
        sizes = {int(np.shape(v)[0]) for v in feeds.values() if np.ndim(v) > 0}
        if len(sizes) != 1:
            raise ClusterError("micro-batching needs every input to share its first dimension")
        (batch,) = sizes
        parts = [
            self.submit({n: v[i:i + micro_batch] if np.ndim(v) > 0 else v
                         for n, v in feeds.items()})
            for i in range(0, batch, max(1, micro_batch))
        ]
        joined: Future = Future()

        def gather(_: Future) -> None:
            if joined.done() or not all(p.done() for p in parts):
                return
            try:
                outs = [p.result() for p in parts]
                joined.set_result({n: np.concatenate([o[n] for o in outs]) for n in outs[0]})
            except BaseException as exc:
                if not joined.done():
                    joined.set_exception(exc)

        for p in parts:
            p.add_done_callback(gather)
        return joined

    def devices(self, node_ids: Sequence[str] | None = None) -> list[DeviceSpec]:
        """The planner's description of connected nodes: measured speed, free memory, link."""
        chosen = [self.nodes[i] for i in node_ids] if node_ids else [
            h for h in self.nodes.values() if not h.lost]
        # Measured speeds only when none is unknown and identical machines agree (speeds.py).
        trusted = planning_speeds([NodeSpeed(h.name, h.device, h.cores, h.speed) for h in chosen])
        if trusted.warning:
            log.warning("%s", trusted.warning)
        return [
            DeviceSpec(name=h.name, speed=speed,
                       memory_bytes=int(h.free_memory * 0.8) if h.free_memory else None,
                       bandwidth=h.bandwidth if h.bandwidth else DEFAULT_BANDWIDTH)
            for h, speed in zip(chosen, trusted.speeds, strict=True)
        ]

    def _results_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.results, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(100)):
                continue
            try:
                frames = self.results.recv_multipart(copy=False)
            except zmq.ZMQError:
                continue
            t_done = time.time()
            try:
                msg = decode(frames, self.limits)
                if msg.kind not in ("result", "failure"):
                    raise WireError(f"'{msg.kind}' is not a result")
            except WireError as exc:
                log.warning("bad result message: %s", exc)
                continue
            rid = msg.fields.get("id")
            with self._pending_lock:
                if msg.fields.get("epoch", self.epoch) != self.epoch:
                    continue  # from a pipeline replaced since: the request was replayed
                pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if pending is None:
                log.warning("result for unknown request %r dropped", rid)
                continue
            if msg.kind == "result":
                timings = stage_timings(msg.fields["times"], pending.t_submit, t_done)
                # Bytes each stage sent on (the last stage's to us), where the nodes said.
                pending.future.stage_bytes = tuple(  # type: ignore[attr-defined]
                    int(t[5]) for t in msg.fields["times"] if len(t) > 5)
                _settle(pending.future, dict(msg.tensors))
                self.bus.publish(ev.RequestCompleted(
                    t=t_done, request_id=str(rid), latency_s=t_done - pending.t_submit,
                    stages=timings))
            else:
                reason = str(msg.fields.get("reason", "failed"))
                _settle(pending.future, RequestFailed(reason))
                stage = msg.fields.get("stage")
                self.bus.publish(ev.RequestFailed(
                    t=t_done, request_id=str(rid), reason=reason,
                    stage=stage if isinstance(stage, int) and stage >= 0 else None))

    def fail_pending(self, reason: str) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for rid, p in pending.items():
            if not p.future.done():
                _settle(p.future, RequestFailed(reason))
                self.bus.publish(ev.RequestFailed(t=time.time(), request_id=str(rid), stage=None,
                                                  reason=reason))


def stage_timings(times: Any, t_submit: float, t_done: float) -> tuple[ev.StageTiming, ...]:
    """Per-stage queue, compute and transfer seconds from the stamps each stage appended.

    Each stamp is [stage, received, started, finished, sent]; a stage's transfer time is from
    its send to the next receipt (the master's, for the last stage).
    """
    out = []
    try:
        stamps = [tuple(float(x) for x in s) for s in times]  # (bytes sent may follow)
        for i, (stage, t_recv, t_start, t_end, t_send) in enumerate(s[:5] for s in stamps):
            t_next = stamps[i + 1][1] if i + 1 < len(stamps) else t_done
            out.append(ev.StageTiming(stage=int(stage), queue_s=max(0.0, t_start - t_recv),
                                      compute_s=max(0.0, t_end - t_start),
                                      transfer_s=max(0.0, t_next - t_send)))
    except (TypeError, ValueError):
        return ()
    return tuple(out)
