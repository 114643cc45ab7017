"""The planner's cost model: the graph it plans, and what one segmentation of an order costs.

A plan is a topological order of the nodes cut into K contiguous segments; segment s runs on
device s and sends its outputs to device s+1. Everything here is a function of a small
in-memory `PlanningGraph`: no I/O, no ONNX.

Cost model (every strategy is judged by it; `stages_from_cuts` is its one implementation):

- Stage s is the segment ``order[c_s:c_{s+1}]`` on ``devices[s]``.
- The boundary after stage s holds the tensors available after it (graph inputs and outputs of
  nodes in stages <= s) that a later stage reads or that are graph outputs, in order of first
  availability. Stage 0 reads the graph inputs that are used at all; stage s > 0 reads the
  boundary before it; the last stage's outputs are exactly the graph outputs. A tensor made in
  stage 0 and read in stage 3 therefore passes through the boundaries of stages 0, 1 and 2.
- ``compute_s = sum(node cost_s) / speed``; ``transfer_s = output bytes / bandwidth`` (the
  last stage sends the graph outputs back to the master). A node sends one request's outputs
  on its own thread while it computes the next, so in a stream a stage's period is the larger
  of its compute and its transfer, and the plan's bottleneck is its slowest stage. (One request
  alone waits for every stage's compute and transfer in turn, wherever the cuts are.)
- A stage holds the distinct initializers its nodes read plus its peak live activations, where
  ``live(i)`` is the bytes resident while the node at position i runs: tensors made before i
  and still needed at or after i (or graph outputs), plus node i's own outputs. That must fit
  the device's ``memory_bytes`` when it has one.

Key design choice: the graph is numbered and validated once (`GraphFacts`), and one order's
per-position quantities (`OrderLayout`: boundary bytes, live bytes, cost prefix sums) are
computed once with numpy, so every quantity of a segment ``[a, b)`` of that order is a prefix
sum, a running maximum or a running distinct count. The strategies (`balanced`, `spectral`)
and a cut moved by hand all end in `layout_stages`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from periphery_core.errors import PlanError
from periphery_core.partition.plan import Boundary, DeviceSpec, Stage, devices_for


@dataclass(frozen=True, slots=True)
class PlanNode:
    """One node of the graph as the planner sees it.

    Attributes:
        key: unique node id.
        cost_s: compute seconds on the reference device (speed 1.0).
        flops: floating-point operations.
        params: (initializer name, bytes) for each initializer the node reads; several nodes
            may share one initializer.
        inputs: activation tensors it reads (graph inputs or other nodes' outputs).
        outputs: tensors it writes.
    """

    key: str
    cost_s: float
    flops: int
    params: tuple[tuple[str, int], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class PlanningGraph:
    """What the planner needs to know about a model.

    Attributes:
        nodes: the nodes in the model's own (topological) order.
        tensors: every activation tensor, graph inputs included, with its dtype, shape, bytes.
        graph_inputs: the model's inputs.
        graph_outputs: the model's outputs (graph inputs or any node's outputs).
    """

    nodes: tuple[PlanNode, ...]
    tensors: Mapping[str, Boundary]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Facts about a graph (independent of the order) and about an order.


@dataclass(frozen=True, slots=True)
class GraphFacts:
    """The graph with tensors and initializers numbered; validated once."""

    n: int
    tensor_names: tuple[str, ...]
    tensor_bytes: tuple[int, ...]
    producer: tuple[int, ...]  # node index, or -1 for a graph input
    sub_rank: tuple[int, ...]  # graph-input index or output slot: orders ties in availability
    consumers: tuple[tuple[int, ...], ...]  # distinct node indices, per tensor
    is_output: tuple[bool, ...]
    graph_outputs: tuple[int, ...]  # distinct, in graph_outputs order
    node_inputs: tuple[tuple[int, ...], ...]  # distinct tensor ids
    node_outputs: tuple[tuple[int, ...], ...]
    node_params: tuple[tuple[int, ...], ...]  # distinct initializer ids
    param_bytes: tuple[int, ...]  # per initializer id


def graph_facts(graph: PlanningGraph) -> GraphFacts:
    """Number and validate the graph's tensors and initializers (raises `PlanError`)."""
    tensor_ids: dict[str, int] = {}
    names: list[str] = []
    nbytes: list[int] = []
    producer: list[int] = []
    sub_rank: list[int] = []

    def add(name: str, prod: int, sub: int) -> None:
        info = graph.tensors.get(name)
        if info is None:
            raise PlanError(f"tensor '{name}' has no known size: the planning graph is incomplete")
        tensor_ids[name] = len(names)
        names.append(name)
        nbytes.append(int(info.nbytes))
        producer.append(prod)
        sub_rank.append(sub)

    for i, name in enumerate(dict.fromkeys(graph.graph_inputs)):
        add(name, -1, i)
    keys: set[str] = set()
    for v, node in enumerate(graph.nodes):
        if node.key in keys:
            raise PlanError(f"two nodes share the id '{node.key}'")
        if not (math.isfinite(node.cost_s) and node.cost_s >= 0):
            raise PlanError(f"node '{node.key}' has cost {node.cost_s} s: a cost must be a "
                            "non-negative number")
        keys.add(node.key)
        for slot, name in enumerate(node.outputs):
            if not name:
                continue
            if name in tensor_ids:
                raise PlanError(f"tensor '{name}' is written twice (by node '{node.key}' and "
                                "another node or the graph inputs)")
            add(name, v, slot)

    consumers: list[list[int]] = [[] for _ in names]
    node_inputs: list[tuple[int, ...]] = []
    node_outputs: list[tuple[int, ...]] = []
    node_params: list[tuple[int, ...]] = []
    param_ids: dict[str, int] = {}
    param_bytes: list[int] = []
    for v, node in enumerate(graph.nodes):
        ins: list[int] = []
        for name in dict.fromkeys(node.inputs):
            if not name:
                continue  # an omitted optional input
            t = tensor_ids.get(name)
            if t is None:
                raise PlanError(f"node '{node.key}' reads '{name}', which is neither a graph "
                                "input nor made by any node")
            ins.append(t)
            consumers[t].append(v)
        node_inputs.append(tuple(ins))
        node_outputs.append(tuple(tensor_ids[name] for name in node.outputs if name))
        ps: dict[int, None] = {}
        for pname, size in node.params:
            p = param_ids.get(pname)
            if p is None:
                p = param_ids[pname] = len(param_bytes)
                param_bytes.append(int(size))
            else:  # one initializer has one size; take the largest claim
                param_bytes[p] = max(param_bytes[p], int(size))
            ps[p] = None
        node_params.append(tuple(ps))

    outs: list[int] = []
    for name in dict.fromkeys(graph.graph_outputs):
        t = tensor_ids.get(name)
        if t is None:
            raise PlanError(f"graph output '{name}' is neither a graph input nor made by any node")
        outs.append(t)
    is_output = [False] * len(names)
    for t in outs:
        is_output[t] = True

    return GraphFacts(
        n=len(graph.nodes),
        tensor_names=tuple(names),
        tensor_bytes=tuple(nbytes),
        producer=tuple(producer),
        sub_rank=tuple(sub_rank),
        consumers=tuple(tuple(c) for c in consumers),
        is_output=tuple(is_output),
        graph_outputs=tuple(outs),
        node_inputs=tuple(node_inputs),
        node_outputs=tuple(node_outputs),
        node_params=tuple(node_params),
        param_bytes=tuple(param_bytes),
    )


@dataclass(frozen=True, slots=True)
class OrderLayout:
    """One topological order of the graph and the per-position quantities of the cost model."""

    order: tuple[int, ...]
    avail: np.ndarray  # per tensor: first cut position after which it exists (0: graph input)
    last: np.ndarray  # per tensor: last position that needs it (n: graph output; -1: none)
    boundary_bytes: np.ndarray  # length n + 1: bytes crossing a cut at each position
    live: np.ndarray  # length n: bytes resident while the node at each position runs
    cost_prefix: np.ndarray  # length n + 1: prefix sums of cost_s along the order


def order_layout(facts: GraphFacts, graph: PlanningGraph, order: Sequence[int]) -> OrderLayout:
    """The per-position quantities of `order` (raises `PlanError` if it is not topological)."""
    n = facts.n
    order_t = tuple(int(v) for v in order)
    if len(order_t) != n or sorted(order_t) != list(range(n)):
        raise PlanError(f"the order must list each of the {n} nodes exactly once")
    pos = [0] * n
    for p, v in enumerate(order_t):
        pos[v] = p
    producer = np.asarray(facts.producer, dtype=np.int64)
    pos_arr = np.asarray(pos, dtype=np.int64)
    avail = np.where(producer >= 0, pos_arr[np.maximum(producer, 0)] + 1, 0)
    last = np.full(len(facts.tensor_names), -1, dtype=np.int64)
    for t, cons in enumerate(facts.consumers):
        if cons:
            last[t] = max(pos[v] for v in cons)
    for p, v in enumerate(order_t):
        for t in facts.node_inputs[v]:
            if avail[t] > p:
                raise PlanError(f"the order is not topological: node '{graph.nodes[v].key}' "
                                f"runs before '{facts.tensor_names[t]}' is made")
    last[list(facts.graph_outputs)] = n
    nbytes = np.asarray(facts.tensor_bytes, dtype=np.int64)
    used = last >= avail
    diff = np.zeros(n + 2, dtype=np.int64)
    np.add.at(diff, avail[used], nbytes[used])
    np.add.at(diff, last[used] + 1, -nbytes[used])
    boundary_bytes = np.cumsum(diff)[: n + 1]
    own = np.array([sum(facts.tensor_bytes[t] for t in facts.node_outputs[v]) for v in order_t],
                   dtype=np.int64)
    live = boundary_bytes[:n] + own
    costs = np.array([graph.nodes[v].cost_s for v in order_t], dtype=np.float64)
    cost_prefix = np.concatenate(([0.0], np.cumsum(costs)))
    return OrderLayout(order_t, avail, last, boundary_bytes, live, cost_prefix)


def check_devices(devices: Sequence[DeviceSpec]) -> None:
    """Raise `PlanError` for a device whose speed or bandwidth is not a positive number."""
    for d in devices:
        if not (d.speed > 0 and math.isfinite(d.speed)):
            raise PlanError(f"device '{d.name}' has speed {d.speed}: it must be positive")
        if not (d.bandwidth > 0 and math.isfinite(d.bandwidth)):
            raise PlanError(f"device '{d.name}' has bandwidth {d.bandwidth}: it must be positive")


def stages_from_cuts(
    graph: PlanningGraph,
    order: Sequence[int],
    cuts: Sequence[int],
    devices: Sequence[DeviceSpec] | None = None,
) -> tuple[Stage, ...]:
    """Evaluate one segmentation of an order under the cost model.

    This does not enforce memory caps (compare ``stage.memory_bytes`` with the device's); every
    strategy ends here, and so does a cut the user moves by hand.

    Args:
        graph: the graph.
        order: a topological order, as indices into ``graph.nodes``.
        cuts: K-1 strictly increasing positions in 1..n-1; stage s is
            ``order[cuts[s-1]:cuts[s]]``.
        devices: at least K devices, the first K used in pipeline order; None: K reference
            devices.

    Returns:
        The K stages.

    Raises:
        PlanError: the order is not a topological order of every node, the cuts are out of
            range or not increasing, or there are too few devices.
    """
    facts = graph_facts(graph)
    layout = order_layout(facts, graph, order)
    return layout_stages(facts, graph, layout, cuts, devices)


def _validate_cuts(cuts: Sequence[int], n: int) -> tuple[int, ...]:
    cut_t = tuple(int(c) for c in cuts)
    previous = 0
    for c in cut_t:
        if not 1 <= c <= n - 1:
            raise PlanError(f"cut {c} is out of range: cuts lie between 1 and {n - 1}")
        if c <= previous:
            raise PlanError(f"cuts must strictly increase, got {list(cut_t)}")
        previous = c
    return cut_t


def layout_stages(
    facts: GraphFacts,
    graph: PlanningGraph,
    layout: OrderLayout,
    cuts: Sequence[int],
    devices: Sequence[DeviceSpec] | None,
) -> tuple[Stage, ...]:
    """`stages_from_cuts` on a graph and order already numbered and laid out."""
    n = facts.n
    cut_t = _validate_cuts(cuts, n)
    k = len(cut_t) + 1
    devs = devices_for(k, devices)
    check_devices(devs)
    bounds = (0, *cut_t, n)

    # Boundary lists at positions 0 and each inner cut, in order of first availability.
    wanted = (0, *cut_t)
    crossing: dict[int, list[int]] = {c: [] for c in wanted}
    ranked = sorted(
        (t for t in range(len(facts.tensor_names)) if layout.last[t] >= layout.avail[t]),
        key=lambda t: (int(layout.avail[t]), facts.sub_rank[t]),
    )
    cut_arr = np.asarray(wanted, dtype=np.int64)
    for t in ranked:
        lo = int(np.searchsorted(cut_arr, layout.avail[t], side="left"))
        hi = int(np.searchsorted(cut_arr, layout.last[t], side="right"))
        for i in range(lo, hi):
            crossing[wanted[i]].append(t)

    def boundary(ts: Sequence[int]) -> tuple[Boundary, ...]:
        return tuple(graph.tensors[facts.tensor_names[t]] for t in ts)

    stages: list[Stage] = []
    for s in range(k):
        a, b = bounds[s], bounds[s + 1]
        nodes = layout.order[a:b]
        params: set[int] = set()
        for v in nodes:
            params.update(facts.node_params[v])
        outs = boundary(facts.graph_outputs if s == k - 1 else crossing[b])
        dev = devs[s]
        stages.append(Stage(
            index=s,
            device=dev.name,
            nodes=tuple(graph.nodes[v].key for v in nodes),
            inputs=boundary(crossing[a]),
            outputs=outs,
            compute_s=math.fsum(graph.nodes[v].cost_s for v in nodes) / dev.speed,
            transfer_s=sum(o.nbytes for o in outs) / dev.bandwidth,
            flops=sum(graph.nodes[v].flops for v in nodes),
            param_bytes=sum(facts.param_bytes[p] for p in params),
            peak_activation_bytes=int(layout.live[a:b].max()),
            workers=dev.workers,
        ))
    return tuple(stages)
