"""Per-stage bars of a plan: predicted compute, memory and bytes sent, plus deploy progress.

Bars are at most `MAX_BAR` cells: on a wide terminal the room beyond goes to what each stage
holds (its first and last node, the tensors it sends, its parameters and FLOPs).

The parent sets the data (`set_data`); the chart owns only its selection and reports keys as
messages (`Selected`, `BoundaryMoved`), so the screen decides what a moved boundary means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.console import RenderableType
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from periphery_app.units import bar, human_bytes, human_count, human_seconds
from periphery_core.cluster.views import StageDeploy
from periphery_core.partition.plan import ShardPlan, Stage

LINES_PER_STAGE = 5
MAX_BAR = 72
LABELS = 36  # columns beside a bar: the row's name and its figure
SIDE_MIN = 40  # the least room worth a side column


class StageChart(Widget, can_focus=True):
    """One block of bars per stage; up/down select a stage, left/right move its boundary."""

    DEFAULT_CSS = """
    StageChart {
        height: auto;
        padding: 0 1;
    }
    StageChart:focus {
        background: $boost;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "select(-1)", "Prev stage", show=False),
        Binding("down", "select(1)", "Next stage", show=False),
        Binding("left", "move(-1)", "Boundary ←"),
        Binding("right", "move(1)", "Boundary →"),
        Binding("shift+left", "move(-10)", "Boundary ←10", show=False),
        Binding("shift+right", "move(10)", "Boundary →10", show=False),
    ]

    selected: reactive[int] = reactive(0)

    class Selected(Message):
        """A stage was selected."""

        def __init__(self, stage: int) -> None:
            super().__init__()
            self.stage = stage

    class BoundaryMoved(Message):
        """The boundary after `stage` should move by `delta` nodes."""

        def __init__(self, stage: int, delta: int) -> None:
            super().__init__()
            self.stage = stage
            self.delta = delta

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._plan: ShardPlan | None = None
        self._names: list[str | None] = []
        self._deploy: Mapping[int, StageDeploy] = {}

    def set_data(self, plan: ShardPlan | None, names: Sequence[str | None],
                 deploy: Mapping[int, StageDeploy]) -> None:
        """Show a plan, the node names its stages are assigned to, and deploy progress."""
        self._plan = plan
        self._names = list(names)
        self._deploy = deploy
        if plan is not None and self.selected >= plan.k:
            self.selected = plan.k - 1
        self.refresh(layout=True)

    def action_select(self, step: int) -> None:
        if self._plan is not None:
            self.selected = max(0, min(self._plan.k - 1, self.selected + step))

    def action_move(self, delta: int) -> None:
        if self._plan is None or self.selected >= self._plan.k - 1:
            self.app.bell()  # the last stage has no boundary after it
            return
        self.post_message(self.BoundaryMoved(self.selected, delta))

    def watch_selected(self, value: int) -> None:
        self.post_message(self.Selected(value))
        self.refresh()
        parent = self.parent
        if isinstance(parent, Widget):
            parent.scroll_to_region(
                Region(0, value * LINES_PER_STAGE, self.size.width, LINES_PER_STAGE),
                animate=False)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return LINES_PER_STAGE * (self._plan.k if self._plan else 1)

    def render(self) -> RenderableType:
        plan = self._plan
        if plan is None:
            return Text("No plan yet: open a model on the Model screen (1).", style="dim")
        width = max(10, min(MAX_BAR, self.size.width - LABELS))
        side = self.size.width - width - LABELS - 2
        top_compute = max(s.compute_s for s in plan.stages) or 1.0
        top_memory = max(s.memory_bytes for s in plan.stages) or 1
        top_sent = max((s.output_bytes for s in plan.stages[:-1]), default=0) or 1
        text = Text(no_wrap=True, overflow="ellipsis")
        cut = 0
        for s in plan.stages:
            cut += len(s.nodes)
            chosen = s.index == self.selected
            bottleneck = s.index == plan.bottleneck_stage
            name = self._names[s.index] if s.index < len(self._names) else None
            head = Text()
            head.append("▶ " if chosen else "  ", style="bold yellow" if chosen else "")
            head.append(f"Stage {s.index}", style="bold reverse" if chosen else "bold")
            head.append(f"  {len(s.nodes)} nodes  on ")
            head.append(name or f"{s.device} (unassigned)", style="bold" if name else "dim")
            head.append(f"  cost {human_seconds(s.cost_s)}")
            if bottleneck:
                head.append("  ◀ bottleneck", style="bold red")
            rows = [Text("    compute ", style="dim"), Text("    memory  ", style="dim"),
                    Text("    sends   ", style="dim"), Text("    deploy  ", style="dim")]
            rows[0].append(bar(s.compute_s / top_compute, width),
                           style="red" if bottleneck else "green")
            rows[0].append(f" {human_seconds(s.compute_s)}")
            rows[1].append(bar(s.memory_bytes / top_memory, width), style="blue")
            rows[1].append(f" {human_bytes(s.memory_bytes)}"
                           + (f" ({s.workers} at once)" if s.workers > 1 else ""))
            if s.index < plan.k - 1:
                rows[2].append(bar(s.output_bytes / top_sent, width), style="magenta")
                rows[2].append(f" {human_bytes(s.output_bytes)} (cut at {cut})")
            else:
                rows[2].append("(results to the master)", style="dim")
            d = self._deploy.get(s.index)
            if d is None:
                rows[3].append("-", style="dim")
            elif d.status == "failed":
                rows[3].append(f"failed: {d.error}", style="bold red")
            else:
                rows[3].append(bar(d.fraction, width), style="cyan")
                provider = (d.provider or "").removesuffix("ExecutionProvider")
                label = provider if d.status == "ready" else f"{d.fraction:.0%}"
                rows[3].append(f" {d.status} {label}")
            if side >= SIDE_MIN:
                for row, extra in zip(rows, _holds(s), strict=True):
                    row.pad_right(width + LABELS + 2 - row.cell_len)
                    row.append_text(extra)
            text.append_text(head)
            for row in rows:
                text.append("\n")
                text.append_text(row)
            text.append("\n")
        text.rstrip()
        return text


def _holds(stage: Stage) -> list[Text]:
    """Four lines on what a stage holds, for the side column of a wide chart."""
    sends = ", ".join(f"{b.name} {'x'.join(map(str, b.shape))}" for b in stage.outputs)
    return [Text.assemble(("from  ", "dim"), stage.nodes[0] if stage.nodes else "-"),
            Text.assemble(("to    ", "dim"), stage.nodes[-1] if stage.nodes else "-"),
            Text.assemble(("out   ", "dim"), sends or "-"),
            Text.assemble(("holds ", "dim"), f"{human_bytes(stage.param_bytes)} of weights · "
                                             f"{human_count(stage.flops, 'FLOP')}")]
