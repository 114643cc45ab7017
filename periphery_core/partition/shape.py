"""The shape of a deploy: R replicas of a K-stage pipeline, for the nodes at hand.

A model that fits one node serves fastest as replicas: every node runs the whole model, the
replicas' throughputs add up, and no request crosses a hop. A pipeline's period is its slowest
stage, so it only matches replicas when its stages balance perfectly, and pays a hop per
stage besides (a header, a thread hand-off, a copy, which the cost model counts only as a
stage's fixed cost per request). A model too big for one node needs stages; with more nodes
than it needs, the others form more replicas. So the planner tries every K from 1 to N with
R = N // K (the nodes in order, K to a replica), cuts the model on the first replica's
devices, costs the same cuts on each other replica's devices, and keeps the highest predicted
throughput (the sum over replicas of one over the bottleneck and a stage's fixed cost per
request, `STAGE_OVERHEAD_S`). More stages win only when they predict more than `MARGIN` over
fewer.

Pure: the caller passes how to plan and re-cost, so a decoder's planner plugs in as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from periphery_core.errors import PlanError
from periphery_core.partition.plan import STAGE_OVERHEAD_S, DeviceSpec, ShardPlan, shape_text
from periphery_core.units import human_rate

# More stages must predict this much more throughput than fewer to be chosen.
MARGIN = 0.05

PlanFn = Callable[[int, Sequence[DeviceSpec]], ShardPlan]  # K stages on these K devices
RecostFn = Callable[[ShardPlan, Sequence[DeviceSpec]], ShardPlan]  # same cuts, other devices


@dataclass(frozen=True, slots=True)
class ShapeOption:
    """One shape the planner weighed: its plan and predicted throughput, or why it fails."""

    k: int
    replicas: int
    rps: float = 0.0
    plan: ShardPlan | None = None
    error: str | None = None


def replica_groups(devices: Sequence[DeviceSpec], k: int, replicas: int
                   ) -> list[Sequence[DeviceSpec]]:
    """The devices of each replica: the first K, the next K, ..."""
    return [devices[r * k:(r + 1) * k] for r in range(replicas)]


def weigh(devices: Sequence[DeviceSpec], k: int, replicas: int, plan_k: PlanFn,
          recost: RecostFn) -> ShapeOption:
    """Plan R replicas of K stages on `devices` (at least R*K) and predict their throughput."""
    groups = replica_groups(devices, k, replicas)
    try:
        plan = plan_k(k, groups[0])
        rps = 1.0 / (plan.bottleneck_s + STAGE_OVERHEAD_S)
        for group in groups[1:]:
            other = recost(plan, group)
            for stage, dev in zip(other.stages, group, strict=True):
                if dev.memory_bytes is not None and stage.memory_bytes > dev.memory_bytes:
                    raise PlanError(f"stage {stage.index} does not fit device '{dev.name}'")
            rps += 1.0 / (other.bottleneck_s + STAGE_OVERHEAD_S)
    except PlanError as exc:
        return ShapeOption(k, replicas, error=exc.message)
    return ShapeOption(k, replicas, rps, plan)


def choose_shape(devices: Sequence[DeviceSpec], plan_k: PlanFn, recost: RecostFn, *,
                 k: int | None = None, replicas: int | None = None,
                 max_k: int | None = None) -> ShardPlan:
    """The plan of the best shape for `devices` (see the module docstring).

    Args:
        devices: The nodes at hand, in the order replicas take them.
        plan_k, recost: How to plan K stages on K devices, and re-cost a plan's cuts on others.
        k, replicas: Force either or both (`None`: the planner chooses; `replicas` alone
            takes K = N // R, `k` alone R = N // K).
        max_k: The most stages the model can be cut into (its node count).

    Raises:
        PlanError: too few devices for a forced shape, or no shape fits the memory caps.
    """
    n = len(devices)
    if n < 1:
        raise PlanError("no devices to plan for")
    if (k or 1) * (replicas or 1) > n:
        k, replicas = k or 1, replicas or 1
        raise PlanError(f"{shape_text(k, replicas)} needs {k * replicas} devices but {n} are "
                        "available: ask for fewer stages or replicas, or list more devices")
    if k is not None:
        ks = [k]
    elif replicas is not None:
        ks = [max(1, n // replicas)]
    else:
        ks = list(range(1, min(n, max_k or n) + 1))
    options = [weigh(devices, kk, replicas or max(1, n // kk), plan_k, recost) for kk in ks]
    fitting = [o for o in options if o.plan is not None]
    if not fitting:
        raise PlanError(options[-1].error or "no shape fits")
    best = fitting[0]
    for o in fitting[1:]:  # in order of K: more stages must win clearly
        if o.rps > best.rps * (1 + MARGIN):
            best = o
    assert best.plan is not None
    others = [d.name for d in devices[best.k:best.k * best.replicas]]
    return best.plan.with_replicas(best.replicas, _reason(best, options, forced=len(ks) == 1),
                                   others)


def _reason(best: ShapeOption, options: Sequence[ShapeOption], forced: bool) -> str:
    """Why this shape, in one line: its prediction against the others weighed."""
    assert best.plan is not None
    head = f"{shape_text(best.k, best.replicas)}: {human_rate(best.rps)} requests/s predicted"
    if forced:
        return f"{head} (the shape asked for)"
    others = []
    for o in options:
        if o is best:
            continue
        shape = shape_text(o.k, o.replicas)
        others.append(f"{shape} {human_rate(o.rps)}" if o.plan is not None
                      else f"{shape} does not fit ({o.error})")
    return head + (f", against {'; '.join(others)}" if others else "")
