"""The pure planner: cut a graph's nodes into K pipeline stages on K devices.

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
  last stage sends the graph outputs back to the master). A stage costs compute + transfer and
  the plan's bottleneck is its costliest stage.
- A stage holds the distinct initializers its nodes read plus its peak live activations, where
  ``live(i)`` is the bytes resident while the node at position i runs: tensors made before i
  and still needed at or after i (or graph outputs), plus node i's own outputs. That must fit
  the device's ``memory_bytes`` when it has one.

Key design choice: the order is chosen once, up front (`choose_order`, a greedy list schedule
that keeps few bytes live, so the cheap cut points are also the thin ones), and then the
segmentation is optimised exactly. Every quantity of a segment ``[a, b)`` of a fixed order is a
prefix sum, a running maximum or a running distinct count, so "balanced" is a dynamic
programme over cut positions that is provably optimal for that order, even with heterogeneous
devices and memory caps, and costs O(K n^2) vectorised work.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from periphery_core.errors import PlanError
from periphery_core.partition.plan import STRATEGIES, Boundary, DeviceSpec, Stage, devices_for

__all__ = [
    "PlanNode",
    "PlanningGraph",
    "choose_order",
    "plan_stages",
    "stages_from_cuts",
]


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
class _Facts:
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


def _facts(graph: PlanningGraph) -> _Facts:
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

    return _Facts(
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
class _Layout:
    """One topological order of the graph and the per-position quantities of the cost model."""

    order: tuple[int, ...]
    avail: np.ndarray  # per tensor: first cut position after which it exists (0: graph input)
    last: np.ndarray  # per tensor: last position that needs it (n: graph output; -1: none)
    boundary_bytes: np.ndarray  # length n + 1: bytes crossing a cut at each position
    live: np.ndarray  # length n: bytes resident while the node at each position runs
    cost_prefix: np.ndarray  # length n + 1: prefix sums of cost_s along the order


def _layout(facts: _Facts, graph: PlanningGraph, order: Sequence[int]) -> _Layout:
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
    return _Layout(order_t, avail, last, boundary_bytes, live, cost_prefix)


def _check_devices(devices: Sequence[DeviceSpec]) -> None:
    for d in devices:
        if not (d.speed > 0 and math.isfinite(d.speed)):
            raise PlanError(f"device '{d.name}' has speed {d.speed}: it must be positive")
        if not (d.bandwidth > 0 and math.isfinite(d.bandwidth)):
            raise PlanError(f"device '{d.name}' has bandwidth {d.bandwidth}: it must be positive")


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# The order.


def choose_order(graph: PlanningGraph) -> tuple[int, ...]:
    """Choose the topological order whose cut points carry few bytes.

    A greedy list schedule: among the nodes whose inputs are all made, run the one that most
    reduces (or least increases) the bytes kept live, ties going to the model's own order. A
    chain therefore keeps the model's order, and a branch or skip connection is finished before
    the schedule moves on, so the tensors that cross a cut are few and small. A lazy heap keeps
    it O((n + edges) log n) and deterministic.

    Args:
        graph: the graph to order.

    Returns:
        Indices into ``graph.nodes``, in the order to run them.

    Raises:
        PlanError: the graph is inconsistent (unknown tensors, a cycle, ...).
    """
    facts = _facts(graph)
    return _choose_order(facts, graph)


def _choose_order(facts: _Facts, graph: PlanningGraph) -> tuple[int, ...]:
    n = facts.n
    nbytes = facts.tensor_bytes
    remaining = [len(c) for c in facts.consumers]  # consumers that have not run yet
    missing = [sum(1 for t in facts.node_inputs[v] if facts.producer[t] >= 0) for v in range(n)]
    done = [False] * n
    ready = [False] * n
    delta = [0] * n
    heap: list[tuple[int, int]] = []

    def kept(t: int) -> bool:  # does the tensor stay live after it is made?
        return remaining[t] > 0 or facts.is_output[t]

    def push(v: int) -> None:
        d = sum(nbytes[t] for t in facts.node_outputs[v] if kept(t))
        d -= sum(nbytes[t] for t in facts.node_inputs[v]
                 if remaining[t] == 1 and not facts.is_output[t])
        delta[v] = d
        ready[v] = True
        heapq.heappush(heap, (d, v))

    for v in range(n):
        if missing[v] == 0:
            push(v)
    order: list[int] = []
    while heap:
        d, v = heapq.heappop(heap)
        if done[v] or d != delta[v]:
            continue  # a stale entry: the node ran, or its delta dropped since
        done[v] = True
        order.append(v)
        for t in facts.node_inputs[v]:
            remaining[t] -= 1
            if remaining[t] == 1 and not facts.is_output[t]:
                # Its one remaining consumer would now free it: that consumer got cheaper.
                u = next(u for u in facts.consumers[t] if not done[u])
                if ready[u]:
                    delta[u] -= nbytes[t]
                    heapq.heappush(heap, (delta[u], u))
        for t in facts.node_outputs[v]:
            for u in facts.consumers[t]:
                missing[u] -= 1
                if missing[u] == 0:
                    push(u)
    if len(order) != n:
        stuck = next(graph.nodes[v].key for v in range(n) if not done[v])
        raise PlanError(f"the graph has a cycle: node '{stuck}' can never run")
    return tuple(order)


# ---------------------------------------------------------------------------------------------
# Evaluating a segmentation.


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
    facts = _facts(graph)
    layout = _layout(facts, graph, order)
    return _stages(facts, graph, layout, cuts, devices)


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


def _stages(
    facts: _Facts,
    graph: PlanningGraph,
    layout: _Layout,
    cuts: Sequence[int],
    devices: Sequence[DeviceSpec] | None,
) -> tuple[Stage, ...]:
    n = facts.n
    cut_t = _validate_cuts(cuts, n)
    k = len(cut_t) + 1
    devs = devices_for(k, devices)
    _check_devices(devs)
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
        ))
    return tuple(stages)


def _require_fit(stages: Sequence[Stage], devices: Sequence[DeviceSpec], strategy: str) -> None:
    for stage, dev in zip(stages, devices, strict=False):
        if dev.memory_bytes is not None and stage.memory_bytes > dev.memory_bytes:
            raise PlanError(
                f"the {strategy} split does not fit: stage {stage.index} needs "
                f"{_fmt_bytes(stage.memory_bytes)} but device '{dev.name}' holds "
                f"{_fmt_bytes(dev.memory_bytes)}; use the 'balanced' strategy, which respects "
                "memory caps"
            )


# ---------------------------------------------------------------------------------------------
# Strategies.


def plan_stages(
    graph: PlanningGraph,
    k: int,
    devices: Sequence[DeviceSpec] | None = None,
    strategy: str = "balanced",
) -> tuple[Stage, ...]:
    """Cut the graph into K pipeline stages on K devices.

    Strategies:

    - ``balanced``: the segmentation of `choose_order`'s order with the smallest bottleneck
      that fits every memory cap (exact dynamic programme); among equally good ones, the one
      with the fewest boundary bytes, then the earliest cuts.
    - ``even``: the same order cut into stages with equal node counts (the naive baseline).
    - ``spectral``: spectral clustering of the graph weighted by tensor bytes, repaired into
      K contiguous stages of a topological order.

    Args:
        graph: the graph to split.
        k: the number of stages, 1..number of nodes.
        devices: the devices in pipeline order (at least K; the first K are used); None: K
            reference devices.
        strategy: one of ``plan.STRATEGIES``.

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
        raise PlanError(f"cannot cut {n} nodes into {k} shards: ask for at most {n}")
    devs = devices_for(k, devices)
    _check_devices(devs)
    facts = _facts(graph)
    order = _choose_order(facts, graph)

    if strategy == "balanced":
        layout = _layout(facts, graph, order)
        cuts = _balanced_cuts(facts, graph, layout, devs)
        return _stages(facts, graph, layout, cuts, devs)
    if strategy == "even":
        cuts = tuple(s * n // k for s in range(1, k))
        stages = _stages(facts, graph, _layout(facts, graph, order), cuts, devs)
    else:
        spectral_order, cuts = _spectral_cuts(facts, graph, order, k)
        stages = _stages(facts, graph, _layout(facts, graph, spectral_order), cuts, devs)
    _require_fit(stages, devs, strategy)
    return stages


def _balanced_cuts(
    facts: _Facts, graph: PlanningGraph, layout: _Layout, devs: Sequence[DeviceSpec]
) -> tuple[int, ...]:
    """The optimal cuts of ``layout.order`` for ``devs``.

    Stage j covers ``[a, b)``. With C the prefix sums of cost, B[b] the bytes crossing a cut
    at b, P_b[a] the distinct initializer bytes of ``[a, b)`` and R_b[a] = max(live[a:b]):

        cost_j(a, b) = (C[b] - C[a]) / speed_j + B[b] / bandwidth_j   (last stage: graph outputs)
        fits_j(a, b) = P_b[a] + R_b[a] <= memory_j
        f[j][b] = min over a of max(f[j-1][a], cost_j(a, b))          (infeasible: inf)

    The outer loop runs over b, so P and R are kept as vectors over a and updated in place:
    R_{b+1} = max(R_b, live[b]); and the node at b adds its initializer's bytes to every a
    after that initializer's previous use (the distinct-count trick), so P is exact, shared
    weights counted once, for any n, in O(n) memory. A second pass of the same shape then picks,
    among the segmentations within the optimum, the fewest boundary bytes, earliest cuts first.
    """
    n, k = facts.n, len(devs)
    if k == 1:
        cap0 = devs[0].memory_bytes
        need = _segment_memory(facts, layout, 0, n)
        if cap0 is not None and need > cap0:
            raise PlanError(_memory_message(devs[0], cap0, 0, need))
        return ()

    speed = np.array([d.speed for d in devs], dtype=np.float64)
    bandwidth = np.array([d.bandwidth for d in devs], dtype=np.float64)
    cap = np.array([np.inf if d.memory_bytes is None else float(d.memory_bytes) for d in devs])
    out_bytes = float(sum(facts.tensor_bytes[t] for t in facts.graph_outputs))
    C = layout.cost_prefix
    B = layout.boundary_bytes.astype(np.float64)
    live = layout.live

    # Each (position, initializer) use and the previous position using that initializer.
    uses: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    last_use: dict[int, int] = {}
    for p, v in enumerate(layout.order):
        for q in facts.node_params[v]:
            uses[p].append((last_use.get(q, -1), facts.param_bytes[q]))
            last_use[q] = p

    def sweep(threshold: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One DP pass. threshold None: minimise the bottleneck (f). Else: among stages costing
        at most threshold, minimise the summed boundary bytes (g), keeping parents."""
        f = np.full((k, n + 1), np.inf)
        parent = np.zeros((k, n + 1), dtype=np.int64)
        params = np.zeros(n, dtype=np.int64)
        peak = np.zeros(n, dtype=np.int64)
        mem_end = np.zeros(n, dtype=np.int64)
        inv_speed = (1.0 / speed)[:, None]
        for b in range(1, n + 1):
            p = b - 1
            for prev, size in uses[p]:
                params[prev + 1 : b] += size
            np.maximum(peak[:b], live[p], out=peak[:b])
            mem = params[:b] + peak[:b]
            if b == n:
                mem_end = mem
            transfer = B[b] / bandwidth if b < n else np.full(k, out_bytes) / bandwidth
            cost = (C[b] - C[:b])[None, :] * inv_speed + transfer[:, None]  # (k, b)
            ok = mem[None, :] <= cap[:, None] + 1
            if threshold is not None:
                ok &= cost <= threshold
            # Stage 0 starts at 0; stage j >= 1 continues from f[j-1][a].
            prev_f = np.vstack((np.full((1, b), np.inf), f[: k - 1, :b]))
            prev_f[0, 0] = 0.0
            if threshold is None:
                val = np.where(ok, np.maximum(prev_f, cost), np.inf)
            else:
                val = np.where(ok, prev_f + (0.0 if b == n else B[b]), np.inf)
            best = np.argmin(val, axis=1)
            f[:, b] = val[np.arange(k), best]
            parent[:, b] = best
            # Stage j must leave room for the k-1-j stages after it; only the last ends at n.
            jmin = b - (n - k + 1)
            if jmin > 0:
                f[:jmin, b] = np.inf
            if b < n:
                f[k - 1, b] = np.inf
        return f, parent, mem_end

    f, _, mem_end = sweep(None)
    best = f[k - 1, n]
    if not math.isfinite(best):
        raise PlanError(_diagnose_memory(facts, layout, devs, f, mem_end))
    g, parent, _ = sweep(best * (1.0 + 1e-12) + 1e-300)
    cuts: list[int] = []
    b = n
    for j in range(k - 1, 0, -1):
        b = int(parent[j, b])
        cuts.append(b)
    if not math.isfinite(g[k - 1, n]):  # pragma: no cover - the first pass found a witness
        raise PlanError("internal error: the balanced plan could not be reconstructed")
    return tuple(reversed(cuts))


def _segment_memory(facts: _Facts, layout: _Layout, a: int, b: int) -> int:
    params: set[int] = set()
    for v in layout.order[a:b]:
        params.update(facts.node_params[v])
    return sum(facts.param_bytes[p] for p in params) + int(layout.live[a:b].max())


def _memory_message(dev: DeviceSpec, cap: int, stage: int, need: int) -> str:
    return (f"the memory cap of device '{dev.name}' ({_fmt_bytes(cap)}) cannot be "
            f"met: in every split, stage {stage} needs at least {_fmt_bytes(need)} (parameters "
            "+ activations); give it more memory, or use more or other devices")


def _diagnose_memory(
    facts: _Facts, layout: _Layout, devs: Sequence[DeviceSpec], f: np.ndarray,
    mem_end: np.ndarray,
) -> str:
    """Name the first device that no split can satisfy, and what it would need."""
    n, k = facts.n, len(devs)
    reachable = np.zeros(n, dtype=bool)
    reachable[0] = True  # where stage j may start
    for j in range(k):
        if j == k - 1:
            need = int(mem_end[reachable].min())
        elif not np.isfinite(f[j]).any():
            # The smallest stage j could hold is one node; memory only grows with length.
            need = min(_segment_memory(facts, layout, int(a), int(a) + 1)
                       for a in np.flatnonzero(reachable))
        else:
            reachable = np.isfinite(f[j, :n])
            continue
        return _memory_message(devs[j], devs[j].memory_bytes or 0, j, need)
    return "no split meets the memory caps"  # pragma: no cover


def _spectral_cuts(
    facts: _Facts, graph: PlanningGraph, order: Sequence[int], k: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Spectral clustering, repaired into K contiguous stages of a topological order.

    Nodes are joined by edges weighted with the bytes of the tensors between them (plus a faint
    chain along the order, so the graph is connected); the rows of the K eigenvectors of the
    normalised Laplacian with the smallest eigenvalues are clustered by k-means from a
    deterministic farthest-point start. Clusters are then ranked by mean position, labels are
    made monotone along edges (a node goes no earlier than its producers), empty labels are
    dropped and the costliest stages split until there are K.

    Returns:
        The order (sorted by label, then position in ``order``) and its K-1 cuts.
    """
    from scipy.cluster.vq import kmeans2
    from scipy.sparse import coo_matrix, diags, identity
    from scipy.sparse.linalg import eigsh

    n = facts.n
    pos = np.empty(n, dtype=np.int64)
    pos[list(order)] = np.arange(n)
    if k == 1:
        return tuple(order), ()

    rows: list[int] = []
    cols: list[int] = []
    weights: list[float] = []
    for t, cons in enumerate(facts.consumers):
        u = facts.producer[t]
        if u < 0:
            continue
        for v in cons:
            rows.append(u)
            cols.append(v)
            weights.append(float(facts.tensor_bytes[t]))
    w = np.asarray(weights, dtype=np.float64)
    scale = float(w.max()) if w.size and w.max() > 0 else 1.0
    w = w / scale + 1e-3  # a zero-byte edge still ties its nodes together
    chain = np.asarray(order, dtype=np.int64)
    rows_a = np.concatenate((rows, chain[:-1])).astype(np.int64)
    cols_a = np.concatenate((cols, chain[1:])).astype(np.int64)
    w = np.concatenate((w, np.full(n - 1, 1e-6)))
    adj = coo_matrix((w, (rows_a, cols_a)), shape=(n, n)).tocsr()
    adj = (adj + adj.T).tocsr()
    deg = np.asarray(adj.sum(axis=1)).ravel()
    d_inv_sqrt = diags(1.0 / np.sqrt(deg))
    lap = (identity(n, format="csr") - d_inv_sqrt @ adj @ d_inv_sqrt).tocsc()

    if n <= 400 or k + 1 >= n:
        _, vecs = np.linalg.eigh(lap.toarray())
        emb = vecs[:, :k]
    else:
        v0 = np.cos(np.arange(n, dtype=np.float64))  # a fixed start: eigsh is otherwise random
        vals, vecs = eigsh(lap, k=k, sigma=-1e-3, which="LM", v0=v0)
        emb = vecs[:, np.argsort(vals)]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)

    # Farthest-point start from the first node of the order, then Lloyd iterations.
    centres = [int(chain[0])]
    dist = np.linalg.norm(emb - emb[centres[0]], axis=1)
    for _c in range(1, k):
        nxt = int(np.argmax(dist))
        centres.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(emb - emb[nxt], axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, labels = kmeans2(emb, emb[centres].copy(), iter=20, minit="matrix")

    # Rank clusters by mean position; then no node earlier than its producers.
    present = np.unique(labels)
    means = np.array([pos[labels == c].mean() for c in present])
    rank = {int(c): r for r, c in enumerate(present[np.lexsort((present, means))])}
    label = np.array([rank[int(c)] for c in labels], dtype=np.int64)
    for v in chain:
        for t in facts.node_inputs[int(v)]:
            u = facts.producer[t]
            if u >= 0 and label[u] > label[v]:
                label[v] = label[u]
    new_order = sorted(range(n), key=lambda v: (int(label[v]), int(pos[v])))
    groups: list[list[int]] = []
    for v in new_order:
        if groups and label[groups[-1][-1]] == label[v]:
            groups[-1].append(v)
        else:
            groups.append([v])

    costs = [graph.nodes[v].cost_s for v in range(n)]
    while len(groups) < k:
        # Split the costliest group of two or more nodes where its cost halves.
        idx = max((i for i, g in enumerate(groups) if len(g) > 1),
                  key=lambda i: (math.fsum(costs[v] for v in groups[i]), len(groups[i]), -i))
        g = groups[idx]
        total = math.fsum(costs[v] for v in g)
        acc, at = 0.0, 1
        for i in range(1, len(g)):
            acc += costs[g[i - 1]]
            at = i
            if acc >= total / 2:
                break
        groups[idx : idx + 1] = [g[:at], g[at:]]
    while len(groups) > k:  # pragma: no cover - labels never exceed k; kept for safety
        i = min(range(len(groups) - 1), key=lambda i: len(groups[i]) + len(groups[i + 1]))
        groups[i : i + 2] = [groups[i] + groups[i + 1]]
    cuts = tuple(int(c) for c in np.cumsum([len(g) for g in groups])[:-1])
    return tuple(v for g in groups for v in g), cuts
