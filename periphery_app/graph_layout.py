"""A layered drawing of a model's DAG for the terminal: pure data, no UI toolkit.

Design choice: the layout is computed once (in a worker) into a sparse character canvas, so the
graph widget only has to paint the rows inside its viewport. Nodes sit in layers by longest path
from the inputs (source nodes such as constants are pulled down to just above their first
reader, so they do not drag long edges across the whole drawing); an edge that spans several
layers is routed through one-column dummy positions, and every edge is drawn with box characters
in the two rows between its layers. Overlapping edges merge like wires on a bus; the exact
inputs and outputs of a node are in its details.

Plumbing (constants, the shape arithmetic an exporter emits) is drawn inside the box of its
first reader that is drawn: wires into it end at that box, wires leaving it are left out, as
for a weight. What is left reads like the model.

Folding collapses every run of nodes that share a numbered name prefix (`block3.`, `/layers.0/`)
into one vertex; where names say nothing (`Conv_12`, empty names), repeated blocks found by
structure (graph_blocks.py) are folded instead. A fold that would create a cycle (the group is
not convex) is left unfolded.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from periphery_app.graph_blocks import blocks
from periphery_core.model.analysis import NodeInfo

# Bits of a box-drawing cell: which sides a line leaves from.
UP, DOWN, LEFT, RIGHT = 1, 2, 4, 8
BOX = {
    0: " ", UP: "╵", DOWN: "╷", LEFT: "╴", RIGHT: "╶",
    UP | DOWN: "│", LEFT | RIGHT: "─",
    DOWN | RIGHT: "┌", DOWN | LEFT: "┐", UP | RIGHT: "└", UP | LEFT: "┘",
    UP | DOWN | RIGHT: "├", UP | DOWN | LEFT: "┤",
    DOWN | LEFT | RIGHT: "┬", UP | LEFT | RIGHT: "┴",
    UP | DOWN | LEFT | RIGHT: "┼",
}
ROWS_PER_LAYER = 3  # the node row, then two rows of edges to the next layer
GAP = 2  # columns between neighbouring vertices
MAX_LABEL = 24

_GROUP = re.compile(r"^(.*?[A-Za-z_]+\.?\d+)[./]")


def fold_group(name: str) -> str | None:
    """The numbered prefix a node name is folded under, e.g. ``block3`` or ``/layers.0``.

    Args:
        name: A node name.

    Returns:
        The prefix, or None when the name has no numbered component followed by more name.
    """
    m = _GROUP.match(name)
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class Vertex:
    """One drawn box: a node, or a folded group of nodes.

    Attributes:
        id: Index into `GraphLayout.vertices`.
        members: Indices of the model nodes it stands for (one unless folded).
        label: The text drawn in the box.
        layer: Its layer (0 at the top).
        x: Leftmost column of its box.
        width: Columns of its box.
        absorbed: How many of the members (the last ones) are drawn inside this box rather than
            as boxes of their own: constants and shape plumbing read by the others.
    """

    id: int
    members: tuple[int, ...]
    label: str
    layer: int
    x: int
    width: int
    absorbed: int = 0

    @property
    def center(self) -> int:
        return self.x + self.width // 2

    @property
    def own(self) -> tuple[int, ...]:
        """The members the box is drawn for, less those drawn inside it."""
        return self.members[: len(self.members) - self.absorbed]

    @property
    def folded(self) -> bool:
        return len(self.own) > 1


@dataclass
class GraphLayout:
    """The whole drawing: vertices, edges and a sparse canvas of edge cells.

    Attributes:
        vertices: Real vertices (no dummies), by id.
        edges: (source vertex, target vertex) pairs, by edge id.
        layers: Vertex ids per layer, left to right.
        edge_cells: Per canvas row, column -> (box bits, edge ids through that cell).
        width: Canvas width in columns.
        height: Canvas height in rows.
        folded: Whether groups were folded.
        notes: Anything a reader should know (e.g. groups left unfolded).
    """

    vertices: list[Vertex]
    edges: list[tuple[int, int]]
    layers: list[list[int]]
    edge_cells: dict[int, dict[int, tuple[int, tuple[int, ...]]]]
    width: int
    height: int
    folded: bool
    notes: list[str] = field(default_factory=list)
    vertex_of_node: dict[int, int] = field(default_factory=dict)
    row_vertices: dict[int, list[int]] = field(default_factory=dict)

    def vertex_at_row(self, y: int) -> list[int]:
        """Vertex ids drawn on canvas row `y`, left to right."""
        return self.row_vertices.get(y, [])

    def row_of(self, vertex: int) -> int:
        return self.vertices[vertex].layer * ROWS_PER_LAYER


def _short_name(node: NodeInfo) -> str:
    tail = node.key.rstrip("/").rsplit("/", 1)[-1]
    if tail.startswith(node.op_type) or not tail:
        return node.op_type
    return f"{node.op_type} {tail}"


def _clip(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _edges_between(nodes: Sequence[NodeInfo], vertex_of: list[int],
                   home: dict[int, int]) -> list[tuple[int, int]]:
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.outputs:
            producer[o] = i
    seen: dict[tuple[int, int], None] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            p = producer.get(name)
            if p is None or p in home:  # drawn inside its reader's box, like a weight
                continue
            a, b = vertex_of[p], vertex_of[i]
            if a != b:
                seen[(a, b)] = None
    return list(seen)


def _topological(count: int, edges: Sequence[tuple[int, int]]) -> tuple[list[int], set[int]]:
    """Kahn's order of the vertices, and the vertices left on a cycle."""
    indeg = [0] * count
    succ: list[list[int]] = [[] for _ in range(count)]
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    ready = [v for v in range(count) if indeg[v] == 0]
    order: list[int] = []
    while ready:
        v = ready.pop()
        order.append(v)
        for w in succ[v]:
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    return order, {v for v in range(count) if indeg[v] > 0}


def _homes(nodes: Sequence[NodeInfo], absorb: frozenset[int]) -> dict[int, int]:
    """The node in whose box each absorbed node is drawn: its first reader that is not absorbed,
    following chains of absorbed nodes. One that nothing drawn reads has none (keeps its box).
    Readers come after the node in topological order, so a backward pass settles each chain."""
    readers: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for name in n.inputs:
            readers[name].append(i)
    home: dict[int, int] = {}
    for i in sorted(absorb, reverse=True):
        for reader in sorted(r for o in nodes[i].outputs for r in readers.get(o, ())):
            if reader not in absorb:
                home[i] = reader
                break
            if reader in home:
                home[i] = home[reader]
                break
    return home


def _assign(keys: Sequence[str | None], home: dict[int, int]) -> tuple[list[int], list[list[int]]]:
    """Vertices from fold keys: one per key shared, one per other node that has no home; each
    node with a home joins its home's vertex, after the vertex's own members."""
    vertex_of = [-1] * len(keys)
    members: list[list[int]] = []
    group_vertex: dict[str, int] = {}
    for i, k in enumerate(keys):
        if i in home:
            continue
        if k is not None and k in group_vertex:
            vertex_of[i] = group_vertex[k]
            members[vertex_of[i]].append(i)
            continue
        if k is not None:
            group_vertex[k] = len(members)
        vertex_of[i] = len(members)
        members.append([i])
    for i in sorted(home):
        vertex_of[i] = vertex_of[home[i]]
        members[vertex_of[i]].append(i)
    return vertex_of, members


def _grouping(
    nodes: Sequence[NodeInfo], fold: bool, absorb: frozenset[int], home: dict[int, int],
    inputs: frozenset[str],
) -> tuple[list[int], list[list[int]], list[str], dict[int, str]]:
    """Which vertex each node belongs to, the members of each vertex, notes, and the labels
    of vertices that are blocks found by structure (by vertex)."""
    notes: list[str] = []
    keys: list[str | None] = [fold_group(n.key) if fold and i not in absorb else None
                              for i, n in enumerate(nodes)]
    titles: dict[str, str] = {}
    if fold:
        sizes = Counter(k for k in keys if k is not None)
        keys = [k if k is not None and sizes[k] > 1 else None for k in keys]
        # What the names do not group, the structure may: repeated blocks between the points
        # that one activation crosses (graph_blocks.py).
        drawn = [i for i in range(len(nodes)) if i not in home]
        taken = {i for i, k in enumerate(keys) if k is not None}
        for number, block in enumerate(blocks(nodes, drawn, home, taken, inputs)):
            key = f"\0block{number}"  # no node name holds a NUL
            titles[key] = block.title(nodes)
            for i in block.nodes:
                keys[i] = key
    for _ in range(8):
        vertex_of, members = _assign(keys, home)
        labelled = {v: titles[k] for v, mem in enumerate(members)
                    if (k := keys[mem[0]]) is not None and k in titles}
        if not any(k is not None for k in keys):
            return vertex_of, members, notes, labelled
        _, cyclic = _topological(len(members), _edges_between(nodes, vertex_of, home))
        if not cyclic:
            return vertex_of, members, notes, labelled
        bad = {k for v in cyclic if (k := keys[members[v][0]]) is not None}
        notes.append(f"left {len(bad)} group(s) unfolded: folding them would make a cycle")
        keys = [None if k in bad else k for k in keys]
    return (*_assign([None] * len(nodes), home), notes, {})


def layout_graph(nodes: Sequence[NodeInfo], *, fold: bool = False,
                 absorb: frozenset[int] = frozenset(),
                 inputs: frozenset[str] = frozenset()) -> GraphLayout:
    """Lay out a model's nodes (in the model's topological order) as a layered drawing.

    Args:
        nodes: The analysis' nodes.
        fold: Collapse numbered name groups into one vertex each, and what they leave into
            blocks found by structure (graph_blocks.py).
        absorb: Nodes drawn inside the box of the node that reads them, not as boxes of their
            own: plumbing such as constants (a `Constant`, a weight's Transpose) and the shape
            arithmetic feeding a `Reshape`. One that nothing drawn reads keeps its own box.
        inputs: The model's input names (activations, where blocks by structure begin).

    Returns:
        The drawing.
    """
    home = _homes(nodes, absorb)
    vertex_of, members, notes, titles = _grouping(nodes, fold, absorb, home, inputs)
    count = len(members)
    edges = _edges_between(nodes, vertex_of, home)
    preds: list[list[int]] = [[] for _ in range(count)]
    succs: list[list[int]] = [[] for _ in range(count)]
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    order, _ = _topological(count, edges)

    # Longest path from the sources, then sources pulled down to just above their first reader.
    layer = [0] * count
    for v in order:
        for w in succs[v]:
            layer[w] = max(layer[w], layer[v] + 1)
    for v in order:
        if not preds[v] and succs[v]:
            layer[v] = max(0, min(layer[w] for w in succs[v]) - 1)
    depth = max(layer, default=-1) + 1

    labels: list[str] = []
    for v, mem in enumerate(members):
        drawn = [i for i in mem if i not in home]
        if v in titles:
            labels.append(_clip(titles[v]))
        elif len(drawn) > 1:
            group = fold_group(nodes[drawn[0]].key) or nodes[drawn[0]].key
            labels.append(_clip(f"▸ {group} ×{len(drawn)}"))
        else:
            labels.append(_clip(_short_name(nodes[drawn[0]])))

    # Positions per layer: real vertices (id >= 0) and dummies (-1 - chain index).
    slots: list[list[int]] = [[] for _ in range(depth)]
    for v in sorted(range(count), key=lambda v: members[v][0]):
        slots[layer[v]].append(v)
    chains: list[tuple[int, list[tuple[int, int]]]] = []  # per edge: (edge id, [(layer, dummy)])
    dummy_edge: list[int] = []
    for e, (a, b) in enumerate(edges):
        path: list[tuple[int, int]] = []
        for lyr in range(layer[a] + 1, layer[b]):
            d = -1 - len(dummy_edge)
            dummy_edge.append(e)
            slots[lyr].append(d)
            path.append((lyr, d))
        chains.append((e, path))
    dummy_pred: dict[int, int] = {}
    # The predecessor of each slot item in the layer above, to order by barycentre.
    up: dict[int, list[int]] = {v: list(preds[v]) for v in range(count)}
    for e, path in chains:
        a, b = edges[e]
        prev = a
        for _, d in path:
            dummy_pred[d] = prev
            up[d] = [prev]
            prev = d
        if path:
            up[b] = [prev if p == a else p for p in up[b]]

    width_of = {v: len(labels[v]) + 2 for v in range(count)}
    x_of: dict[int, int] = {}
    canvas_width = 0
    for lyr in range(depth):
        row = slots[lyr]
        if lyr > 0:
            def bary(item: int) -> float:
                ps = [x_of[p] + _w(width_of, p) // 2 for p in up.get(item, []) if p in x_of]
                return sum(ps) / len(ps) if ps else float("inf")

            row.sort(key=bary)
        cursor = 0
        for item in row:
            w = _w(width_of, item)
            ps = [x_of[p] + _w(width_of, p) // 2 for p in up.get(item, []) if p in x_of]
            want = (sum(ps) // len(ps) - w // 2) if ps else cursor
            x = max(cursor, want)
            x_of[item] = x
            cursor = x + w + GAP
        canvas_width = max(canvas_width, cursor)

    vertices = [
        Vertex(v, tuple(members[v]), labels[v], layer[v], x_of[v], width_of[v],
               sum(1 for i in members[v] if i in home))
        for v in range(count)
    ]
    edge_cells: dict[int, dict[int, tuple[int, tuple[int, ...]]]] = defaultdict(dict)

    def mark(y: int, x: int, bits: int, e: int) -> None:
        row = edge_cells[y]
        old = row.get(x)
        if old is None:
            row[x] = (bits, (e,))
        else:
            ids = old[1] if e in old[1] else (*old[1], e)
            row[x] = (old[0] | bits, ids)

    def center(item: int) -> int:
        return x_of[item] + _w(width_of, item) // 2

    for e, path in chains:
        a, b = edges[e]
        hops = [a] + [d for _, d in path] + [b]
        lyr = layer[a]
        for i in range(len(hops) - 1):
            src, dst = hops[i], hops[i + 1]
            y = lyr * ROWS_PER_LAYER
            cs, cd = center(src), center(dst)
            g1, g2 = y + 1, y + 2
            if cs == cd:
                mark(g1, cs, UP | DOWN, e)
            else:
                step = 1 if cd > cs else -1
                mark(g1, cs, UP | (RIGHT if step > 0 else LEFT), e)
                for x in range(cs + step, cd, step):
                    mark(g1, x, LEFT | RIGHT, e)
                mark(g1, cd, DOWN | (LEFT if step > 0 else RIGHT), e)
            mark(g2, cd, UP | DOWN, e)
            if dst < 0:  # a dummy: the wire runs straight through its node row
                mark((lyr + 1) * ROWS_PER_LAYER, cd, UP | DOWN, e)
            lyr += 1

    layers = [[v for v in slots[lyr] if v >= 0] for lyr in range(depth)]
    row_vertices = {lyr * ROWS_PER_LAYER: layers[lyr] for lyr in range(depth)}
    return GraphLayout(
        vertices=vertices,
        edges=edges,
        layers=layers,
        edge_cells=dict(edge_cells),
        width=canvas_width,
        height=max(0, depth * ROWS_PER_LAYER - 2),
        folded=fold,
        notes=notes,
        vertex_of_node=dict(enumerate(vertex_of)),
        row_vertices=row_vertices,
    )


def _w(width_of: dict[int, int], item: int) -> int:
    return width_of[item] if item >= 0 else 1


def neighbour(layout: GraphLayout, vertex: int, direction: str) -> int:
    """The vertex an arrow key moves to from `vertex`.

    Args:
        layout: The drawing.
        vertex: The selected vertex.
        direction: "left", "right" (same layer), "up" or "down" (nearest non-empty layer).

    Returns:
        The new vertex (the same one when there is nowhere to go).
    """
    v = layout.vertices[vertex]
    row = layout.layers[v.layer]
    pos = row.index(vertex)
    if direction in ("left", "right"):
        pos += -1 if direction == "left" else 1
        return row[pos] if 0 <= pos < len(row) else vertex
    step = -1 if direction == "up" else 1
    lyr = v.layer + step
    while 0 <= lyr < len(layout.layers):
        if layout.layers[lyr]:
            return min(layout.layers[lyr],
                       key=lambda w: abs(layout.vertices[w].center - v.center))
        lyr += step
    return vertex
