"""The Graph screen: the model's DAG as a layered drawing, with search, folding and the plan.

The layout is computed in a thread worker whenever the model or the folding changes; the plan's
overlay (stage colours by cost, edges that cross a boundary) is recomputed on the event loop,
since it is a pass over the nodes.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from rich import box
from rich.color import Color
from rich.console import Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Footer, Input, Static

from periphery_app.control import OpenedModel
from periphery_app.graph_layout import GraphLayout, layout_graph
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.screens.modals import DetailsModal
from periphery_app.units import human_bytes, human_count, human_seconds, shape_text
from periphery_app.widgets.graph_view import GraphView, heat
from periphery_core.model.analysis import ModelAnalysis
from periphery_core.model.graph import shape_only
from periphery_core.model.shapes import elem_dtype
from periphery_core.partition.plan import ShardPlan


def shape_ops(opened: OpenedModel) -> frozenset[str]:
    """Keys of the nodes that compute on activations' shapes alone (`Shape`, and the `Gather`,
    `Unsqueeze`, `Concat`... that turn it into a `Reshape`'s target): see `shape_only`."""
    analysis = opened.analysis
    return shape_only(opened.loaded.proto.graph, [n.key for n in analysis.nodes],
                      analysis.constant_nodes)


def drawn_inside(analysis: ModelAnalysis, shape_keys: frozenset[str]) -> frozenset[int]:
    """The nodes drawn inside their readers' boxes: constants (a `Constant`, a weight's
    Transpose or Reshape) and shape arithmetic, which are plumbing, not steps of the model."""
    return frozenset(n.index for n in analysis.nodes
                     if n.key in analysis.constant_nodes or n.key in shape_keys)


def stage_colours(plan: ShardPlan) -> list[Color]:
    """One colour per stage: green for the cheapest, red for the bottleneck."""
    costs = [s.cost_s for s in plan.stages]
    low, high = min(costs), max(costs)
    spread = high - low
    return [heat((c - low) / spread if spread > 1e-12 else 0.0) for c in costs]


class LayoutReady(Message):
    """A layout finished computing in the worker."""

    def __init__(self, layout: GraphLayout, analysis_id: int, selected_node: int,
                 shape_keys: frozenset[str]) -> None:
        super().__init__()
        self.layout = layout
        self.analysis_id = analysis_id
        self.selected_node = selected_node
        self.shape_keys = shape_keys


class GraphScreen(PeripheryScreen):
    """Draw, navigate and search the model's graph."""

    MODE = "graph"
    LABEL = "Graph"
    CSS_PATH = "graph.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "search", "Search"),
        Binding("n", "next_match(1)", "Next match"),
        Binding("N", "next_match(-1)", "Prev match", show=False),
        Binding("f", "toggle_fold", "Fold"),
        Binding("escape", "close_search", "Close search, clear matches", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.fold = False
        self._matches: list[int] = []
        self._opened: OpenedModel | None = None
        self._weight_types: tuple[OpenedModel, dict[str, tuple[str, tuple[int, ...]]]] | None \
            = None
        self._stage_of_node: dict[int, int] = {}
        self._shape_keys: frozenset[str] = frozenset()  # of the layout shown (see `shape_ops`)

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        yield Static("No model open: open one on the Model screen (1).", id="legend")
        yield GraphView(id="graph")
        yield Static("", id="detail")
        yield Input(placeholder="search node name or op type (enter)", id="search")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#search", Input).display = False
        self.watch(self.papp, "opened", self._model_changed)
        self.watch(self.papp, "plan", self._plan_changed)

    # ------------------------------------------------------------------ state in

    def _model_changed(self, opened: OpenedModel | None) -> None:
        self._opened = opened
        self._matches = []
        if opened is None:
            return
        self.query_one("#legend", Static).update(
            f"Laying out {len(opened.analysis.nodes):,} nodes…")
        self._compute_layout(opened, self.fold, 0)

    @work(thread=True, exclusive=True, group="layout")
    def _compute_layout(self, opened: OpenedModel, fold: bool, selected_node: int) -> None:
        try:
            shape_keys = shape_ops(opened)
            layout = layout_graph(opened.analysis.nodes, fold=fold,
                                  absorb=drawn_inside(opened.analysis, shape_keys),
                                  inputs=frozenset(s.name for s in opened.analysis.inputs))
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(LayoutReady(layout, id(opened.analysis), selected_node, shape_keys))

    def on_layout_ready(self, message: LayoutReady) -> None:
        opened = self._opened
        if opened is None or id(opened.analysis) != message.analysis_id:
            return  # a stale layout of a model no longer open
        layout = message.layout
        self._shape_keys = message.shape_keys
        view = self.query_one(GraphView)
        view.set_layout(layout, layout.vertex_of_node.get(message.selected_node, 0))
        self._plan_changed(self.papp.plan)
        self._selection_changed(GraphView.SelectionChanged(view.selected))
        view.focus()

    def _plan_changed(self, plan: ShardPlan | None) -> None:
        view = self.query_one(GraphView)
        layout = view.graph_layout
        opened = self._opened
        self._stage_of_node = {}
        if layout is None or opened is None:
            return
        if plan is not None:
            index = {n.key: i for i, n in enumerate(opened.analysis.nodes)}
            for s in plan.stages:
                for key in s.nodes:
                    if key in index:
                        self._stage_of_node[index[key]] = s.index
        vertex_heat = {}
        crossing: set[int] = set()
        if plan is not None and self._stage_of_node:
            colours = stage_colours(plan)
            for v in layout.vertices:
                stage = self._stage_of_node.get(v.members[0])
                if stage is not None:
                    vertex_heat[v.id] = colours[stage]
            stage_of_vertex = {v.id: self._stage_of_node.get(v.own[-1])
                               for v in layout.vertices}
            first_stage = {v.id: self._stage_of_node.get(v.members[0]) for v in layout.vertices}
            for e, (a, b) in enumerate(layout.edges):
                sa, sb = stage_of_vertex.get(a), first_stage.get(b)
                if sa is not None and sb is not None and sa != sb:
                    crossing.add(e)
        view.set_overlay(vertex_heat, frozenset(crossing))
        self._update_legend()

    def _update_legend(self) -> None:
        view = self.query_one(GraphView)
        layout = view.graph_layout
        opened = self._opened
        if layout is None or opened is None:
            return
        text = Text()
        text.append(f"{len(opened.analysis.nodes):,} nodes", style="bold")
        inside = sum(v.absorbed for v in layout.vertices)
        if inside:
            text.append(f" · {inside:,} drawn inside other boxes")
        text.append(f" · {len(layout.vertices):,} boxes · {len(layout.layers)} layers · fold ")
        text.append("on" if layout.folded else "off", style="bold")
        if self._matches:
            text.append(f" · {len(self._matches)} matches")
        plan = self.papp.plan
        if plan is not None:
            text.append("\n")
            for s, colour in zip(plan.stages, stage_colours(plan), strict=True):
                text.append(f" S{s.index} {human_seconds(s.cost_s)} ",
                            style=Style(color="#ffffff", bgcolor=colour))
                text.append(" ")
            text.append(f"bottleneck S{plan.bottleneck_stage}", style="bold")
            text.append("  red wires cross a stage boundary", style="dim")
        if layout.notes:
            text.append("\n" + "; ".join(layout.notes), style="dim")
        self.query_one("#legend", Static).update(text)

    @on(GraphView.SelectionChanged)
    def _selection_changed(self, event: GraphView.SelectionChanged) -> None:
        layout = self.query_one(GraphView).graph_layout
        if layout is None or self._opened is None or not layout.vertices:
            return
        v = layout.vertices[event.vertex]
        nodes = self._opened.analysis.nodes
        if v.folded:
            line = f"{v.label.lstrip('▸ ')}: {len(v.own)} nodes, " \
                   f"{human_count(sum(nodes[i].flops for i in v.members), 'FLOP')}"
        else:
            n = nodes[v.members[0]]
            line = f"{n.op_type} {n.key} · {human_count(n.flops, 'FLOP')} · " \
                   f"params {human_bytes(n.param_bytes)} · out {human_bytes(n.output_bytes)}"
        stage = self._stage_of_node.get(v.members[0])
        if stage is not None:
            line += f" · stage {stage}"
        self.query_one("#detail", Static).update(Text(line, no_wrap=True, overflow="ellipsis"))

    # ------------------------------------------------------------------ details

    @on(GraphView.NodeChosen)
    def _node_chosen(self, event: GraphView.NodeChosen) -> None:
        layout = self.query_one(GraphView).graph_layout
        if layout is None or self._opened is None:
            return
        v = layout.vertices[event.vertex]
        self.app.push_screen(DetailsModal(v.label.lstrip("▸ "), self.details(v.members), wide=True))

    def _weights(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Each initializer's dtype and shape (read once per model, without its data)."""
        assert self._opened is not None
        cached = self._weight_types
        if cached is not None and cached[0] is self._opened:
            return cached[1]
        found: dict[str, tuple[str, tuple[int, ...]]] = {}
        for init in self._opened.loaded.proto.graph.initializer:
            try:
                dtype = str(elem_dtype(init.data_type))
            except (KeyError, TypeError, ValueError):
                dtype = "?"
            found[init.name] = (dtype, tuple(int(d) for d in init.dims))
        self._weight_types = (self._opened, found)
        return found

    def details(self, members: tuple[int, ...]) -> RenderableType:
        """What a node (or a folded group) is: op, tensors with shapes, costs, stage."""
        assert self._opened is not None
        analysis = self._opened.analysis
        picked = [analysis.nodes[i] for i in members]
        constants = [n for n in picked if n.key in analysis.constant_nodes]
        shaping = [n for n in picked if n.key in self._shape_keys]
        nodes = [n for n in picked
                 if n.key not in analysis.constant_nodes and n.key not in self._shape_keys] \
            or constants or shaping
        inside: list[tuple[str, str]] = []  # what the box holds besides its own nodes
        if constants and nodes[0] not in constants:
            inside.append(("Constants", f"{len(constants)} drawn in this box: "
                           + ", ".join(c.key for c in constants[:3])
                           + (" …" if len(constants) > 3 else "")))
        if shaping and nodes[0] not in shaping:
            ops = Counter(n.op_type for n in shaping).most_common()
            inside.append(("Shape ops", f"{len(shaping)} shape ops drawn in this box: "
                           + ", ".join(f"{op} ×{c}" for op, c in ops)))
        if len(nodes) > 1:
            ops = Counter(n.op_type for n in nodes).most_common()
            facts = Table.grid(padding=(0, 2))
            facts.add_row("Nodes", str(len(nodes)))
            facts.add_row("Ops", ", ".join(f"{op} ×{c}" for op, c in ops))
            facts.add_row("FLOPs", human_count(sum(n.flops for n in nodes), "FLOP"))
            facts.add_row("Params", human_bytes(sum(n.param_bytes for n in nodes)))
            facts.add_row("First", nodes[0].key)
            facts.add_row("Last", nodes[-1].key)
            for row in inside:
                facts.add_row(*row)
            return Group(facts, Text("\npress f to unfold groups", style="dim"))
        n = nodes[0]
        facts = Table.grid(padding=(0, 2))
        facts.add_column(style="bold")
        facts.add_column()
        facts.add_row("Op", f"{n.op_type}" + (f" ({n.domain})" if n.domain else ""))
        facts.add_row("Name", n.key)
        facts.add_row("FLOPs", human_count(n.flops, "FLOP"))
        facts.add_row("Params", human_bytes(n.param_bytes))
        facts.add_row("Activations", human_bytes(n.output_bytes))
        stage = self._stage_of_node.get(nodes[0].index)
        if stage is not None:
            facts.add_row("Stage", str(stage))
        for row in inside:
            facts.add_row(*row)
        tensors = Table(header_style="bold", padding=(0, 1), expand=False, box=box.SIMPLE_HEAD)
        for col in ("", "tensor", "dtype", "shape", "bytes"):
            tensors.add_column(col)
        weights = self._weights()
        for kind, names in (("in", n.inputs), ("out", n.outputs)):
            for name in names:
                info = analysis.tensors.get(name)
                if info is None and name in weights:  # a weight: its declared type and size
                    dtype, dims = weights[name]
                    tensors.add_row(kind, f"{name} (weight)", dtype, shape_text(dims),
                                    human_bytes(analysis.initializers.get(name, 0)))
                    continue
                weight = " (weight)" if name in analysis.initializers else ""
                tensors.add_row(kind, name + weight, info.dtype if info else "?",
                                shape_text(info.shape) if info else "?",
                                human_bytes(info.nbytes) if info else "?")
        return Group(facts, Text(""), tensors)

    # ------------------------------------------------------------------ search and folding

    def action_search(self) -> None:
        search = self.query_one("#search", Input)
        search.display = True
        search.focus()

    def action_close_search(self) -> None:
        search = self.query_one("#search", Input)
        if search.display:
            search.display = False
            self.query_one(GraphView).focus()
        elif self._matches:  # a search's matches first, then the screen
            self._matches = []
            self.query_one(GraphView).set_matches(frozenset())
            self._update_legend()
        else:
            self.papp.action_go_back()

    @on(Input.Submitted, "#search")
    def _search(self, event: Input.Submitted) -> None:
        event.stop()
        query = event.value.strip().lower()
        view = self.query_one(GraphView)
        layout = view.graph_layout
        event.input.display = False
        view.focus()
        if layout is None or self._opened is None:
            return
        nodes = self._opened.analysis.nodes
        self._matches = [
            v.id for v in layout.vertices
            if query and any(query in nodes[i].key.lower() or query == nodes[i].op_type.lower()
                             or query in nodes[i].op_type.lower() for i in v.members)
        ]
        view.set_matches(frozenset(self._matches))
        self._update_legend()
        if self._matches:
            self.action_next_match(1)
        else:
            self.notify(f"no node matches '{event.value}'", severity="warning")

    def action_next_match(self, step: int) -> None:
        if not self._matches:
            return
        view = self.query_one(GraphView)
        order = self._matches
        if view.selected in order:
            pos = (order.index(view.selected) + step) % len(order)
        else:
            after = [i for i, v in enumerate(order) if v > view.selected]
            pos = after[0] if after and step > 0 else (0 if step > 0 else len(order) - 1)
        view.selected = order[pos]

    def action_toggle_fold(self) -> None:
        opened = self._opened
        view = self.query_one(GraphView)
        layout = view.graph_layout
        if opened is None:
            return
        self.fold = not self.fold
        selected_node = layout.vertices[view.selected].members[0] if layout and layout.vertices \
            else 0
        self._matches = []
        view.set_matches(frozenset())
        self._compute_layout(opened, self.fold, selected_node)
