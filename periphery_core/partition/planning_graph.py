"""The planner's view of an analysed model (`planning_graph`), with node costs in seconds.

Estimated costs turn FLOPs into seconds on a reference device (`REFERENCE_FLOPS`) plus a fixed
per-node dispatch overhead, so long graphs of cheap ops are not treated as free, times the
analysis's `cost_scale` (a timed run of the whole model, where one was made). Profiled costs
use the measured seconds instead. Devices' `speed` is relative to that reference.
"""

from __future__ import annotations

from collections.abc import Mapping

from periphery_core.model.analysis import ModelAnalysis, NodeInfo
from periphery_core.partition.cost_model import PlanningGraph, PlanNode
from periphery_core.partition.plan import REFERENCE_FLOPS, Boundary

# Kernel dispatch and memory traffic of a node that does little arithmetic.
NODE_OVERHEAD_S = 2e-6


def constant_closure(analysis: ModelAnalysis) -> dict[str, tuple[tuple[str, int], ...]]:
    """For each output of a constant-foldable node: the bytes a stage holds to recompute it.

    That is the output itself plus every weight and intermediate of the constant chain that
    makes it, as (name, bytes) pairs, so shared chains are counted once per stage.
    """
    inits = analysis.initializers
    closure: dict[str, tuple[tuple[str, int], ...]] = {}
    for n in analysis.nodes:
        if n.key not in analysis.constant_nodes:
            continue
        parts: dict[str, int] = {}
        for x in n.inputs:
            if x in inits:
                parts[x] = inits[x]
            for name, size in closure.get(x, ()):
                parts[name] = size
        for o in n.outputs:
            own = analysis.tensors[o].nbytes if o in analysis.tensors else 0
            closure[o] = (*parts.items(), (o, own))
    return closure


def node_cost_s(node: NodeInfo, use_profile: bool = False) -> float:
    """A node's compute on the reference device: measured (`use_profile`, where it was), else
    estimated from its FLOPs plus the dispatch overhead."""
    if use_profile and node.measured_s is not None:
        return node.measured_s
    return node.flops / REFERENCE_FLOPS + NODE_OVERHEAD_S


def planning_graph(analysis: ModelAnalysis, use_profile: bool = False,
                   state: Mapping[str, tuple[str, int]] | None = None) -> PlanningGraph:
    """The planner's view of a model: activations only, costs in seconds.

    Constant-foldable nodes are recomputed by every stage that reads them (extraction copies
    them), so they cost nothing where the plan lists them and their outputs count as the
    parameters of their readers, never as boundary tensors.

    `state` maps a decoder's cache inputs to (their cache output, the bytes the cache may
    grow to): a stage keeps the caches its nodes read (generate.stateful), so they count as
    its parameters (as `NAME#cache`), and the cache tensors cost nothing at a boundary (the
    plan still lists them where they would pass, so its stages stay complete; the stateful
    rewrite drops them).
    """
    state = dict(state or {})
    kept = set(state) | {present for present, _ in state.values()}
    inits = analysis.initializers
    consts = constant_closure(analysis)
    nodes = []
    for n in analysis.nodes:
        if n.key in analysis.constant_nodes:
            nodes.append(PlanNode(key=n.key, cost_s=0.0, flops=0, params=(), inputs=(),
                                  outputs=()))
            continue
        cost = node_cost_s(n, use_profile)
        if analysis.cost_scale is not None and not (use_profile and n.measured_s is not None):
            cost *= analysis.cost_scale  # an estimate, scaled to the model's measured run
        params = {x: inits[x] for x in n.inputs if x in inits}
        params.update({f"{x}#cache": state[x][1] for x in n.inputs if x in state})
        for x in n.inputs:
            params.update(consts.get(x, ()))
        nodes.append(
            PlanNode(
                key=n.key,
                cost_s=cost,
                flops=n.flops,
                params=tuple(params.items()),
                inputs=tuple(x for x in n.inputs if x not in inits and x not in consts),
                outputs=n.outputs,
            )
        )
    tensors = {
        name: Boundary(name, t.dtype if t.kind == "tensor" else f"{t.kind}({t.dtype})", t.shape,
                       0 if name in kept else t.nbytes)
        for name, t in analysis.tensors.items()
    }
    return PlanningGraph(
        nodes=tuple(nodes),
        tensors=tensors,
        graph_inputs=tuple(s.name for s in analysis.inputs),
        graph_outputs=tuple(o for o in analysis.outputs if o in tensors),
    )
