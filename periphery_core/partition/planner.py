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
segmentation of that order is optimised exactly. Every quantity of a segment ``[a, b)`` of a
fixed order is a prefix sum, a running maximum or a running distinct count, and both a stage's
cost and its memory only shrink as its start moves later; so "can the bottleneck be at most T"
is a reachability DP over cut positions in O(K n) numpy work, and "balanced" bisects on T. It
is provably optimal for that order (to a relative 1e-13), with heterogeneous devices and
memory caps, and takes milliseconds for thousands of nodes.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections import deque
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
      that fits every memory cap (exact, see the module docstring); among equally good ones,
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

    Stage j covers positions ``[a, b)``. With C the prefix sums of cost and B[b] the bytes that
    cross a cut at b:

        cost_j(a, b) = (C[b] - C[a]) / speed_j + B[b] / bandwidth_j   (last stage: graph outputs)
        mem(a, b) = distinct initializer bytes of [a, b) + max(live[a:b])

    For fixed b both fall as a grows, so the starts a that keep stage j within a bound T and
    within its memory cap form a window ``[lo_j(b), b - 1]``: lo from a binary search in C for
    the cost, and for the memory a two-pointer sweep that keeps exact distinct-initializer
    counts (shared weights counted once per stage, for any n) and a sliding maximum of live.
    "Can the bottleneck be at most T" is then a reachability DP over cut positions, O(K n) with
    prefix counts, and T* is found by bisection to a relative 1e-13: every segmentation
    costlier than the result by more than that has been ruled out, which is exact up to the
    rounding of the costs themselves. A last pass at T* keeps, among the segmentations within
    it, the one with the fewest boundary bytes (range minima from a sparse table), taking the
    earliest start of each stage on ties.
    """
    n, k = facts.n, len(devs)
    if k == 1:
        cap0 = devs[0].memory_bytes
        need = _segment_memory(facts, layout, 0, n)
        if cap0 is not None and need > cap0:
            raise PlanError(_memory_message(devs[0], cap0, 0, need))
        return ()

    speed = [d.speed for d in devs]
    cost_prefix = layout.cost_prefix
    out_bytes = float(sum(facts.tensor_bytes[t] for t in facts.graph_outputs))
    boundary = layout.boundary_bytes.astype(np.float64)
    starts_by_cap: dict[int | None, np.ndarray] = {}
    for d in devs:
        if d.memory_bytes not in starts_by_cap:
            starts_by_cap[d.memory_bytes] = _memory_starts(facts, layout, d.memory_bytes)

    # Per stage j: the ends b it may have (room for the stages after it), what it sends.
    ends: list[np.ndarray] = []
    sent: list[np.ndarray] = []
    mem_lo: list[np.ndarray] = []
    for j, d in enumerate(devs):
        bs = np.array([n]) if j == k - 1 else np.arange(j + 1, n - (k - 1 - j) + 1)
        ends.append(bs)
        sent.append((np.full(1, out_bytes) if j == k - 1 else boundary[bs]) / d.bandwidth)
        mem_lo.append(np.maximum(starts_by_cap[d.memory_bytes][bs], j))

    def windows(j: int, bound: float) -> tuple[np.ndarray, np.ndarray]:
        bs = ends[j]
        floor = cost_prefix[bs] - speed[j] * (bound - sent[j])
        lo = np.maximum(np.searchsorted(cost_prefix, floor, side="left"), mem_lo[j])
        return lo, bs - 1

    def reachable(bound: float) -> tuple[int, np.ndarray]:
        """(k, _) if a split within bound exists, else (the stage that cannot be placed, the
        positions where it could start)."""
        starts = np.zeros(n + 1, dtype=bool)
        starts[0] = True
        for j in range(k):
            lo, hi = windows(j, bound)
            count = np.concatenate(([0], np.cumsum(starts)))
            ok = (lo <= hi) & (count[hi + 1] - count[np.minimum(lo, hi + 1)] > 0)
            if not ok.any():
                return j, starts
            starts = np.zeros(n + 1, dtype=bool)
            starts[ends[j][ok]] = True
        return k, starts

    stuck, starts = reachable(math.inf)
    if stuck < k:
        raise PlanError(_diagnose_memory(facts, layout, devs, stuck, starts))
    if reachable(0.0)[0] == k:
        bound = 0.0
    else:
        low = 0.0
        bound = max(cost_prefix[n] / min(speed) + float(s.max()) for s in sent)
        while reachable(bound)[0] < k:  # pragma: no cover - only if rounding bites
            bound *= 2.0
        while bound - low > 1e-13 * bound:
            mid = 0.5 * (low + bound)
            if not low < mid < bound:
                break
            if reachable(mid)[0] == k:
                bound = mid
            else:
                low = mid

    # Fewest boundary bytes among the splits within the bound.
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    parents: list[np.ndarray] = []
    for j in range(k):
        lo, hi = windows(j, bound)
        value, arg = _range_min(best, lo, hi)
        best = np.full(n + 1, np.inf)
        best[ends[j]] = value + (0.0 if j == k - 1 else boundary[ends[j]])
        parent = np.zeros(n + 1, dtype=np.int64)
        parent[ends[j]] = arg
        parents.append(parent)
    if not math.isfinite(best[n]):  # pragma: no cover - the bisection kept a feasible bound
        raise PlanError("internal error: the balanced plan could not be reconstructed")
    cuts: list[int] = []
    b = n
    for j in range(k - 1, 0, -1):
        b = int(parents[j][b])
        cuts.append(b)
    return tuple(reversed(cuts))


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum of values[lo:hi + 1] per query and its earliest index (inf, 0 when lo > hi)."""
    size = len(values)
    mins = [values]
    args = [np.arange(size)]
    width = 1
    longest = int((hi - lo).max(initial=0)) + 1
    while 2 * width <= longest:
        prev_min, prev_arg = mins[-1], args[-1]
        left, right = prev_min[: size - 2 * width + 1], prev_min[width : size - width + 1]
        take_left = left <= right
        mins.append(np.where(take_left, left, right))
        args.append(np.where(take_left, prev_arg[: size - 2 * width + 1],
                             prev_arg[width : size - width + 1]))
        width *= 2
    empty = lo > hi
    lo_q = np.where(empty, 0, lo)
    hi_q = np.where(empty, 0, hi)
    level = np.floor(np.log2(hi_q - lo_q + 1)).astype(np.int64)
    value = np.full(len(lo), np.inf)
    arg = np.zeros(len(lo), dtype=np.int64)
    for p in np.unique(level):
        sel = level == p
        a, b = lo_q[sel], hi_q[sel] - (1 << int(p)) + 1
        left, right = mins[p][a], mins[p][b]
        take_left = left <= right
        value[sel] = np.where(take_left, left, right)
        arg[sel] = np.where(take_left, args[p][a], args[p][b])
    value[empty] = np.inf
    return value, arg


def _memory_starts(facts: _Facts, layout: _Layout, cap: int | None) -> np.ndarray:
    """For each end b, the earliest start a with mem(a, b) <= cap (b itself when none).

    mem(a, b) only grows with b and shrinks with a, so one two-pointer sweep finds them all,
    keeping per-initializer use counts for the distinct bytes and a deque for the peak.
    """
    n = facts.n
    if cap is None:
        return np.zeros(n + 1, dtype=np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    uses = [0] * len(facts.param_bytes)
    held = 0
    live = layout.live.tolist()
    peak: deque[int] = deque()  # positions in the window, live decreasing
    a = 0
    for b in range(1, n + 1):
        p = b - 1
        for q in facts.node_params[layout.order[p]]:
            if uses[q] == 0:
                held += facts.param_bytes[q]
            uses[q] += 1
        while peak and live[peak[-1]] <= live[p]:
            peak.pop()
        peak.append(p)
        while a < b and held + live[peak[0]] > cap:
            for q in facts.node_params[layout.order[a]]:
                uses[q] -= 1
                if uses[q] == 0:
                    held -= facts.param_bytes[q]
            if peak[0] == a:
                peak.popleft()
            a += 1
        starts[b] = a
    return starts


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
    facts: _Facts, layout: _Layout, devs: Sequence[DeviceSpec], stuck: int, starts: np.ndarray
) -> str:
    """Say which device's cap no split meets, and the least it would need."""
    n, k = facts.n, len(devs)
    where = np.flatnonzero(starts[:n])
    if stuck == k - 1:  # it must hold everything from its start on: the latest start is least
        need = _segment_memory(facts, layout, int(where.max()), n)
    else:  # its smallest possible stage is a single node
        need = min(_segment_memory(facts, layout, int(a), int(a) + 1) for a in where)
    return _memory_message(devs[stuck], devs[stuck].memory_bytes or 0, stuck, need)


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
