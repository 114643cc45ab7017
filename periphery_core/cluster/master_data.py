"""The master's data path: requests into the first stage, results out of the last.

`submit` sends to the first stage's PULL socket under a lock (the PUSH sockets are shared by
every submitting thread); the results thread owns the PULL socket the last stage sends to.
With replicas, each has a first stage of its own, and a request goes to the replica with the
fewest requests in flight: a slower replica gets fewer, and none waits while another idles
(ZeroMQ's own round robin would give each the same share, so the slowest would set the pace).
A decoder's sequence keeps its KV caches on the stages of one replica, so its steps all go to
the replica its first step went to (the one with the fewest sequences then, in turn among
equals), until it is released or a redeploy drops every cache.
Requests carry ids end to end, and each stage appends its timestamps, from which
`stage_timings` derives per-stage queue, compute and transfer times.

Each deploy starts an epoch; activations and results carry it, so whatever an old pipeline
still delivers after a redeploy is dropped, and replayed requests complete exactly once. A
request stays pending, with its feeds, until its result arrives: after a lost node the
pipeline is redeployed and every pending request replayed into it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.futures import settle
from periphery_core.cluster.keys import Guard
from periphery_core.cluster.same_host import bind_private, is_ipc
from periphery_core.errors import ClusterBusy, ClusterError, RequestFailed
from periphery_core.wire import Limits, WireError, decode, encode
from periphery_core.wire.shm import ShmReader, ShmWriter

log = logging.getLogger("periphery.master")


@dataclass
class _Pending:
    future: Future
    t_submit: float
    feeds: Mapping[str, np.ndarray]  # kept until the result arrives, to replay after a loss
    step: Mapping[str, Any] | None = None  # a decoder step: seq, pos, new (or seqs, poss)
    replica: int = 0  # the replica it was last sent to


class DataPath:
    """Requests in flight, the socket to the first stage and the results socket.

    Args:
        ctx, guard: The master's ZeroMQ context and its key guard.
        bus: Where completed and failed requests are published.
        limits: What a result message may declare, checked by `decode`.
        host: The address the results socket binds to (a random port).
        same_host_ipc: Bind the results socket also on a private Unix socket for nodes on
            this host (same_host.py); `private` is its folder then (None: TCP only).
        max_pending: Requests in flight at most; `submit` refuses more.
        stop: Set when the master closes; ends the results loop and any waiting send.
    """

    def __init__(self, *, ctx: zmq.Context, guard: Guard, bus: EventBus, limits: Limits,
                 host: str, max_pending: int, stop: threading.Event,
                 same_host_ipc: bool = True) -> None:
        self.ctx = ctx
        self.guard = guard
        self.bus = bus
        self.limits = limits
        self.max_pending = max_pending
        self._stop = stop
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._first: list[zmq.Socket] = []  # each replica's first stage
        # ... and its shared memory, where that stage is on this host (wire/shm.py)
        self._first_shm: list[ShmWriter | None] = []
        self._shm = ShmReader()  # results a last stage on this host left in shared memory
        self._inflight: list[int] = []  # requests in flight per replica (under _pending_lock)
        self._owner: dict[int, int] = {}  # a decoder sequence's replica (under _pending_lock)
        self._turn = 0  # where the next new sequence starts looking (sequences in turn)
        self.epoch = 0
        # Cleared while a recovery runs, holding new submissions back.
        self._open = threading.Event()
        self._open.set()
        self.results = self.guard.server(self.ctx.socket(zmq.PULL), admit="nodes")
        self.results.setsockopt(zmq.LINGER, 0)
        port = self.results.bind_to_random_port(f"tcp://{host}")
        self.results_endpoint = f"tcp://{host}:{port}"
        self.private, self.results_ipc = bind_private(self.results, "results") \
            if same_host_ipc else (None, "")

    def close_shm(self) -> None:
        """Give back the shared memory of the links to first stages, and drop the mappings of
        the slots last stages sent results in (the master closes)."""
        with self._send_lock:
            self._close_shm()
        self._shm.clear()

    def _close_shm(self) -> None:  # (under _send_lock)
        for writer in self._first_shm:
            if writer is not None:
                writer.close()
        self._first_shm = [None] * len(self._first_shm)

    def new_epoch(self) -> int:
        """Start the epoch of a new deploy: results of the old one are dropped from now on."""
        with self._pending_lock:
            self.epoch += 1
            self._owner.clear()  # a deploy starts every stage without caches
            return self.epoch

    def connect_first(self, endpoints: list[tuple[str, bytes | None]]) -> None:
        """Send requests to these first stages (one per replica; endpoint, key) from now on."""
        socks = []
        for endpoint, key in endpoints:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 8)
            self.guard.connect(sock, endpoint, key, "nodes")
            socks.append(sock)
        with self._send_lock:
            for old in self._first:
                old.close(linger=0)
            self._close_shm()
            self._first = socks
            self._first_shm = [ShmWriter() if is_ipc(e) else None for e, _ in endpoints]
            with self._pending_lock:
                self._inflight = [0] * len(socks)

    def submit(self, feeds: Mapping[str, np.ndarray],
               step: Mapping[str, Any] | None = None) -> Future:
        """Send one request into the pipeline (see `Master.submit`)."""
        if not self._first:
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
            pending = self._pending[rid] = _Pending(future, time.time(), feeds, step)
            self._assign(pending)
            epoch = self.epoch
        self._send(rid, pending, lambda: not self._open.is_set() or self.epoch != epoch)
        future.request_id = rid  # type: ignore[attr-defined]
        return future

    def _assign(self, pending: _Pending) -> None:
        """Give the request to the replica with the fewest in flight, or a decoder step to
        the replica that holds its sequences' caches (under _pending_lock)."""
        if not self._inflight:
            return
        step = pending.step or {}
        seqs = step["seqs"] if "seqs" in step else [step["seq"]] if "seq" in step else []
        owned = [self._owner[s] for s in seqs if s in self._owner]
        if owned:
            pending.replica = owned[0]
        elif seqs:  # a new sequence: the replica holding the fewest, in turn among equals
            held = [0] * len(self._inflight)
            for r in self._owner.values():
                held[r % len(held)] += 1
            fewest = [r for r in range(len(held)) if held[r] == min(held)]
            pending.replica = next((r for r in fewest if r >= self._turn), fewest[0])
            self._turn = pending.replica + 1
        else:
            pending.replica = min(range(len(self._inflight)), key=self._inflight.__getitem__)
        for s in seqs:
            self._owner.setdefault(s, pending.replica)
        self._inflight[pending.replica % len(self._inflight)] += 1

    def replica_of(self, seq: int) -> int | None:
        """The replica that holds a decoder sequence's caches (None: none yet)."""
        with self._pending_lock:
            return self._owner.get(seq)

    def sequences(self) -> int:
        """Decoder sequences whose caches the stages hold (started and not released)."""
        with self._pending_lock:
            return len(self._owner)

    def forget(self, seqs: list[int]) -> None:
        """These sequences ended: their next use starts afresh."""
        with self._pending_lock:
            for s in seqs:
                self._owner.pop(s, None)

    def _send(self, rid: int, pending: _Pending, abandon: Callable[[], bool]) -> None:
        """Send one request to its replica's first stage, waiting while it is full
        (backpressure).

        Gives up, leaving the request pending, when `abandon()` says a recovery has begun or
        the pipeline changed (the recovery replays it), or when the request no longer waits
        (it failed): a send to a dead first stage must never hold the lock a redeploy needs.
        """
        with self._send_lock:
            if not self._first:
                raise ClusterError("nothing is deployed: deploy a plan first")
            first = self._first[pending.replica % len(self._first)]
            frames = encode("activation", {"id": rid, "times": [], "epoch": self.epoch,
                                           **(pending.step or {})}, pending.feeds,
                            shm=self._first_shm[pending.replica % len(self._first)])
            while not self._stop.is_set():
                try:  # at once: the first stage mostly has room (a poll first cost a pass)
                    first.send_multipart(frames, zmq.NOBLOCK, copy=False)
                    return
                except zmq.Again:
                    if first.poll(100, zmq.POLLOUT):
                        continue
                with self._pending_lock:
                    waiting = rid in self._pending
                if not waiting or abandon():
                    return

    def pending_count(self) -> int:
        """Requests sent and still waiting for their result."""
        with self._pending_lock:
            return len(self._pending)

    def hold(self) -> None:
        """Hold new submissions back (a recovery is starting)."""
        self._open.clear()

    def release(self) -> None:
        """Let submissions through again."""
        self._open.set()

    def replay(self) -> int:
        """Send every request still waiting for its result into the current pipeline again."""
        with self._pending_lock:
            waiting = sorted(self._pending.items())
            self._inflight = [0] * len(self._inflight)
            for _, p in waiting:
                self._assign(p)
        epoch = self.epoch
        for rid, p in waiting:
            self._send(rid, p, lambda: self.epoch != epoch)
        return len(waiting)

    def fail_pending(self, reason: str) -> None:
        """Fail every request in flight with `reason`, publishing each failure."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
            self._inflight = [0] * len(self._inflight)
        for rid, p in pending.items():
            if not p.future.done():
                settle(p.future, RequestFailed(reason))
                self.bus.publish(ev.RequestFailed(t=time.time(), request_id=str(rid), stage=None,
                                                  reason=reason))

    def drop_pending(self, error: RequestFailed) -> None:
        """Fail every request in flight with `error`, quietly: the master is closing."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            settle(p.future, error)

    def run(self) -> None:
        """The results thread's loop: settle each request's future as its result arrives."""
        # One blocking receive that gives up after 100 ms to look at the stop flag: a poll
        # before each receive cost a second pass through ZeroMQ per result.
        self.results.setsockopt(zmq.RCVTIMEO, 100)
        while not self._stop.is_set():
            try:
                frames = self.results.recv_multipart(copy=False)
            except zmq.ZMQError:  # (zmq.Again: nothing within 100 ms)
                continue
            t_done = time.time()
            try:
                msg = decode(frames, self.limits, self._shm)
                msg.keep()  # the caller's to keep, whatever held the bytes
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
                if pending is not None and pending.replica < len(self._inflight):
                    self._inflight[pending.replica] -= 1
            if pending is None:
                log.warning("result for unknown request %r dropped", rid)
                continue
            if msg.kind == "result":
                timings = stage_timings(msg.fields["times"], pending.t_submit, t_done)
                # Bytes each stage sent on (the last stage's to us), where the nodes said.
                pending.future.stage_bytes = tuple(  # type: ignore[attr-defined]
                    int(t[5]) for t in msg.fields["times"] if len(t) > 5)
                # The event before the future: a caller woken by its result then finds this
                # thread back in its receive, not holding the interpreter lock it needs (a
                # second hand-off per request; 2 replicas served 1.015x, K = 2 1.007x, the
                # medians of 8 paired turns).
                self.bus.publish(ev.RequestCompleted(
                    t=t_done, request_id=str(rid), latency_s=t_done - pending.t_submit,
                    stages=timings))
                settle(pending.future, dict(msg.tensors))
            else:
                reason = str(msg.fields.get("reason", "failed"))
                settle(pending.future, RequestFailed(reason))
                stage = msg.fields.get("stage")
                self.bus.publish(ev.RequestFailed(
                    t=t_done, request_id=str(rid), reason=reason,
                    stage=stage if isinstance(stage, int) and stage >= 0 else None))


def submit_batch(submit: Callable[[Mapping[str, np.ndarray]], Future],
                 feeds: Mapping[str, np.ndarray], micro_batch: int) -> Future:
    """Split a batch along axis 0 into micro-batches, `submit` each, join the outputs.

    Only for models whose outputs along the batch axis depend on that row alone (true of
    most inference graphs; not of ones that mix rows, e.g. batch statistics).
    """
    sizes = {int(np.shape(v)[0]) for v in feeds.values() if np.ndim(v) > 0}
    if len(sizes) != 1:
        raise ClusterError("micro-batching needs every input to share its first dimension")
    (batch,) = sizes
    parts = [
        submit({n: v[i:i + micro_batch] if np.ndim(v) > 0 else v for n, v in feeds.items()})
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
