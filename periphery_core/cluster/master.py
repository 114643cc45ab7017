"""The master: finds nodes, deploys a plan's shards to them, and streams requests through them.

`Master` is the one object the rest of the code talks to; its two threads each own their
sockets, so no socket is shared. The control thread (`master_control.py`) owns one DEALER
socket per node (hello, heartbeats, shard uploads, stats) and runs every control action as a
command in its loop; the results thread (`master_data.py`) owns the PULL socket the last stage
sends to, and `submit` sends to the first stage under a lock. What the master knows of each
node is a `NodeHandle` (`handles.py`). Everything observable is published as typed events on an
`EventBus` (`bus.py`; the events are in `events.py`), which the CLI and the app fold into state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future
from typing import Any

import numpy as np
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.handles import NodeHandle, device_specs
from periphery_core.cluster.keys import Guard, KeyRing
from periphery_core.cluster.master_control import Control
from periphery_core.cluster.master_data import DataPath, submit_batch
from periphery_core.cluster.same_host import (
    check_endpoint,
    host_identity,
    is_ipc,
)
from periphery_core.cluster.shard_parts import Part, parts_sha256
from periphery_core.discovery import NodeAddress
from periphery_core.errors import ClusterError, PeripheryError, RequestFailed
from periphery_core.partition.plan import DeviceSpec
from periphery_core.wire import Limits, encode

log = logging.getLogger("periphery.master")


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
        same_host_ipc: bool = True,
    ) -> None:
        self.host = host
        self.heartbeat_s = heartbeat_s
        self.bus = bus or EventBus()
        self.limits = limits or Limits()
        self.ctx = zmq.Context()
        self.guard = Guard(self.ctx, keys, "master")
        self._stop = threading.Event()
        # With `keep_on_loss`, requests survive a lost node to be replayed (see Pipeline).
        self.keep_on_loss = False
        # Set when a thread of the master died despite its guards: every later call says so
        # instead of waiting on a loop that no longer runs.
        self.failure: str | None = None
        # Links to nodes on this host take a private Unix socket, not CurveZMQ TCP (see
        # same_host.py); False keeps every link on TCP (to measure what a LAN costs).
        self._data = DataPath(ctx=self.ctx, guard=self.guard, bus=self.bus, limits=self.limits,
                              host=host, max_pending=max_pending, stop=self._stop,
                              same_host_ipc=same_host_ipc)
        self._control = Control(
            ctx=self.ctx, guard=self.guard, bus=self.bus, limits=self.limits,
            results_endpoint=self._data.results_endpoint, heartbeat_s=heartbeat_s,
            lost_after_s=lost_after_s, stop=self._stop, on_stage_lost=self._on_stage_lost)
        self.nodes: dict[str, NodeHandle] = self._control.nodes  # by node id, as they said hello
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._control.run, "control"),
                             name="master-control", daemon=True),
            threading.Thread(target=self._guarded, args=(self._data.run, "results"),
                             name="master-results", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._control.wake()  # out of its poll now, not at its next deadline
        for t in self._threads:
            t.join(timeout=2.0)
        self._data.drop_pending(RequestFailed("the master was closed"))
        self._control.fail_waiters(ClusterError("the master was closed"))  # a deploy or ping
        self._data.close_shm()
        self.guard.close()
        self.ctx.destroy(linger=0)
        if self._data.private is not None:
            self._data.private.remove()

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

    def _on_stage_lost(self, handle: NodeHandle, stage: int) -> None:
        if not self.keep_on_loss:  # else the pipeline recovers and replays them
            self.fail_pending(f"node {handle.name} (stage {stage}) was lost")

    # ------------------------------------------------------------------ nodes

    def connect(self, address: NodeAddress, timeout: float = 5.0) -> NodeHandle:
        """Say hello to a node, wait for its description and measure the link to it.

        Raises:
            ClusterError: the node does not answer in time, or answers in another protocol
                version (another Periphery release).
        """
        self._check_alive()
        return self._control.connect(address, timeout)

    def alive_nodes(self) -> list[NodeHandle]:
        """The connected nodes not lost, in the order they joined (a snapshot); not one whose
        connection is closed right now (its process has probably ended: it is lost once the
        connection has stayed closed for half a second)."""
        return [h for h in list(self.nodes.values()) if not h.lost and h.gone_since is None]

    def devices(self, node_ids: Sequence[str] | None = None) -> list[DeviceSpec]:
        """The planner's description of connected nodes: measured speed, free memory, link."""
        chosen = [self.nodes[i] for i in node_ids] if node_ids else self.alive_nodes()
        return device_specs(chosen)

    # ------------------------------------------------------------------ deploy

    def deploy(
        self,
        shards: Iterable[bytes | Sequence[Part]],
        assignment: Sequence[str],
        *,
        replicas: int = 1,
        exact: bool = True,
        timeout: float = 120.0,
    ) -> None:
        """Ship the shards to the nodes, wire each replica's stages in order, wait until all
        are ready.

        With R replicas, `assignment` lists R*K nodes: replica r runs shard i on node
        `assignment[r * K + i]` (its slot), and the master balances requests over the
        replicas. Events and the nodes' timings name a stage by its slot.

        Each shard is its model's bytes, or parts: its model, then its big weights' bytes
        (`shard_parts`; the node is told where the model ends). They are taken one at a time,
        the next once the one before has gone out to its nodes: a generator that makes each as
        it is asked for holds one stage of a big model at once, never every stage (the nodes
        build their sessions meanwhile).

        Raises:
            ClusterError: an unknown or lost node, a refused shard, or a timeout.
        """
        if replicas < 1 or len(assignment) % replicas:
            raise ClusterError(f"{len(assignment)} nodes cannot hold {replicas} replicas")
        k = len(assignment) // replicas
        if len(set(assignment)) != len(assignment):
            raise ClusterError("each stage needs a node of its own")
        self._check_alive()
        handles = []
        for node_id in assignment:
            handle = self.nodes.get(node_id)
            if handle is None or handle.lost:
                raise ClusterError(f"node {node_id[:12]} is not connected")
            handles.append(handle)
        self.bus.publish(ev.DeployStarted(t=time.time(), plan_stages=k, replicas=replicas,
                                          assignment=tuple(assignment)))
        epoch = self._data.new_epoch()
        deadline = time.time() + timeout
        readies: dict[int, Future] = {}
        digests: list[str] = [""] * len(handles)
        links = [""] * len(handles)
        for i, (parts, digest) in enumerate(self._stages(shards, k, handles)):
            sent = []
            for slot in range(i, len(handles), k):
                handle, digests[slot] = handles[slot], digest
                results, results_key = self._results_link(handle)
                nxt, nxt_key = (results, results_key) if slot % k == k - 1 \
                    else self._data_link(handle, handles[slot + 1])
                links[slot] = "ipc" if is_ipc(nxt) else "tcp"
                readies[slot], gone = self._control.upload(
                    handle, slot, len(handles), parts, digests[slot], nxt=nxt, nxt_key=nxt_key,
                    results=results, results_key=results_key, exact=exact, epoch=epoch)
                sent.append(gone)
            del parts  # (the uploads hold them until they have gone)
            futures.wait(sent, timeout=max(0.0, deadline - time.time()))
            if any(r.done() and r.exception() is not None for r in readies.values()):
                break  # a node was lost or refused its stage: no more stages are made
        for i in sorted(readies):
            handle = handles[i]
            try:
                info = readies[i].result(timeout=max(0.0, deadline - time.time()))
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
        self._control.record_stages(handles, digests, exact)
        self._data.connect_first([self._data_link(None, h) for h in handles[::k]])
        self.bus.publish(ev.DeployFinished(t=time.time(), links=tuple(links)))

    def _stages(self, shards: Iterable[bytes | Sequence[Part]], k: int,
                handles: Sequence[NodeHandle]) -> Iterator[tuple[Sequence[Part], str]]:
        """`shards`, one at a time, each as its parts and their sha256, checked to be one per
        stage; a stage that cannot be made (its extraction failed, its weights' file cannot be
        read) fails the deploy as a refused one does."""
        it = iter(shards)
        for i in range(k + 1):
            try:
                shard = next(it)
                parts = [shard] if isinstance(shard, bytes) else shard
                digest = parts_sha256(parts)
            except StopIteration:
                if i == k:
                    return
                raise ClusterError(f"{i} shards for {k} stages") from None
            except PeripheryError as exc:
                self.bus.publish(ev.DeployFailed(t=time.time(), node_id=handles[i].node_id,
                                                 stage=i, reason=exc.message))
                raise
            if i == k:
                raise ClusterError(f"more shards than the {k} stages of {len(handles)} nodes")
            del shard
            yield parts, digest
            del parts  # (not held while the next is made)

    def _data_link(self, sender: NodeHandle | None,
                   receiver: NodeHandle) -> tuple[str, bytes | None]:
        """The endpoint and key `sender` (None: this master) reaches `receiver`'s data socket
        by: its private Unix socket when both run on one host as one user, else CurveZMQ TCP
        (always, when this master was made with `same_host_ipc=False`)."""
        here = sender.host if sender is not None else host_identity()
        # (what a node said of itself is checked: a folder of this user's, closed to others)
        if self._data.private is not None and here and receiver.host == here \
                and receiver.data_ipc \
                and (sender is not None or check_endpoint(receiver.data_ipc) is None):
            return receiver.data_ipc, None
        return receiver.data_endpoint, receiver.key

    def _results_link(self, sender: NodeHandle) -> tuple[str, bytes | None]:
        """The endpoint and key a last stage on `sender` sends results to."""
        if self._data.results_ipc and sender.host == host_identity():
            return self._data.results_ipc, None
        return self._data.results_endpoint, self.guard.ring.public if self.guard.ring else None

    # ------------------------------------------------------------------ requests

    def submit(self, feeds: Mapping[str, np.ndarray],
               step: Mapping[str, Any] | None = None) -> Future:
        """Send one request into the pipeline; the future resolves to its outputs by name.

        `step` ({"seq", "pos", "new"}) makes it one step of a decoder's sequence, for stages
        that keep KV caches (generate.stateful); {"seqs", "poss"} a decode step of several
        sequences batched into one run, a row each.

        Raises:
            ClusterError: the master is closed or broken, or nothing is deployed.
            ClusterBusy: `max_pending` requests are in flight already.
        """
        self._check_alive()
        return self._data.submit(feeds, step)

    def submit_batch(self, feeds: Mapping[str, np.ndarray], micro_batch: int) -> Future:
        """Split a batch along axis 0 into micro-batches, pipeline them, join the outputs.

        Only for models whose outputs along the batch axis depend on that row alone (true of
        most inference graphs; not of ones that mix rows, e.g. batch statistics).
        """
        return submit_batch(self.submit, feeds, micro_batch)

    def release_sequences(self, seqs: Sequence[int]) -> None:
        """Tell every stage that these decoder sequences ended: their caches may go."""
        if seqs:
            self._data.forget([int(s) for s in seqs])
            self._control.send_to_stages(encode("release", {"seqs": [int(s) for s in seqs]}))

    def replica_of(self, seq: int) -> int | None:
        """The replica whose stages hold a decoder sequence's caches (None: none yet)."""
        return self._data.replica_of(seq)

    def pending_count(self) -> int:
        """Requests sent and still waiting for their result."""
        return self._data.pending_count()

    def sequences(self) -> int:
        """Decoder sequences whose caches the stages hold (started, not yet released)."""
        return self._data.sequences()

    def hold(self) -> None:
        """Hold new submissions back (a recovery is starting)."""
        self._data.hold()

    def release(self) -> None:
        """Let submissions through again (a recovery or redeploy is done)."""
        self._data.release()

    def replay(self) -> int:
        """Send every request still waiting for its result into the current pipeline again."""
        return self._data.replay()

    def fail_pending(self, reason: str) -> None:
        """Fail every request in flight with `reason` (a lost stage, a failed recovery)."""
        self._data.fail_pending(reason)
