"""The serving core: a model kept deployed on the cluster, planned, streamed and recovered.

`Pipeline` is the one way anything runs a model on the cluster: `periphery run`, the app, the
benchmarks and every later entry point are thin faces over it. It plans (or takes a plan from
a file), extracts and deploys the shards, streams requests, and recovers from a lost node.

Design choice: every change of what runs where goes through one lock and one recipe: hold new
submissions, deploy a new epoch, replay every request still in flight, release. A user's
redeploy and a recovery after a loss are the same operation, so neither loses a request, and
results of an older epoch that arrive late are dropped by the master: each request completes
exactly once, with the result the unsharded model gives.

The same recipe balances by measurement: once the current deploy has served
`rebalance.SAMPLES` requests, the nodes' measured per-stage compute decides whether the cuts
move (cluster.rebalance), at most `rebalance.MAX_MOVES` times per pipeline.

Recovery runs on one thread of its own, so two nodes lost close together give one recovery
onto the survivors rather than two deploys racing. Candidates are the nodes heard from
recently (a node that stopped answering a moment ago is not chosen even before its loss is
declared). A plan given from a file is re-planned onto the survivors on a loss, and the
`Recovered` event says so. When a node joins while a recovery has left the pipeline on fewer
nodes than its deploy asked for (a lost node back, or its process restarted), the same recipe
spreads it back over them (`SpreadBack`); a decoder's once no sequence holds caches on it, or
after `GROW_WAIT_S` (its sequences then rebuild their caches, as after a loss).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from periphery_core.cluster import events as ev
from periphery_core.cluster.master import Master
from periphery_core.cluster.rebalance import (
    MAX_MOVES,
    SAMPLES,
    THRESHOLD,
    StageMeter,
    imbalance,
    measured_plan,
    per_worker,
)
from periphery_core.cluster.shard_parts import shard_parts
from periphery_core.errors import ClusterError, PeripheryError
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.generate.planning import calibrated, plan_shape
from periphery_core.generate.stateful import stateful
from periphery_core.model.analysis import ModelAnalysis
from periphery_core.model.loading import LoadedModel
from periphery_core.model.profile import profile_model
from periphery_core.partition.extract import iter_shards
from periphery_core.partition.plan import ShardPlan
from periphery_core.progress import ProgressFn

log = logging.getLogger("periphery.pipeline")

# A recovery retries when a deploy fails because another node went quiet meanwhile.
RECOVERY_ATTEMPTS = 4
# With no node left, a recovery waits this long for one to join (the lost one started again
# by systemd, or by the local cluster's watch) before it fails, with the requests held.
NO_NODE_WAIT_S = 10.0
# A decoder's pipeline spreads back once no sequence holds caches on it, or after this long.
GROW_WAIT_S = 30.0
# The largest model the master profiles to rebalance (it runs the whole model, once).
PROFILE_LIMIT = 1 << 30


@dataclass(frozen=True, slots=True)
class Recovery:
    """How one recovery went (seconds from the loss to detection, and to serving again)."""

    lost_nodes: tuple[str, ...]  # names
    detected_s: float | None  # from the node's last sign of life to its loss being declared
    recovered_s: float  # from the loss being declared to the new pipeline serving
    stages: int
    replayed: int


class Pipeline:
    """Keep one model deployed on a master's nodes and stream requests through it."""

    def __init__(
        self,
        master: Master,
        loaded: LoadedModel,
        analysis: ModelAnalysis,
        *,
        k: int | None = None,
        replicas: int | None = None,
        plan: ShardPlan | None = None,
        strategy: str = "balanced",
        exact: bool = False,
        recover: bool = True,
        rebalance: bool = True,
        decoder: DecoderSpec | None = None,
    ) -> None:
        """Args:
            master: The master whose connected nodes run the stages.
            loaded, analysis: The model.
            k: Stages to plan (at most; fewer when fewer nodes are alive). Defaults to the
                plan's K; with neither, the planner chooses the shape for the live nodes.
            replicas: Replicas of the pipeline (at most, as nodes allow). Defaults to the
                plan's; with `k` alone, 1; with neither, the planner chooses.
            plan: A fixed plan (from a file, or edited by hand) for the first deploy; after a
                loss the model is planned again onto the survivors.
            strategy: The planner's strategy when the pipeline plans.
            exact: Graph optimizations off on the nodes, so results are bit-identical to the
                whole model's (with them on, the default, results differ in the last bits and
                each shard runs faster: fusions and constant folding within a shard).
            recover: Re-plan, redeploy and replay on its own when a node of it is lost.
            rebalance: Move the cuts on measured stage compute when the stages are uneven
                (not for plans cut by hand, nor for a decoder's stateful stages).
            decoder: Deploy a decoder LLM's shards as stateful stages that keep their own KV
                caches (generate.stateful); requests are then steps of sequences.
        """
        if plan is not None:
            k, replicas = k or plan.k, replicas or plan.replicas
        if (k is not None and k < 1) or (replicas is not None and replicas < 1):
            raise ClusterError("a pipeline needs at least one stage and one replica")
        self.master = master
        self.loaded = loaded
        self.analysis = analysis
        self.k = k
        self.replicas = 1 if k is not None and replicas is None else replicas
        self.strategy = strategy
        self.exact = exact
        self.decoder = decoder
        self.fixed_plan = plan
        self.plan: ShardPlan | None = None
        self.assignment: tuple[str, ...] = ()
        self.recoveries: list[Recovery] = []
        self.failed: str | None = None
        self._deploy_lock = threading.RLock()  # one deploy at a time, user's or recovery's
        self._lost: dict[str, ev.NodeLost] = {}  # lost nodes of the pipeline, to recover from
        self._lost_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._recoverer: threading.Thread | None = None
        self.recover = recover
        self._meter = StageMeter()
        self._profiled: ModelAnalysis | None = None
        self._moves_left = MAX_MOVES if rebalance and decoder is None else 0
        self._rebalance_due = threading.Event()
        self._wanted = 0  # nodes the last deploy asked for (a recovery may run on fewer)
        self._grow_due = threading.Event()
        self._grow_since: float | None = None  # when a spread back became due (a decoder's)
        if recover or self._moves_left:
            master.keep_on_loss = master.keep_on_loss or recover
            self._unsubscribe = master.bus.subscribe(self._on_event)
            self._recoverer = threading.Thread(target=self._background_loop, daemon=True,
                                               name="pipeline-recover")
            self._recoverer.start()
        else:
            self._unsubscribe = lambda: None

    # ------------------------------------------------------------------ deploy

    @property
    def deployed(self) -> bool:
        """True once a deploy has finished (the pipeline takes requests)."""
        return self.plan is not None and self.failed is None

    def deploy(
        self,
        node_ids: Sequence[str] | None = None,
        *,
        plan: ShardPlan | None = None,
        progress: ProgressFn | None = None,
    ) -> ShardPlan:
        """Deploy onto the nodes (stage i to `node_ids[i]`); requests in flight are replayed.

        Args:
            node_ids: The nodes to use, in stage order (default: every live node). With a
                plan, exactly its K nodes; without, the pipeline plans min(K, nodes) stages.
            plan: Deploy this plan instead of planning (default: the fixed plan given at
                construction, on the first deploy).
            progress: Reports shard extraction.

        Raises:
            ClusterError: no live node, a plan/node count mismatch, or a deploy that failed.
        """
        with self._deploy_lock:
            if plan is None and self.plan is None:
                plan = self.fixed_plan
            if plan is not None:  # a later recovery keeps the shape the user deployed
                self.k, self.replicas = plan.k, plan.replicas
            if self.decoder is None:  # the model's run timed now, not in a recovery's re-plan
                self.analysis = calibrated(self.loaded, self.analysis)
            chosen, _ = self._swap(node_ids, plan, progress)
            self._wanted = len(self.assignment)
            return chosen

    def _swap(self, node_ids: Sequence[str] | None, plan: ShardPlan | None,
              progress: ProgressFn | None = None) -> tuple[ShardPlan, int]:
        """Deploy with new submissions held back, then replay every request in flight into
        the new pipeline: the plan deployed and the requests replayed (under _deploy_lock; a
        recovery, which must hold submissions across its attempts, deploys by itself)."""
        self.master.hold()
        try:
            chosen = self._deploy_now(node_ids, plan, progress)
            return chosen, self.master.replay()
        finally:
            self.master.release()

    def _deploy_now(self, node_ids: Sequence[str] | None, plan: ShardPlan | None,
                    progress: ProgressFn | None = None) -> ShardPlan:
        """Plan if needed, extract and deploy (the caller holds submissions back)."""
        alive = [h.node_id for h in self.master.alive_nodes()]
        chosen = list(node_ids) if node_ids else alive
        if not chosen:
            raise ClusterError("no live node to deploy to: start periphery-node on a host "
                               "and connect it")
        if plan is None:
            plan = self._plan_shape(chosen)
        if len(chosen) < plan.nodes_needed:
            raise ClusterError(f"the plan runs {plan.shape} on {plan.nodes_needed} nodes but "
                               f"{len(chosen)} are available")
        chosen = chosen[:plan.nodes_needed]
        # A stage at a time, made and sent before the next; big weights by reference, not copied
        shards = iter_shards(self.loaded, self.analysis, plan, progress=progress,
                             weights_on_disk=True)
        if self.decoder is not None:
            shards = stateful(shards, self.decoder)
        held = {t.name: t for t in self.loaded.proto.graph.initializer}  # (references)
        self.master.deploy((shard_parts(s, i, self.loaded.path.parent, held)
                            for i, s in enumerate(shards)), chosen,
                           replicas=plan.replicas, exact=self.exact)
        self.plan, self.assignment, self.failed = plan, tuple(chosen), None
        self._meter.reset(plan.k)
        with self._lost_lock:  # losses of nodes no longer in the pipeline need no recovery
            self._lost = {n: e for n, e in self._lost.items() if n in self.assignment}
        return plan

    def _plan_shape(self, chosen: Sequence[str]) -> ShardPlan:
        """Plan for these nodes: the stages and replicas asked for, as far as the nodes go;
        what was not asked for, the planner chooses."""
        n = len(chosen)
        k = min(self.k, n, len(self.analysis.nodes)) if self.k is not None else None
        replicas = None if self.replicas is None else max(1, min(self.replicas, n // (k or 1)))
        return plan_shape(self.loaded, self.analysis, self.master.devices(chosen), k=k,
                          replicas=replicas, strategy=self.strategy, decoder=self.decoder)

    # ------------------------------------------------------------------ requests

    def submit(self, feeds: Mapping[str, np.ndarray],
               step: Mapping[str, Any] | None = None) -> Future:
        """Send one request; the future resolves to its outputs by name. `step` makes it a
        step of a decoder's sequence (see `Master.submit`).

        While a recovery or a redeploy runs this waits for the new pipeline.

        Raises:
            ClusterError: nothing is deployed, or the recovery failed.
            ClusterBusy: too many requests in flight.
        """
        if self.failed is not None:
            raise ClusterError(self.failed)
        if self.plan is None:
            raise ClusterError("nothing is deployed: deploy a plan first")
        return self.master.submit(feeds, step)

    def submit_batch(self, feeds: Mapping[str, np.ndarray], micro_batch: int) -> Future:
        """Split a batch into micro-batches that follow each other down the pipeline."""
        if self.plan is None:
            raise ClusterError("nothing is deployed: deploy a plan first")
        return self.master.submit_batch(feeds, micro_batch)

    def run_many(
        self, requests: Iterable[Mapping[str, np.ndarray]], inflight: int = 4
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream requests with at most `inflight` outstanding; yield results in order."""
        window: list[Future] = []
        for feeds in requests:
            window.append(self.submit(feeds))
            if len(window) >= inflight:
                yield window.pop(0).result()
        for f in window:
            yield f.result()

    def close(self) -> None:
        """Stop recovering (the master and its nodes stay as they are)."""
        self._unsubscribe()
        self._closing.set()
        self._wake.set()
        if self._recoverer is not None and self._recoverer is not threading.current_thread():
            self._recoverer.join(timeout=30)

    # ------------------------------------------------------------------ recovery

    def _on_event(self, event: ev.Event) -> None:
        # Bus callbacks must not block: the background thread does the work.
        if isinstance(event, ev.RequestCompleted) and self._moves_left > 0:
            k = self.plan.k if self.plan is not None else 1  # timings name slots
            if self._meter.add({t.stage % k: t.compute_s for t in event.stages}) == SAMPLES:
                self._rebalance_due.set()
                self._wake.set()
            return
        if isinstance(event, ev.NodeJoined) and self.recover \
                and event.node_id not in self.assignment and len(self.assignment) < self._wanted:
            self._grow_due.set()  # a lost node is back, or its process restarted
            self._wake.set()
            return
        if isinstance(event, ev.NodeLost) and event.node_id in self.assignment \
                and self.recover and not self._closing.is_set():
            self.master.hold()
            with self._lost_lock:
                self._lost.setdefault(event.node_id, event)
            self._wake.set()

    def _background_loop(self) -> None:
        """Recover from losses and, when one is due, rebalance: one deploy at a time."""
        while not self._closing.is_set():
            if not self._wake.wait(0.5) and not self._grow_due.is_set():
                continue
            self._wake.clear()
            if self._closing.is_set():
                break
            with self._lost_lock:
                lost = dict(self._lost)
            if not lost:
                if self._grow_due.is_set() and self._may_grow():
                    self._grow_due.clear()
                    self._grow_since = None
                    self._grow()
                if self._rebalance_due.is_set():
                    self._rebalance_due.clear()
                    self._rebalance()
                continue
            try:
                self._recover(lost)
            except Exception as exc:  # never let the recovery thread die silently
                log.exception("recovery")
                self._fail(str(exc))
            finally:
                self.master.release()

    def _candidates(self, lost: Mapping[str, ev.NodeLost]) -> list[str]:
        """Survivors of the pipeline first (in stage order), then other live nodes.

        Only nodes heard from within a couple of heartbeats: one that went quiet a moment ago
        is probably lost too, even before the master says so.
        """
        now = time.time()
        fresh_s = 2 * self.master.heartbeat_s + 0.5
        alive = {h.node_id: h for h in self.master.alive_nodes() if h.node_id not in lost}
        order = [n for n in self.assignment if n in alive]
        order += [n for n in alive if n not in order]
        fresh = [n for n in order if now - alive[n].last_seen <= fresh_s]
        return fresh or order

    def _recover(self, lost: Mapping[str, ev.NodeLost]) -> None:
        first = min(lost.values(), key=lambda e: e.t)
        handle = self.master.nodes.get(first.node_id)
        detected = first.t - handle.last_seen if handle is not None else None
        names = tuple(self._name(n) for n in lost)
        self.master.bus.publish(ev.RecoveryStarted(
            t=time.time(), lost=names, inflight=self.master.pending_count()))
        with self._deploy_lock:
            self.master.hold()  # again: a user's deploy may have released meanwhile
            error: ClusterError | None = None
            attempts, give_up = 0, time.monotonic() + NO_NODE_WAIT_S
            while attempts < RECOVERY_ATTEMPTS:
                with self._lost_lock:
                    lost = dict(self._lost)
                candidates = self._candidates(lost)
                if not candidates and time.monotonic() < give_up \
                        and not self._closing.wait(0.1):
                    continue  # one may join yet
                if not candidates:
                    error = ClusterError(
                        f"no node is left to run the model (lost: {', '.join(names)}; none "
                        f"joined within {NO_NODE_WAIT_S:.0f} s): start periphery-node on a "
                        "host and run again")
                    break
                attempts += 1
                try:
                    plan = self._deploy_now(candidates, None)
                except ClusterError as exc:  # another node went quiet meanwhile: plan again
                    error = exc
                    log.warning("recovery deploy failed (%s); trying the nodes still alive",
                                exc.message)
                    time.sleep(self.master.heartbeat_s)
                    continue
                replayed = self.master.replay()
                recovered_s = time.time() - first.t
                self.recoveries.append(Recovery(names, detected, recovered_s, plan.k, replayed))
                self.master.bus.publish(ev.Recovered(
                    t=time.time(), lost=names,
                    assignment=tuple(self._name(n) for n in self.assignment),
                    detected_s=detected, recovered_s=recovered_s, replayed=replayed))
                log.info("recovered from losing %s in %.2f s: %d stages, %d replayed",
                         ", ".join(names), recovered_s, plan.k, replayed)
                if len(self.assignment) < self._wanted:  # a node that joined meanwhile
                    self._grow_due.set()
                    self._wake.set()
                return
        self._fail(error.message if error else "no node left")

    def _may_grow(self) -> bool:
        """Whether a due spread back may go now: at once, but for a decoder's pipeline only
        once no sequence holds caches on it, or after GROW_WAIT_S (a deploy drops them all;
        each sequence's next step rebuilds its own, a prefill each, as after a loss)."""
        if self.decoder is None:
            return True
        now = time.monotonic()
        if self._grow_since is None:
            self._grow_since = now
        return self.master.sequences() == 0 or now - self._grow_since >= GROW_WAIT_S

    def _grow(self) -> None:
        """Spread back over as many nodes as the last deploy asked for, now that a node joined
        after a recovery left the pipeline on fewer: the same deploy and replay, no request
        lost."""
        with self._deploy_lock:
            before = self.assignment
            candidates = self._candidates({})[:self._wanted]
            if self.plan is None or self.failed is not None or self._closing.is_set() \
                    or len(candidates) <= len(before):
                return
            try:
                plan, replayed = self._swap(candidates, None)
            except ClusterError as exc:  # back onto the nodes it ran on (a loss: recovery's)
                log.warning("could not spread back over %d nodes: %s", len(candidates),
                            exc.message)
                with contextlib.suppress(ClusterError):
                    self._swap(before, None)
                return
            log.info("spread back over %d nodes: %s", len(self.assignment), plan.shape)
            self.master.bus.publish(ev.SpreadBack(
                t=time.time(), joined=tuple(self._name(n) for n in self.assignment
                                            if n not in before),
                assignment=tuple(self._name(n) for n in self.assignment), replayed=replayed))

    def _rebalance(self) -> None:
        """Move the cuts if the measured stage compute says so (cluster.rebalance)."""
        medians = self._meter.medians()
        if not medians:  # a redeploy since it was due: nothing measured on this one yet
            return
        measured = per_worker(medians, self._workers(len(medians)))
        # Profile only when the stages are uneven, and before taking the deploy lock: a
        # recovery need not wait for the master to run the whole model.
        profile = self._profile() if imbalance(measured) > THRESHOLD else None
        with self._deploy_lock:
            plan = self.plan
            if plan is None or self.failed is not None or self._closing.is_set():
                return
            moved = measured_plan(self.analysis, plan, measured, profile)
            if moved is None:
                log.info("stages balanced enough on measured compute (%s)",
                         ", ".join(f"{m * 1000:.2f} ms" for m in measured))
                return
            try:
                _, replayed = self._swap(self.assignment, moved)
            except ClusterError as exc:  # a node went quiet: recovery takes it from here
                log.warning("rebalance deploy failed: %s", exc.message)
                return
            self._moves_left -= 1
            self.master.bus.publish(ev.Rebalanced(
                t=time.time(), measured_s=tuple(measured),
                before=tuple(len(s.nodes) for s in plan.stages),
                after=tuple(len(s.nodes) for s in moved.stages),
                predicted_s=max(s.compute_s for s in moved.stages), replayed=replayed))

    def _workers(self, k: int) -> list[int]:
        """Per stage, the requests its nodes compute at once (the fewest of its replicas')."""
        stages: list[list[int]] = [[] for _ in range(k)]
        for slot, node_id in enumerate(self.assignment):
            handle = self.master.nodes.get(node_id)
            if handle is not None and k:
                stages[slot % k].append(handle.workers)
        return [min(w, default=1) for w in stages]

    def _profile(self) -> ModelAnalysis | None:
        """The model profiled on this host, once, to divide a stage's measured time among its
        nodes; None for a model too big to run here as well (the estimates divide it)."""
        if self._profiled is None and not self.analysis.profiled \
                and self.analysis.total_param_bytes <= PROFILE_LIMIT:
            try:
                self._profiled = profile_model(self.loaded, self.analysis, runs=3)
            except PeripheryError as exc:
                log.warning("could not profile the model for rebalancing: %s", exc.message)
                self._profiled = self.analysis
        return self._profiled

    def _fail(self, reason: str) -> None:
        self.failed = f"recovery failed: {reason}"
        self.master.bus.publish(ev.RecoveryFailed(t=time.time(), reason=reason))
        self.master.fail_pending(self.failed)

    def _name(self, node_id: str) -> str:
        handle = self.master.nodes.get(node_id)
        return handle.name if handle is not None and handle.name else node_id[:12]
