"""A model served by the cluster: plan, deploy, stream, and recover from a lost node unaided.

When a node of the current pipeline is lost, the pipeline holds new submissions back, plans
the model again onto the nodes still alive (their measured speed and free memory, so the plan
fits them), deploys it as a new epoch and replays every request still in flight. Results of the
old epoch that arrive late are dropped by the master, so each request completes exactly once,
with the result the unsharded model gives. A node that comes back is used by the next plan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from periphery_core.cluster import events as ev
from periphery_core.cluster.master import ClusterError, Master
from periphery_core.model.analysis import ModelAnalysis
from periphery_core.model.loading import LoadedModel
from periphery_core.partition.costs import make_plan
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.plan import ShardPlan

log = logging.getLogger("periphery.pipeline")


@dataclass(frozen=True, slots=True)
class Recovery:
    """How one recovery went (seconds from the loss to detection, and to serving again)."""

    lost_node: str
    detected_s: float | None  # from the node's last sign of life to its loss being declared
    recovered_s: float  # from the loss being declared to the new pipeline serving
    stages: int
    replayed: int


class Pipeline:
    """Keep a model deployed on the master's nodes."""

    def __init__(
        self,
        master: Master,
        loaded: LoadedModel,
        analysis: ModelAnalysis,
        *,
        k: int,
        strategy: str = "balanced",
        exact: bool = True,
        recover: bool = True,
    ) -> None:
        self.master = master
        self.loaded = loaded
        self.analysis = analysis
        self.k = k
        self.strategy = strategy
        self.exact = exact
        self.plan: ShardPlan | None = None
        self.assignment: tuple[str, ...] = ()
        self.recoveries: list[Recovery] = []
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._recovering = threading.Event()
        self._threads: list[threading.Thread] = []
        if recover:
            master.keep_on_loss = True
            self._unsubscribe = master.bus.subscribe(self._on_event)
        else:
            self._unsubscribe = lambda: None

    def deploy(self, node_ids: Sequence[str] | None = None) -> ShardPlan:
        """Plan K stages (fewer if fewer nodes are alive) onto the nodes and deploy them."""
        alive = [h.node_id for h in self.master.nodes.values() if not h.lost]
        chosen = list(node_ids) if node_ids else alive
        if not chosen:
            raise ClusterError("no live node to deploy to")
        k = min(self.k, len(chosen), len(self.analysis.nodes))
        chosen = chosen[:k]
        devices = self.master.devices(chosen)
        plan = make_plan(self.analysis, k, strategy=self.strategy, devices=devices)
        shards = extract_shards(self.loaded, self.analysis, plan)
        self.master.deploy([s.SerializeToString() for s in shards], chosen, exact=self.exact)
        with self._lock:
            self.plan, self.assignment = plan, tuple(chosen)
        return plan

    def submit(self, feeds: Mapping[str, np.ndarray]) -> Future:
        return self.master.submit(feeds)

    def wait_recovered(self, timeout: float) -> bool:
        """Block while a recovery is running; False if it did not finish in time."""
        deadline = time.time() + timeout
        while self._recovering.is_set():
            if time.time() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self._unsubscribe()
        for t in self._threads:
            t.join(timeout=30)

    # ------------------------------------------------------------------ recovery

    def _on_event(self, event: ev.Event) -> None:
        # Bus callbacks must not block: recovery runs in its own thread.
        if isinstance(event, ev.NodeLost) and event.node_id in self.assignment:
            self._recovering.set()
            self.master.hold()
            t = threading.Thread(target=self._recover, args=(event,), daemon=True,
                                 name="pipeline-recover")
            self._threads.append(t)
            t.start()

    def _recover(self, lost: ev.NodeLost) -> None:
        t0 = time.time()
        handle = self.master.nodes.get(lost.node_id)
        detected = lost.t - handle.last_seen if handle is not None else None
        try:
            with self._lock:
                survivors = [n for n in self.assignment if n != lost.node_id]
            others = [h.node_id for h in self.master.nodes.values()
                      if not h.lost and h.node_id not in survivors]
            plan = self.deploy([n for n in survivors + others
                                if not self.master.nodes[n].lost])
            replayed = self.master.replay()
            self.recoveries.append(Recovery(lost.node_id, detected, time.time() - t0, plan.k,
                                            replayed))
            log.info("recovered from losing %s in %.2f s: %d stages, %d requests replayed",
                     lost.node_id[:8], time.time() - t0, plan.k, replayed)
        except Exception as exc:  # nothing left to run on: fail what is waiting, clearly
            self.failed = f"recovery failed: {exc}"
            log.error("%s", self.failed)
            self.master.fail_pending(self.failed)
        finally:
            self.master.release()
            self._recovering.clear()
