"""A scrollable, keyboard-navigable drawing of a model's DAG that paints only its viewport.

Design choice: the layout (`periphery_app.graph_layout`) is computed once, elsewhere, into a
sparse canvas; this widget's `render_line` looks up only the cells of the visible window, so a
1,600-node graph scrolls as fast as a 40-node one. Overlays (a plan's stages, search matches,
the selection) are styles chosen at paint time, never a new layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size, Spacing
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from periphery_app.graph_layout import BOX, ROWS_PER_LAYER, GraphLayout, neighbour

_COOL = (46, 125, 50)
_WARM = (230, 180, 30)
_HOT = (198, 40, 40)


def heat(fraction: float) -> Color:
    """Green at 0, amber at 0.5, red at 1: how close a stage's cost is to the bottleneck."""
    f = min(1.0, max(0.0, fraction))
    a, b, t = (_COOL, _WARM, f * 2) if f < 0.5 else (_WARM, _HOT, (f - 0.5) * 2)
    r, g, bl = (round(a[i] + (b[i] - a[i]) * t) for i in range(3))
    return Color.from_rgb(r, g, bl)


class GraphView(ScrollView, can_focus=True):
    """Draws a `GraphLayout`; arrows move the selection, enter asks for details."""

    DEFAULT_CSS = """
    GraphView {
        background: $surface;
        scrollbar-size: 1 1;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "move('up')", "Up", show=False),
        Binding("down", "move('down')", "Down", show=False),
        Binding("left", "move('left')", "Left", show=False),
        Binding("right", "move('right')", "Right", show=False),
        Binding("enter", "choose", "Details"),
    ]

    selected: reactive[int] = reactive(0)

    class NodeChosen(Message):
        """Enter was pressed on a vertex."""

        def __init__(self, vertex: int) -> None:
            super().__init__()
            self.vertex = vertex

    class SelectionChanged(Message):
        """The selected vertex changed."""

        def __init__(self, vertex: int) -> None:
            super().__init__()
            self.vertex = vertex

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._layout: GraphLayout | None = None
        self._vertex_heat: dict[int, Color] = {}
        self._crossing: frozenset[int] = frozenset()
        self._matches: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ data in

    @property
    def graph_layout(self) -> GraphLayout | None:
        return self._layout

    def set_layout(self, layout: GraphLayout | None, selected: int = 0) -> None:
        """Show a new drawing (attributes down: the screen computes it, the view paints it)."""
        self._layout = layout
        self.virtual_size = Size(layout.width, layout.height) if layout else Size(0, 0)
        self.set_reactive(GraphView.selected, selected if layout and layout.vertices else 0)
        self.refresh()
        if layout is not None and layout.vertices:
            self.call_after_refresh(self._reveal)

    def set_overlay(self, vertex_heat: Mapping[int, Color], crossing: frozenset[int]) -> None:
        """Colour vertices by their stage's cost and mark edges that cross a stage boundary."""
        self._vertex_heat = dict(vertex_heat)
        self._crossing = crossing
        self.refresh()

    def set_matches(self, matches: frozenset[int]) -> None:
        self._matches = matches
        self.refresh()

    # ------------------------------------------------------------------ navigation

    def watch_selected(self) -> None:
        self.refresh()
        self._reveal()
        self.post_message(self.SelectionChanged(self.selected))

    def _reveal(self) -> None:
        if self._layout is None or not self._layout.vertices:
            return
        v = self._layout.vertices[self.selected]
        region = Region(v.x, v.layer * ROWS_PER_LAYER, v.width, 1)
        self.scroll_to_region(region, spacing=Spacing(2, 4, 2, 4), animate=False, immediate=True)

    def action_move(self, direction: str) -> None:
        if self._layout is not None and self._layout.vertices:
            self.selected = neighbour(self._layout, self.selected, direction)

    def action_choose(self) -> None:
        if self._layout is not None and self._layout.vertices:
            self.post_message(self.NodeChosen(self.selected))

    # ------------------------------------------------------------------ painting

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        layout = self._layout
        scroll_x, scroll_y = self.scroll_offset
        row = y + scroll_y
        if layout is None or row >= layout.height or width <= 0:
            return Strip.blank(width, base)
        chars = [" "] * width
        styles: list[Style] = [base] * width
        cells = layout.edge_cells.get(row)
        if cells:
            wire = base + Style(color="#7a869a")
            hot = base + Style(color="#ff5555", bold=True)
            for i in range(width):
                cell = cells.get(scroll_x + i)
                if cell is not None:
                    bits, edges = cell
                    chars[i] = BOX[bits]
                    crossing = self._crossing and any(e in self._crossing for e in edges)
                    styles[i] = hot if crossing else wire
        for vid in layout.vertex_at_row(row):
            v = layout.vertices[vid]
            if v.x + v.width <= scroll_x or v.x >= scroll_x + width:
                continue
            text = f"[{v.label}]" if v.folded else f" {v.label} "
            bg = self._vertex_heat.get(vid)
            style = base + Style(bgcolor=bg or Color.parse("#3b4252"), color="#ffffff",
                                 bold=v.folded)
            if vid in self._matches:
                style += Style(bgcolor="#d08770", color="#000000", underline=True)
            if vid == self.selected:
                style += Style(reverse=True, bold=True)
            for j, ch in enumerate(text):
                i = v.x + j - scroll_x
                if 0 <= i < width:
                    chars[i] = ch
                    styles[i] = style
        segments: list[Segment] = []
        start = 0
        for i in range(1, width + 1):
            if i == width or styles[i] is not styles[start]:
                segments.append(Segment("".join(chars[start:i]), styles[start]))
                start = i
        return Strip(segments, width)
