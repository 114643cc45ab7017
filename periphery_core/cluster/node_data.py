"""A node's data path: receive a request, run it on the node's stage, send its outputs on.

Each worker thread does all of it for one request at a time (`NodeDataPath.run`), so a hop
wakes one thread on each side: with the receiving, computing and sending in threads of their
own, on a host whose cores all compute (pipelined sequences) every hand-off waited for a core,
0.7 ms a step at K = 2 with four sequences. ZeroMQ queues what arrives meanwhile; while the
next stage is full a worker waits to send and stops receiving, which holds the stages before it
back in turn (backpressure), and a new deployment makes it drop what it holds for the old
pipeline (the master replays those). A frame that does not parse is counted and dropped; a
request that fails, fails alone. Over a link to a process of this host, big tensors travel in
the sender's shared memory (wire/shm.py): a worker computes on them where they lie and gives
the slot back once its outputs have gone on.

With several workers (`periphery-node --workers N`) the stage computes that many requests at
once in one ONNX Runtime session (whose `run` is thread-safe): the workers take turns on the
receiving socket and on the sending ones (a lock each: a ZeroMQ socket is used by one thread
at a time) and compute in parallel, each with the node's threads shared out (`run_threads`).
A GPU overlaps one request's copies and kernel launches with another's kernels; many CPU
cores do more work as a few runs of a few threads each than as one run over all of them. A
language model's stage takes its steps one at a time, in the order they came, whatever the
workers (a sequence's caches grow step by step).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import zmq

from periphery_core.cluster.keys import Guard, Role
from periphery_core.cluster.same_host import is_ipc
from periphery_core.errors import PeripheryError, RuntimeFailure
from periphery_core.generate.stateful import StatefulStage
from periphery_core.runtime.chain import StageRunner
from periphery_core.wire import Limits, Message, WireError, decode, encode
from periphery_core.wire.codec import ShmRefused
from periphery_core.wire.protocol import MAX_WORKERS
from periphery_core.wire.shm import ShmReader, ShmWriter

log = logging.getLogger("periphery.node")

POLL_MS = 100
# A poll that returns within this found its request already queued (one it waited for took
# longer: the thread was idle when the request came).
QUEUED_S = 0.0003


_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}
CUDA_WORKERS = 4  # requests a stage on a GPU computes at once unless told


def _on_gpu(device: str) -> bool:
    """Whether this node's runs go to a GPU, as far as its ONNX Runtime build can tell: one
    without CUDA (plain `onnxruntime`) runs `--device cuda` on the CPU, and says so."""
    return device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()


def default_workers(device: str) -> int:
    """Requests a stage computes at once when the node is not told: one on a CPU (a lone
    request keeps every thread), CUDA_WORKERS on a GPU (a lone request loses nothing there)."""
    return CUDA_WORKERS if _on_gpu(device) else 1


def run_threads(threads: int, workers: int, device: str) -> int:
    """ONNX Runtime's intra-op threads for one run when `workers` run at once (0: its default).

    On a CPU the node's threads (every core, when not told) are shared out among the workers,
    at least one each: runs that each ask for every core crowd each other out (measured on 2
    cores: two runs of 2 threads at once serve 0.85x of one run of 2 at a time, two runs of 1
    thread 1.04x, benchmarks/pipeline.py). On a GPU the threads only run what CUDA lacks; they
    stay as told.
    """
    if workers <= 1 or _on_gpu(device):
        return threads
    return max(1, (threads or os.cpu_count() or 1) // workers)


def warm_up(runner: StageRunner) -> None:
    """Run the stage once on zeros (symbolic dims as 1) so the first request is not slow.

    Best effort: a stage whose inputs must agree in ways zeros cannot (cache lengths, say) just
    skips it.
    """
    feeds: dict[str, np.ndarray] = {}
    for i in runner.session.get_inputs():
        dtype = _ORT_DTYPES.get(i.type)
        if i.name not in runner.input_names:
            continue
        if dtype is None:
            return
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in (i.shape or [])]
        feeds[i.name] = np.zeros(shape, dtype=dtype)
    try:
        runner.run(feeds)
    except Exception as exc:  # a warm-up that cannot run is no error
        log.debug("warm-up skipped: %s", exc)


@dataclass
class _Wiring:
    """The data thread's sockets to the next stage and the master (that thread's alone)."""

    dep: Deployment | None = None
    nxt: zmq.Socket | None = None
    results: zmq.Socket | None = None  # the same socket as `nxt` for the last stage
    nxt_shm: ShmWriter | None = None  # `nxt` reaches a process of this host (wire/shm.py)

    def close(self) -> None:
        for sock in (self.nxt, self.results):
            if sock is not None:
                sock.close(linger=0)
        self.nxt = self.results = None
        if self.nxt_shm is not None:
            self.nxt_shm.close()
            self.nxt_shm = None


@dataclass
class Deployment:
    """The stage a node runs and where its outputs go (made by the control thread)."""

    stage: int
    runner: StageRunner | StatefulStage
    next_endpoint: str
    results_endpoint: str
    provider: str
    next_key: bytes | None = None
    results_key: bytes | None = None
    epoch: int = 0
    sha256: str = ""
    exact: bool = True



def arrival(msg: Message, t_free: float, t_taken: float) -> float:
    """When a request reached this node, for its queue and transfer times.

    The thread takes a request only when it is free, so a request that came while it computed
    waited in ZeroMQ's queue, and its arrival was not seen. One that the thread waited for
    (the poll did not return at once) arrived when it was taken. One that was already there
    arrived after the stage before it sent it and before the thread was free: its wait from
    that send counts as queue, not transfer (its transfer overlapped this stage's compute and
    cost the pipeline nothing); from the master, whose send is not stamped, from when the
    thread was free.
    """
    if t_taken - t_free > QUEUED_S:
        return t_taken
    times = msg.fields.get("times")
    try:
        sent = float(times[-1][4]) if times else t_free
    except (TypeError, ValueError, IndexError):
        sent = t_free
    return sent if sent <= t_free else t_taken  # sent after the thread was free: just came


class NodeDataPath:
    """A node's data socket and the stage it runs.

    Args:
        ctx: the node's ZeroMQ context.
        guard: the node's CurveZMQ guard (who may connect, and its keys for connecting).
        pull: the bound socket requests arrive on.
        limits: what a message may hold.
        queue_depth: the high-water mark of the sockets to the next stage.
        stop: set when the node stops.
        workers: requests computed at once (threads taking turns on the sockets).
    """

    def __init__(self, ctx: zmq.Context, guard: Guard, pull: zmq.Socket, limits: Limits,
                 queue_depth: int, stop: threading.Event, workers: int = 1) -> None:
        self.ctx, self.guard, self.pull = ctx, guard, pull
        self._limits, self._queue_depth, self._stop = limits, queue_depth, stop
        self.workers = max(1, min(workers, MAX_WORKERS))
        self.deployment: Deployment | None = None
        self.rejected = 0  # data frames that did not parse
        self._holding = 0  # requests the workers hold (under _count_lock)
        self._count_lock = threading.Lock()
        self._receiving = threading.Lock()  # the PULL socket, one worker at a time
        self._sending = threading.Lock()  # the wiring and its sockets, one worker at a time
        self._wiring = _Wiring()
        self._ending = threading.Event()  # set when a worker has ended: the others end too
        # Set by a new deployment until the thread has wired to it: what it holds until then
        # belongs to the old pipeline, whose next stage may be unreachable.
        self._rewire = threading.Event()
        self._rewires: queue.Queue[Deployment] = queue.Queue()
        self._shm = ShmReader()  # tensors a process of this host left in shared memory

    def deploy(self, dep: Deployment) -> None:
        """Run `dep` from now on (from the control thread).

        Queued before the flag is set, and the data thread clears the flag before it takes
        from the queue: a deployment queued while it takes is never left behind unflagged.
        """
        self.deployment = dep
        self._rewires.put(dep)
        self._rewire.set()

    def fail_queued(self, node: str) -> int:
        """Tell the master about every request that arrived and was not computed, so none
        hangs (once the thread has stopped); how many there were."""
        ids = []
        while True:
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                break
            try:
                msg = decode(frames, self._limits, self._shm)
                msg.release()
                ids.append(msg.fields["id"])
            except (WireError, KeyError):
                continue
        dep = self.deployment
        if not ids or dep is None:
            return 0
        sock = self.push(dep.results_endpoint, dep.results_key, "masters")
        for rid in ids:
            sock.send_multipart(encode("failure", {
                "id": rid, "stage": dep.stage, "epoch": dep.epoch,
                "reason": f"node {node} shut down with the request queued"}))
        sock.close(linger=500)
        return len(ids)

    @property
    def busy(self) -> bool:
        """A worker holds a request."""
        return self._holding > 0

    def run(self) -> None:
        """The workers' loops, until the node stops: this thread's and `workers - 1` more.

        A worker that dies stops the node (as the node's own guard does for this thread): its
        exception is raised here once every worker has ended.
        """
        # A blocking receive that gives up after POLL_MS (to look at stop and rewires) wakes
        # once per request; a poll before it cost a second pass through ZeroMQ and Python.
        self.pull.setsockopt(zmq.RCVTIMEO, POLL_MS)
        died: list[BaseException] = []

        def work() -> None:
            try:
                self._work()
            except BaseException as exc:
                died.append(exc)
            finally:
                self._ending.set()  # one worker ends (a bug): they all do

        helpers = [threading.Thread(target=work, name=f"node-data-{i}", daemon=True)
                   for i in range(1, self.workers)]
        for t in helpers:
            t.start()
        work()
        for t in helpers:
            t.join()
        self._wiring.close()
        if died:
            raise died[0]

    def _work(self) -> None:
        """One worker's loop: receive, compute, send on, one request at a time.

        A decoder's stage (its KV caches) takes its requests in the order they came, each
        computed and sent on before the next is taken: the worker keeps the receiving socket
        until it is done (chunks of one prompt follow each other without waiting).
        """
        while not self._stop.is_set() and not self._ending.is_set():
            if self._rewire.is_set():
                with self._sending:
                    self._take_rewires(self._wiring)
            t_free = time.time()
            self._receiving.acquire()
            in_order = True
            try:
                try:
                    frames = self.pull.recv_multipart(copy=False)
                except zmq.ZMQError:  # (zmq.Again: nothing came within POLL_MS)
                    continue
                dep = self.deployment
                in_order = dep is not None and isinstance(dep.runner, StatefulStage)
                if not in_order:
                    self._receiving.release()
                self._take(frames, t_free)
            finally:
                if in_order:
                    self._receiving.release()

    def _take(self, frames: list[Any], t_free: float) -> None:
        """Decode one request (count and drop what does not parse) and handle it."""
        t_taken = time.time()
        try:
            msg = decode(frames, self._limits, self._shm)  # raises WireError and nothing else
            if msg.kind != "activation":
                msg.release()
                raise WireError(f"'{msg.kind}' is not a data message")
        except WireError as exc:
            if isinstance(exc, ShmRefused) and exc.sender_gone:  # well formed: not rejected
                log.info("request %s dropped: %s (its recovery replays it)",
                         exc.fields.get("id"), exc)
                return
            with self._count_lock:
                self.rejected += 1
            log.warning("rejected data message: %s", exc)
            if isinstance(exc, ShmRefused) and (dep := self.deployment) is not None:
                self._refused(exc, dep)
            return
        t_recv = arrival(msg, t_free, t_taken)
        with self._count_lock:
            self._holding += 1
        try:
            self._handle(msg, t_recv)
        finally:
            msg.release()  # its outputs went on: its inputs' shared memory may be used again
            with self._count_lock:
                self._holding -= 1

    def _refused(self, exc: ShmRefused, dep: Deployment) -> None:
        """Fail a request whose tensors this node cannot read, so that it does not hang."""
        with self._sending:
            if self._wiring.results is not None and exc.fields.get("epoch", 0) == dep.epoch:
                self._send(self._wiring, "failure", {
                    "id": exc.fields["id"], "stage": dep.stage, "epoch": dep.epoch,
                    "reason": f"stage {dep.stage} cannot read the tensors its sender left in "
                              f"shared memory: {exc}"})

    def _handle(self, msg: Message, t_recv: float) -> None:
        """Compute one request and send what comes of it on."""
        try:
            item = self._compute(msg, t_recv)
        except Exception as exc:  # a bug with one request: fail it alone, keep serving
            log.exception("request %s dropped", msg.fields.get("id"))
            item = ("failure", {"id": msg.fields["id"], "stage": -1,
                                "epoch": msg.fields.get("epoch", 0),
                                "reason": f"the node failed on it: {type(exc).__name__}"})
        if item is None:
            return
        with self._sending:
            if self._rewire.is_set():
                self._take_rewires(self._wiring)
            if not self._rewire.is_set():  # else it belongs to the replaced pipeline
                try:
                    self._send(self._wiring, *item)
                except Exception:  # one that cannot go is dropped; the rest still go
                    log.exception("outgoing %s dropped", item[0])

    def _compute(self, msg: Message, t_recv: float) -> tuple[str, Any] | None:
        """Run one request; what to send on (None: nothing, it is for a replaced pipeline)."""
        dep = self.deployment
        rid = msg.fields["id"]
        if dep is None:
            return "failure", {"id": rid, "reason": "no shard deployed", "stage": -1}
        epoch = msg.fields.get("epoch", 0)
        if epoch != dep.epoch:
            return None  # sent to a pipeline that has been replaced; the master replays it
        t_start = time.time()
        step: dict[str, Any] = {k: msg.fields[k] for k in ("seq", "pos", "new", "seqs", "poss",
                                                           "greedy") if k in msg.fields}
        try:
            if isinstance(dep.runner, StatefulStage):
                if msg.lease is not None:  # (a decoder's stage may keep what it was given)
                    msg.keep()  # out of the sender's slot; small frames need no copy per step
                greedy = bool(step.get("greedy", False))
                if "seqs" in step and "poss" in step:
                    outputs = dep.runner.run_batch(msg.tensors, step["seqs"], step["poss"],
                                                   greedy)
                elif all(k in step for k in ("seq", "pos", "new")):
                    outputs = dep.runner.run(msg.tensors, step["seq"], step["pos"],
                                             step["new"], greedy)
                else:
                    raise RuntimeFailure("this stage keeps a decoder's KV caches: a request "
                                         "must name its sequence, cached and new tokens")
            else:
                outputs = dep.runner.run(msg.tensors)
                if msg.lease is not None:  # an output that is an input's memory: its own copy
                    outputs = {k: np.array(v) if any(np.may_share_memory(v, t) for t in
                                                     msg.tensors.values()) else v
                               for k, v in outputs.items()}
        except Exception as exc:  # a bad request fails alone; the node keeps serving
            reason = exc.message if isinstance(exc, PeripheryError) else str(exc)
            return "failure", {"id": rid, "stage": dep.stage, "epoch": epoch,
                               "reason": f"stage {dep.stage}: {reason}"}
        t_end = time.time()
        times = [*msg.fields.get("times", []), [dep.stage, t_recv, t_start, t_end]]
        return "activation", ({"id": rid, "times": times, "epoch": epoch, **step}, outputs)

    def _take_rewires(self, wiring: _Wiring) -> None:
        """Wire to the newest deployment the control thread made (its flag is set)."""
        self._rewire.clear()
        dep = None
        while True:
            try:
                dep = self._rewires.get_nowait()
            except queue.Empty:
                break
        if dep is not None:
            self._send(wiring, "rewire", dep)

    def _send(self, wiring: _Wiring, kind: str, payload: Any) -> None:
        if kind == "rewire":
            wiring.close()
            wiring.dep = dep = payload
            try:
                last = dep.next_endpoint == dep.results_endpoint
                wiring.nxt = self.push(dep.next_endpoint, dep.next_key,
                                        "masters" if last else "nodes")
                wiring.results = wiring.nxt if last else \
                    self.push(dep.results_endpoint, dep.results_key, "masters")
                wiring.nxt_shm = ShmWriter() if is_ipc(dep.next_endpoint) else None
            except (PeripheryError, zmq.ZMQError) as exc:
                log.warning("cannot wire stage %d: %s", dep.stage, exc)
                wiring.close()
            return
        if kind == "failure":
            if wiring.results is not None:
                wiring.results.send_multipart(encode("failure", payload), copy=False)
            else:
                log.warning("request %s failed before any deployment: %s", payload["id"],
                            payload["reason"])
            return
        fields, outputs = payload
        dep = wiring.dep
        if wiring.nxt is None or dep is None:
            return
        fields["times"][-1].extend((time.time(), sum(int(v.nbytes) for v in outputs.values())))
        last = dep.next_endpoint == dep.results_endpoint
        try:
            frames = encode("result" if last else "activation", fields, outputs,
                            shm=wiring.nxt_shm)
        except WireError as exc:
            frames = encode("failure", {"id": fields["id"], "stage": dep.stage,
                                        "epoch": fields.get("epoch", 0),
                                        "reason": f"stage {dep.stage}: {exc}"})
        self._send_blocking(wiring.nxt, frames)

    def push(self, endpoint: str, server_key: bytes | None, role: Role) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PUSH)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self._queue_depth)
            self.guard.connect(sock, endpoint, server_key, role)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _send_blocking(self, sock: zmq.Socket, frames: list[Any]) -> None:
        # Backpressure: wait while the next stage is full, but stay stoppable, and give up
        # when a redeploy replaces the pipeline (its next stage may be gone for good).
        # Tried at once first: a poll before each send cost a pass through ZeroMQ when the
        # next stage had room, as it mostly has. (A multipart message is refused whole or
        # taken whole: the high-water mark counts messages.)
        while not (self._stop.is_set() or self._rewire.is_set() or self._ending.is_set()):
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                sock.poll(POLL_MS, zmq.POLLOUT)
