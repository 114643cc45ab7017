"""The planner's front door: cut a model into K pipeline stages on K devices.

`make_plan` turns a model analysis into a `ShardPlan`; `plan_stages` does the same for a bare
`PlanningGraph`, and `replan_with_cuts` re-evaluates a plan cut by hand. All are pure: no I/O.

Key design choice: the order is chosen once, up front (`order.choose_order`, a greedy list
schedule that keeps few bytes live, so the cheap cut points are also the thin ones), and then
a strategy segments it: `balanced` optimally (`balanced.balanced_cuts`), `even` by node count,
`spectral` by clustering (`spectral.spectral_cuts`). Every result is costed by the one cost
model in `cost_model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from periphery_core.errors import PlanError
from periphery_core.model.analysis import ModelAnalysis
from periphery_core.partition.balanced import balanced_cuts
from periphery_core.partition.cost_model import (
    PlanningGraph,
    check_devices,
    graph_facts,
    layout_stages,
    order_layout,
    stages_from_cuts,
)
from periphery_core.partition.order import greedy_order
from periphery_core.partition.plan import STRATEGIES, DeviceSpec, ShardPlan, Stage, devices_for
from periphery_core.partition.planning_graph import planning_graph
from periphery_core.partition.spectral import spectral_cuts
from periphery_core.units import human_bytes

__all__ = ["CUT_SLACK", "make_plan", "plan_stages", "replan_with_cuts"]

# `make_plan`'s balanced cuts send the fewest bytes among those within this fraction of the
# best bottleneck. Costs are estimates or noisy measurements, far from 1% exact, while every
# byte that crosses costs CPU on both sides (a copy, CurveZMQ): on the demo model at K = 2 the
# best cut sent 1.5 MiB per request and one 0.01% slower on the estimates 768 KiB, and that one
# served 10% more requests/s on two local nodes (efficiency 0.87 -> 0.91).
CUT_SLACK = 0.01


def make_plan(
    analysis: ModelAnalysis,
    k: int,
    *,
    strategy: str = "balanced",
    devices: Sequence[DeviceSpec] | None = None,
    use_profile: bool = False,
    state: Mapping[str, tuple[str, int]] | None = None,
    slack: float = CUT_SLACK,
) -> ShardPlan:
    """Plan `k` shards of an analysed model (pure: no I/O).

    `state`: a decoder's cache inputs -> (cache output, bytes it may grow to), counted in the
    memory of the stage that reads them (`DecoderSpec.state_bytes`). `slack`: the balanced
    strategy takes the cuts with the fewest boundary bytes within that fraction of the best
    bottleneck (`CUT_SLACK` by default; 0 for the exact optimum).

    Raises:
        PlanError: k does not fit the model, the strategy is unknown, or memory caps cannot
            be met.
    """
    devs = devices_for(k, devices)
    graph = planning_graph(analysis, use_profile, state)
    stages = plan_stages(graph, k, devs, strategy, slack)
    return _plan(analysis, graph, stages, devs, strategy, use_profile)


def replan_with_cuts(
    analysis: ModelAnalysis,
    plan: ShardPlan,
    cuts: Sequence[int],
    devices: Sequence[DeviceSpec] | None = None,
    state: Mapping[str, tuple[str, int]] | None = None,
) -> ShardPlan:
    """The same node order as `plan`, cut at new positions (how the app moves a boundary),
    run as the same replicas; `state` as in `make_plan`."""
    use_profile = plan.cost_basis == "profile"
    graph = planning_graph(analysis, use_profile, state)
    index = {n.key: i for i, n in enumerate(graph.nodes)}
    order = [index[key] for s in plan.stages for key in s.nodes]
    devs = tuple(devices) if devices is not None else plan.devices
    stages = stages_from_cuts(graph, order, cuts, devs[: len(cuts) + 1])
    return _plan(analysis, graph, stages, devs[: len(cuts) + 1], "manual",
                 use_profile).with_replicas(
                     plan.replicas, plan.shape_reason,
                     plan.replica_devices if len(cuts) + 1 == plan.k else ())


def plan_stages(
    graph: PlanningGraph,
    k: int,
    devices: Sequence[DeviceSpec] | None = None,
    strategy: str = "balanced",
    slack: float = 0.0,
) -> tuple[Stage, ...]:
    """Cut the graph into K pipeline stages on K devices.

    Strategies:

    - ``balanced``: the segmentation of `choose_order`'s order with the smallest bottleneck
      that fits every memory cap (exact, see `balanced`); among equally good ones,
      the one with the fewest boundary bytes, then the earliest stage starts.
    - ``even``: the same order cut into stages with equal node counts (the naive baseline).
    - ``spectral``: spectral clustering of the graph weighted by tensor bytes, repaired into
      K contiguous stages of a topological order.

    Args:
        graph: the graph to split.
        k: the number of stages, 1..number of nodes.
        devices: the devices in pipeline order (at least K; the first K are used); None: K
            reference devices.
        strategy: one of ``plan.STRATEGIES``.
        slack: balanced only: fewest boundary bytes within this fraction of the best
            bottleneck.

    Returns:
        The K stages, each on its device.

    Raises:
        PlanError: K is out of range, the strategy is unknown, there are too few devices, the
            graph is inconsistent, or no split meets the memory caps.
    """
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    n = len(graph.nodes)
    if n == 0:
        raise PlanError("the model has no nodes to split")
    if k < 1:
        raise PlanError(f"cannot cut a model into {k} shards: ask for at least 1")
    if k > n:
        raise PlanError(f"cannot cut a model of {n} operators into {k} shards: ask for at most {n}")
    devs = devices_for(k, devices)
    check_devices(devs)
    facts = graph_facts(graph)
    order = greedy_order(facts, graph)

    if strategy == "balanced":
        layout = order_layout(facts, graph, order)
        cuts = balanced_cuts(facts, graph, layout, devs, slack)
        return layout_stages(facts, graph, layout, cuts, devs)
    if strategy == "even":
        cuts = tuple(s * n // k for s in range(1, k))
        stages = layout_stages(facts, graph, order_layout(facts, graph, order), cuts, devs)
    else:
        spectral_order, cuts = spectral_cuts(facts, graph, order, k)
        layout = order_layout(facts, graph, spectral_order)
        stages = layout_stages(facts, graph, layout, cuts, devs)
    _require_fit(stages, devs, strategy)
    return stages


def _plan(
    analysis: ModelAnalysis,
    graph: PlanningGraph,
    stages: Sequence,
    devices: Sequence[DeviceSpec],
    strategy: str,
    use_profile: bool,
) -> ShardPlan:
    return ShardPlan(
        model_path=analysis.path,
        model_sha256=analysis.sha256,
        strategy=strategy,
        cost_basis="profile" if use_profile else
        "calibrated" if analysis.cost_scale is not None else "estimate",
        input_shapes=analysis.input_shapes,
        devices=tuple(devices),
        stages=tuple(stages),
        total_compute_s=sum(n.cost_s for n in graph.nodes),
        notes=analysis.notes,
    )


def _require_fit(stages: Sequence[Stage], devices: Sequence[DeviceSpec], strategy: str) -> None:
    for stage, dev in zip(stages, devices, strict=False):
        if dev.memory_bytes is not None and stage.memory_bytes > dev.memory_bytes:
            raise PlanError(
                f"the {strategy} split does not fit: stage {stage.index} needs "
                f"{human_bytes(stage.memory_bytes)} but device '{dev.name}' holds "
                f"{human_bytes(dev.memory_bytes)}; use the 'balanced' strategy, which respects "
                "memory caps"
            )
