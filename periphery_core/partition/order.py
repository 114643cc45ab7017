"""The order the planner cuts: a topological order whose cut points carry few bytes.

The order is chosen once, up front, and every strategy then segments it (the spectral one
reorders within its clusters); a greedy list schedule that keeps few bytes live makes the cheap
cut points also the thin ones.
"""

from __future__ import annotations

import heapq

from periphery_core.errors import PlanError
from periphery_core.partition.cost_model import GraphFacts, PlanningGraph, graph_facts


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
    facts = graph_facts(graph)
    return greedy_order(facts, graph)


def greedy_order(facts: GraphFacts, graph: PlanningGraph) -> tuple[int, ...]:
    """`choose_order` on a graph already numbered by `graph_facts`."""
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
