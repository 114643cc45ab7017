"""From a model analysis to a plan: node costs in seconds, and the `make_plan` entry point.

Estimated costs turn FLOPs into seconds on a reference device (`REFERENCE_FLOPS`) plus a fixed
per-node dispatch overhead, so long graphs of cheap ops are not treated as free. Profiled costs
use the measured seconds instead. Devices' `speed` is relative to that reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from periphery_core.model.analysis import ModelAnalysis
from periphery_core.partition.plan import Boundary, DeviceSpec, ShardPlan, devices_for
from periphery_core.partition.planner import PlanningGraph, PlanNode, plan_stages, stages_from_cuts

# A modest CPU core running ONNX Runtime kernels: 10 GFLOP/s.
REFERENCE_FLOPS = 10e9
# Kernel dispatch and memory traffic of a node that does little arithmetic.
NODE_OVERHEAD_S = 2e-6


def constant_outputs(analysis: ModelAnalysis) -> dict[str, int]:
    """Outputs of `Constant` nodes -> bytes.

    They are re-materialised: extraction copies a Constant into every stage that reads it, so
    they never cross a boundary and count as parameters of the stages that use them.
    """
    outs = set(analysis.outputs)
    return {
        o: analysis.tensors[o].nbytes
        for n in analysis.nodes
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and not n.inputs
        for o in n.outputs
        if o in analysis.tensors and o not in outs
    }


def planning_graph(analysis: ModelAnalysis, use_profile: bool = False) -> PlanningGraph:
    """The planner's view of a model: activations only, costs in seconds."""
    inits = {**analysis.initializers, **constant_outputs(analysis)}
    nodes = []
    for n in analysis.nodes:
        if use_profile and n.measured_s is not None:
            cost = n.measured_s
        else:
            cost = n.flops / REFERENCE_FLOPS + NODE_OVERHEAD_S
        params = [(x, inits[x]) for x in n.inputs if x in inits]
        params += [(o, inits[o]) for o in n.outputs if o in inits]
        nodes.append(
            PlanNode(
                key=n.key,
                cost_s=cost,
                flops=n.flops,
                params=tuple(params),
                inputs=tuple(x for x in n.inputs if x not in inits),
                outputs=tuple(o for o in n.outputs if o not in inits),
            )
        )
    tensors = {
        name: Boundary(name, t.dtype, t.shape, t.nbytes) for name, t in analysis.tensors.items()
    }
    return PlanningGraph(
        nodes=tuple(nodes),
        tensors=tensors,
        graph_inputs=tuple(s.name for s in analysis.inputs),
        graph_outputs=tuple(o for o in analysis.outputs if o in tensors),
    )


def make_plan(
    analysis: ModelAnalysis,
    k: int,
    *,
    strategy: str = "balanced",
    devices: Sequence[DeviceSpec] | None = None,
    use_profile: bool = False,
) -> ShardPlan:
    """Plan `k` shards of an analysed model (pure: no I/O).

    Raises:
        PlanError: k does not fit the model, the strategy is unknown, or memory caps cannot
            be met.
    """
    devs = devices_for(k, devices)
    graph = planning_graph(analysis, use_profile)
    stages = plan_stages(graph, k, devs, strategy)
    return _plan(analysis, graph, stages, devs, strategy, use_profile)


def replan_with_cuts(
    analysis: ModelAnalysis,
    plan: ShardPlan,
    cuts: Sequence[int],
    devices: Sequence[DeviceSpec] | None = None,
) -> ShardPlan:
    """The same node order as `plan`, cut at new positions (how the app moves a boundary)."""
    use_profile = plan.cost_basis == "profile"
    graph = planning_graph(analysis, use_profile)
    index = {n.key: i for i, n in enumerate(graph.nodes)}
    order = [index[key] for s in plan.stages for key in s.nodes]
    devs = tuple(devices) if devices is not None else plan.devices
    stages = stages_from_cuts(graph, order, cuts, devs[: len(cuts) + 1])
    return _plan(analysis, graph, stages, devs[: len(cuts) + 1], "manual", use_profile)


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
        cost_basis="profile" if use_profile else "estimate",
        input_shapes=analysis.input_shapes,
        devices=tuple(devices),
        stages=tuple(stages),
        total_compute_s=sum(n.cost_s for n in graph.nodes),
        notes=analysis.notes,
    )
