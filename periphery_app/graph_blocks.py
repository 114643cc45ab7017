"""Repeated blocks of a model found by structure, for folding a graph whose node names say
nothing (`Conv_12`, `n40`, empty names): pure data, no UI toolkit.

Design choice: a block boundary is a point in the model's topological order that exactly one
activation crosses (the input of a residual block, the output of a stem): everything between
two such points is a *segment*, and a segment is never split. Segments are then grouped into
blocks by repetition: at each point the shortest run of segments that repeats right after itself
(same op types in the same order) is a block, and each of its repetitions is one more; a segment
with branches that repeats nothing is a block of its own. A block is a contiguous range of a
topological order, so folding it can never make a cycle. A segment that holds most of the model
(a U-Net, whose skips cross everywhere) is left unfolded: one box for it all would hide it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from periphery_core.model.analysis import NodeInfo

MAX_PERIOD = 12  # the most segments one repeated block may span
MAX_SHARE = 0.5  # a segment holding more of the drawn nodes than this is left unfolded


@dataclass(frozen=True, slots=True)
class Block:
    """A run of drawn nodes folded into one box.

    Attributes:
        nodes: Indices of its nodes, in topological order.
        repeat: Which repetition of its kind this is (1-based), and how many there are in
            the run (1 when it repeats nothing).
    """

    nodes: tuple[int, ...]
    repeat: tuple[int, int] = (1, 1)

    def title(self, nodes: Sequence[NodeInfo]) -> str:
        """Its box label: first and last op, the node count and, in a run, its place."""
        first, last = nodes[self.nodes[0]].op_type, nodes[self.nodes[-1]].op_type
        ops = first if first == last else f"{first}…{last}"
        place = f" {self.repeat[0]}/{self.repeat[1]}" if self.repeat[1] > 1 else ""
        return f"▸{place} {ops} ×{len(self.nodes)}"


def segments(nodes: Sequence[NodeInfo], drawn: Sequence[int], home: dict[int, int],
             inputs: frozenset[str] = frozenset()) -> list[list[int]]:
    """The drawn nodes cut where exactly one activation crosses (or none).

    Args:
        nodes: The analysis' nodes, in topological order.
        drawn: The nodes drawn as boxes of their own, in that order.
        home: For a node drawn inside another's box, that node (its reads count as the box's).
        inputs: The model's inputs: activations from the start (weights are not).
    """
    position = {i: p for p, i in enumerate(drawn)}
    last_read: dict[str, int] = defaultdict(lambda: -1)
    for i, n in enumerate(nodes):
        reader = position.get(home.get(i, i))
        if reader is None:
            continue
        for name in n.inputs:
            last_read[name] = max(last_read[name], reader)
    out: list[list[int]] = [[]]
    live = {name: last_read[name] for name in inputs if last_read.get(name, -1) >= 0}
    for p, i in enumerate(drawn):
        out[-1].append(i)
        for name in nodes[i].outputs:
            if last_read.get(name, -1) > p:
                live[name] = last_read[name]
        live = {name: end for name, end in live.items() if end > p}
        if len(live) <= 1 and p + 1 < len(drawn):
            out.append([])
    return [s for s in out if s]


def blocks(nodes: Sequence[NodeInfo], drawn: Sequence[int], home: dict[int, int],
           taken: set[int], inputs: frozenset[str] = frozenset()) -> list[Block]:
    """Blocks of the drawn nodes that folding by name left alone.

    Args:
        nodes: The analysis' nodes, in topological order.
        drawn: The nodes drawn as boxes of their own, in that order.
        home: For a node drawn inside another's box, that node.
        taken: Nodes already folded by name: a block holds none of them.
        inputs: The model's inputs.

    Returns:
        The blocks of more than one node, in order.
    """
    segs = segments(nodes, drawn, home, inputs)
    signature = [tuple(nodes[i].op_type for i in s) for s in segs]
    limit = int(MAX_SHARE * len(drawn))
    found: list[Block] = []

    def keep(run: Sequence[list[int]], repeat: tuple[int, int]) -> None:
        members = tuple(i for s in run for i in s)
        if 1 < len(members) <= limit and not taken.intersection(members):
            found.append(Block(members, repeat))

    p = 0
    while p < len(segs):
        period = next((n for n in range(1, MAX_PERIOD + 1)
                       if p + 2 * n <= len(segs)
                       and signature[p:p + n] == signature[p + n:p + 2 * n]
                       and sum(len(s) for s in segs[p:p + n]) > 1), None)
        if period is None:
            keep(segs[p:p + 1], (1, 1))
            p += 1
            continue
        runs = 2
        while (p + (runs + 1) * period <= len(segs)
               and signature[p + runs * period:p + (runs + 1) * period]
               == signature[p:p + period]):
            runs += 1
        for r in range(runs):
            start = p + r * period
            keep(segs[start:start + period], (r + 1, runs))
        p += runs * period
    return found
