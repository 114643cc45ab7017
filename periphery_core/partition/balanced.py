"""The balanced strategy: the exactly optimal segmentation of a fixed order.

Key design choice: the order is fixed (`order.choose_order`), and then its segmentation is
optimised exactly. Every quantity of a segment ``[a, b)`` of a fixed order is a prefix sum, a
running maximum or a running distinct count, and both a stage's cost and its memory only shrink
as its start moves later; so "can the bottleneck be at most T" is a reachability DP over cut
positions in O(K n) numpy work, and "balanced" bisects on T. It is provably optimal for that
order (to a relative 1e-13), with heterogeneous devices and memory caps, and takes milliseconds
for thousands of nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from periphery_core.errors import PlanError
from periphery_core.partition.cost_model import GraphFacts, OrderLayout, PlanningGraph
from periphery_core.partition.memory import (
    diagnose_memory,
    memory_message,
    memory_starts,
    segment_memory,
)
from periphery_core.partition.plan import DeviceSpec


def balanced_cuts(
    facts: GraphFacts, graph: PlanningGraph, layout: OrderLayout, devs: Sequence[DeviceSpec],
    slack: float = 0.0,
) -> tuple[int, ...]:
    """The optimal cuts of ``layout.order`` for ``devs`` (with `slack` > 0: the cuts that send
    the fewest bytes among those whose bottleneck is within that fraction of the optimum).

    Stage j covers positions ``[a, b)``. With C the prefix sums of cost and B[b] the bytes that
    cross a cut at b:

        cost_j(a, b) = max((C[b] - C[a]) / speed_j, B[b] / bandwidth_j)   (last: graph outputs)
        mem(a, b) = distinct initializer bytes of [a, b) + workers_j * max(live[a:b])

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
        need = segment_memory(facts, layout, 0, n, devs[0].workers)
        if cap0 is not None and need > cap0:
            raise PlanError(memory_message(devs[0], cap0, 0, need))
        return ()

    speed = [d.speed for d in devs]
    cost_prefix = layout.cost_prefix
    out_bytes = float(sum(facts.tensor_bytes[t] for t in facts.graph_outputs))
    boundary = layout.boundary_bytes.astype(np.float64)
    starts_by_cap: dict[tuple[int | None, int], np.ndarray] = {}  # by cap and workers
    for d in devs:
        if (d.memory_bytes, d.workers) not in starts_by_cap:
            starts_by_cap[d.memory_bytes, d.workers] = memory_starts(
                facts, layout, d.memory_bytes, d.workers)

    # Per stage j: the ends b it may have (room for the stages after it), what it sends.
    ends: list[np.ndarray] = []
    sent: list[np.ndarray] = []
    mem_lo: list[np.ndarray] = []
    for j, d in enumerate(devs):
        bs = np.array([n]) if j == k - 1 else np.arange(j + 1, n - (k - 1 - j) + 1)
        ends.append(bs)
        sent.append((np.full(1, out_bytes) if j == k - 1 else boundary[bs]) / d.bandwidth)
        mem_lo.append(np.maximum(starts_by_cap[d.memory_bytes, d.workers][bs], j))

    def windows(j: int, bound: float) -> tuple[np.ndarray, np.ndarray]:
        bs = ends[j]
        floor = cost_prefix[bs] - speed[j] * bound
        lo = np.maximum(np.searchsorted(cost_prefix, floor, side="left"), mem_lo[j])
        return np.where(sent[j] > bound, bs, lo), bs - 1  # a cut that sends too much: none

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
        raise PlanError(diagnose_memory(facts, layout, devs, stuck, starts))
    if reachable(0.0)[0] == k:
        bound = 0.0
    else:
        low = 0.0
        bound = max(cost_prefix[n] / min(speed), *(float(s.max()) for s in sent))
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

    # Fewest boundary bytes among the splits within the bound (and the slack, where costs are
    # measured and noisy: the cut then stays where little crosses rather than following it).
    bound *= 1.0 + max(0.0, slack)
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
