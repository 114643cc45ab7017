"""Balance by measurement: move a pipeline's cuts when its stages' measured compute is uneven.

FLOP estimates mislead (a depthwise convolution costs more than its FLOPs say, a big MatMul
less), so a plan balanced on estimates can leave one stage much slower than the others. Once a
deployed pipeline has served enough requests, the nodes' own timings say how long each stage
really computes. `measured_plan` turns them into a plan: each stage's measured time is shared
out among its nodes (by a profile of the model on the master, which says which nodes of a
stage take its time, or else by the plan's own costs), and the balanced planner runs again on
those costs with the same devices. The pipeline deploys the new plan through its one redeploy
path (hold, deploy, replay, release), so no request is lost.

Design choices: the nodes measure whole stages, which is what sets the pace on their devices;
the master's profile only says how a stage's time divides among its nodes (its own CPU is not
the nodes'). Without a profile the division follows the estimates: exact when a stage's error
is uniform, and a move in the right direction otherwise; the pipeline measures again after
each move. A move is made only when the slowest stage is more than `THRESHOLD` over the mean
and the new cuts are predicted to cut the slowest stage's time by at least `MIN_GAIN` and
`MIN_SAVING_S` (a redeploy to save microseconds on a model whose stages cost less than a hop
is churn), so noise does not shuffle shards back and forth.
Plans cut by hand (strategy "manual") are the user's and are never moved.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Mapping, Sequence

from periphery_core.model.analysis import ModelAnalysis, with_measurements
from periphery_core.partition.plan import ShardPlan
from periphery_core.partition.planner import make_plan
from periphery_core.partition.planning_graph import node_cost_s

THRESHOLD = 0.10  # the slowest stage this far over the mean is worth a move
MIN_GAIN = 0.05  # ... if the new cuts should make it at least this much faster
MIN_SAVING_S = 5e-4  # ... and by at least this much: below it a hop's own cost dominates
SAMPLES = 48  # requests measured before deciding
MAX_MOVES = 3  # moves per pipeline: each measures again, so a few converge


def imbalance(measured_s: Sequence[float]) -> float:
    """How far the slowest stage is over the mean (0.25: 25% over)."""
    mean = statistics.fmean(measured_s)
    return max(measured_s) / mean - 1.0 if mean > 0 else 0.0


def per_worker(measured_s: Sequence[float], workers: Sequence[int]) -> list[float]:
    """Each stage's measured compute per request over the requests its node computes at once
    (`periphery-node --workers`): a stage computing two at once, each in 10 ms, serves one
    every 5 ms, and that is what balances against the other stages."""
    return [m / max(1, w) for m, w in zip(measured_s, workers, strict=True)]


def measured_plan(analysis: ModelAnalysis, plan: ShardPlan, measured_s: Sequence[float],
                  profile: ModelAnalysis | None = None) -> ShardPlan | None:
    """The balanced plan on `measured_s` (each stage's median compute per request), or None
    when the stages are balanced enough or no cut would help.

    Each stage's measured time is shared out among its nodes in proportion to their costs in
    `profile` (the model profiled on the master: which nodes of a stage take its time), else
    in proportion to the plan's own costs (estimates, or the profile it was made on).

    Args:
        analysis: The model the plan was made from.
        plan: The deployed plan.
        measured_s: Per stage, in order, its median measured compute per request.
        profile: `analysis` with measured node times (`profile_model`), if there is one.
    """
    if len(measured_s) != plan.k or plan.k < 2 or plan.strategy == "manual":
        return None
    if imbalance(measured_s) <= THRESHOLD:
        return None
    basis = profile if profile is not None and profile.profiled else analysis
    use_profile = basis is profile or plan.cost_basis == "profile"
    cost = {n.key: node_cost_s(n, use_profile) for n in basis.nodes}
    corrected: dict[str, float] = {}
    for stage, device, seconds in zip(plan.stages, plan.devices, measured_s, strict=True):
        total = sum(cost.get(key, 0.0) for key in stage.nodes)
        for key in stage.nodes:  # reference seconds: a device of speed 2 took half as long
            share = cost.get(key, 0.0) / total if total > 0 else 1.0 / len(stage.nodes)
            corrected[key] = share * seconds * device.speed
    moved = make_plan(with_measurements(analysis, corrected), plan.k, strategy="balanced",
                      devices=list(plan.devices), use_profile=True)
    if [s.nodes for s in moved.stages] == [s.nodes for s in plan.stages]:
        return None
    predicted = max(s.compute_s for s in moved.stages)
    if predicted > (1 - MIN_GAIN) * max(measured_s) or max(measured_s) - predicted < MIN_SAVING_S:
        return None
    # new cuts, the same shape on the same devices
    return moved.with_replicas(plan.replicas, plan.shape_reason, plan.replica_devices)


class StageMeter:
    """Per-stage compute of the requests served since the last deploy (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[list[float]] = []

    def reset(self, stages: int) -> None:
        with self._lock:
            self._samples = [[] for _ in range(stages)]

    def add(self, compute_s: Mapping[int, float]) -> int:
        """Record one request's per-stage compute; returns how many requests are recorded."""
        with self._lock:
            if set(compute_s) != set(range(len(self._samples))):
                return 0  # a request of another deploy
            for stage, seconds in compute_s.items():
                self._samples[stage].append(seconds)
            return len(self._samples[0]) if self._samples else 0

    def medians(self) -> list[float]:
        """Each stage's median compute; none before a request since the last deploy."""
        with self._lock:
            return [statistics.median(s) for s in self._samples if s]
