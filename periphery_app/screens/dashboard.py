"""The Dashboard screen: end-to-end latency and throughput over time, per-stage timings with
the bottleneck, per-node utilisation, and a request load to start and stop.

Everything shown is drawn from the app's folded `ClusterState` and its sampled history; the
load is a thread worker that submits random requests with a bounded number in flight.
"""

from __future__ import annotations

import math
import threading
from typing import ClassVar

from rich import box
from rich.table import Table
from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Label, Sparkline, Static
from textual.worker import get_current_worker

from periphery_app.control import LoadFigures, feeds_for, run_load
from periphery_app.history import Sample
from periphery_app.liveness import master_stopped, node_status
from periphery_app.messages import LoadStopped
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.units import bar, human_bytes, human_seconds
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.cluster.state import ClusterState
from periphery_core.errors import PeripheryError
from periphery_core.runtime.feeds import Feeds

METRICS = (("p50", "p50 latency"), ("p99", "p99 latency"), ("rps", "throughput"))
# Under this many rows the sparklines shrink so that the stage and node tables keep their rows.
SHORT_ROWS = 30


def _series(history: tuple[Sample, ...], key: str) -> list[float]:
    values = [s.p50_s if key == "p50" else s.p99_s if key == "p99" else s.throughput
              for s in history]
    return [0.0 if math.isnan(v) else v for v in values]


# How a stage's outputs travel (ClusterState.links; cluster/same_host.py).
_VIA = {"ipc": "local", "tcp": "TCP"}  # local: a private socket, big tensors in shared memory


def _link(state: ClusterState, slot: int) -> str:
    return state.links[slot] if slot < len(state.links) else ""

class DashboardScreen(PeripheryScreen):
    """Live figures of the pipeline."""

    MODE = "dashboard"
    LABEL = "Dashboard"
    CSS_PATH = "dashboard.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "toggle_load", "Start/stop load"),
        Binding("plus,equals_sign", "inflight(1)", "In flight+"),
        Binding("minus", "inflight(-1)", "In flight-"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.figures = LoadFigures()
        self.load_running = False
        self._stop = threading.Event()

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        yield Static("", id="load")
        with Horizontal(id="sparks"):
            for key, _title in METRICS:
                with Vertical(classes="metric"):
                    yield Label("", id=f"label-{key}", classes="metric-label")
                    yield Sparkline([], id=f"spark-{key}")
        yield Static("", id="stages")
        yield Static("", id="utilisation")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.papp, "history", self._redraw_history)
        self.watch(self.papp, "cluster_state", self._redraw_state)
        # When events stop, the state stops changing: redraw anyway, so that rows whose
        # reports stopped say so (liveness) instead of looking live.
        self.set_interval(1.0, lambda: self._redraw_state(self.papp.cluster_state))

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(event.size.height < SHORT_ROWS, "-short")

    def on_screen_resume(self) -> None:
        self._redraw_history(self.papp.history)
        self._redraw_state(self.papp.cluster_state)

    # ------------------------------------------------------------------ drawing

    def _redraw_history(self, history: tuple[Sample, ...]) -> None:
        if not self.is_current:
            return
        last = history[-1] if history else None
        opened = self.papp.opened
        # A language model's requests are decode steps: one token each (prefills aside).
        tokens = opened is not None and opened.decoder is not None
        for key, title in METRICS:
            self.query_one(f"#spark-{key}", Sparkline).data = _series(history, key)
            if key == "p50" and tokens:
                title = "p50 per token"
            if last is None:
                value = "-"
            elif key == "rps":
                value = f"{last.throughput:.1f} {'tokens' if tokens else 'req'}/s"
            else:
                value = human_seconds(last.p50_s if key == "p50" else last.p99_s)
            self.query_one(f"#label-{key}", Label).update(f"{title}  [b]{value}[/b]")

    def _redraw_state(self, state: ClusterState) -> None:
        if not self.is_current:
            return
        self.query_one("#stages", Static).update(self._stage_table(state))
        self.query_one("#utilisation", Static).update(self._node_table(state))
        self._draw_load(state)

    def _stage_table(self, state: ClusterState) -> Table:
        """Per slot: its medians, and what it sends over (a socket on its host, or TCP)."""
        table = Table(title="Per stage (medians of recent requests)", title_justify="left",
                      header_style="bold", expand=True, padding=(0, 1), box=box.SIMPLE_HEAD)
        for col in ("stage", "node", "queue", "compute", "transfer", "via", "total"):
            table.add_column(col, justify="right" if col not in ("node", "stage", "via")
                             else "left", no_wrap=True)
        table.add_column("", ratio=1, no_wrap=True)
        summaries = state.stage_stats.summaries()
        worst = state.bottleneck_stage()
        top = max((s.total_median for s in summaries), default=0.0) or 1.0
        for s in summaries:
            node_id = state.assignment[s.stage] if s.stage < len(state.assignment) else None
            node = state.nodes.get(node_id) if node_id is not None else None
            name = node.name if node is not None else "?"
            hot = s.stage == worst
            style = "bold red" if hot else ""
            table.add_row(
                state.slot_label(s.stage) + (" ◀" if hot else ""), name,
                human_seconds(s.queue_median), human_seconds(s.compute_median),
                human_seconds(s.transfer_median), _VIA.get(_link(state, s.stage), ""),
                human_seconds(s.total_median),
                Text(bar(s.total_median / top, 24), style="red" if hot else "green"),
                style=style,
            )
        if not summaries:
            table.add_row("-", "no requests yet", "", "", "", "", "", "")
        return table

    def _node_table(self, state: ClusterState) -> Table:
        table = Table(title="Per node", title_justify="left", header_style="bold",
                      padding=(0, 1), box=box.SIMPLE_HEAD)
        caches = any(n.kv_bytes is not None for n in state.nodes.values())
        for col in ("node", "state", "cpu", "", "rss", "stage", *(("KV cache",) if caches else ())):
            table.add_column(col, no_wrap=True)
        now = self.papp.now()
        for node in sorted(state.nodes.values(), key=lambda n: n.name):
            cpu = node.cpu_percent
            table.add_row(
                node.name, Text.from_markup(node_status(state, node, now)),
                f"{cpu:.0f}%" if cpu is not None else "-",
                Text(bar((cpu or 0.0) / 100.0, 20), style="cyan"),
                human_bytes(node.rss_bytes),
                state.slot_label(node.stage) if node.stage is not None else "-",
                *((f"{human_bytes(node.kv_bytes)} ({node.sequences} seq)"
                   if node.kv_bytes is not None else "-",) if caches else ()),
            )
        return table

    def _draw_load(self, state: ClusterState) -> None:
        f = self.figures
        failure = self.papp.control.master_failure
        if failure is not None:
            self.query_one("#load", Static).update(Text.from_markup(master_stopped(failure)))
            return
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" load ", style="bold reverse")
        pipeline = self.papp.control.pipeline
        opened = self.papp.opened
        if pipeline is not None:
            text.append(f" {pipeline.loaded.name} ", style="bold")
            if opened is not None and opened.loaded is not pipeline.loaded:
                text.append(f"(not the open {opened.loaded.name}: deploy that on Shards) ",
                            style="yellow")
        if self.load_running:
            text.append(f" running, {f.inflight} in flight ", style="bold green")
        else:
            text.append(" stopped ", style="dim")
        if state.recovering:
            text.append(" recovering: re-planning onto the nodes still alive ",
                        style="bold yellow")
        text.append(f" · completed {state.requests_completed:,} · failed "
                    f"{state.requests_failed:,}")
        if state.recoveries:
            text.append(f" · recovered {state.recoveries}x")
        text.append(" · space starts/stops, +/- in flight")
        if f.last_error:
            text.append(f"\n last error: {f.last_error}", style="red")
        self.query_one("#load", Static).update(text)

    # ------------------------------------------------------------------ load

    def start_load(self) -> None:
        """Start streaming random requests through the deployed pipeline."""
        control = self.papp.control
        opened = self.papp.opened
        if self.load_running:
            return
        # The cluster control's pipeline says whether a deploy finished: the folded cluster state is
        # sampled on a timer and may not have seen the "deploy finished" event yet.
        pipeline = control.pipeline
        if opened is None or pipeline is None or not pipeline.deployed:
            self.report_failure(PeripheryError(
                "nothing is deployed: plan and deploy on the Shards screen (3) first",
                title="No pipeline"))
            return
        if opened.decoder is not None:
            self.report_failure(PeripheryError(
                "a language model is deployed: its stages keep KV caches per sequence, so "
                "random requests do not apply; generate on the Chat screen (7)",
                title="Language model"))
            return
        self.load_running = True
        self._stop.clear()
        self.figures.last_error = ""
        self._run_load(pipeline, feeds_for(opened.analysis), self.figures)
        self._draw_load(self.papp.cluster_state)

    def stop_load(self) -> None:
        """Ask the load to stop; it finishes the requests in flight."""
        self._stop.set()
        self.load_running = False
        self._draw_load(self.papp.cluster_state)

    @work(thread=True, exclusive=True, group="load")
    def _run_load(self, pipeline: Pipeline, pool: list[Feeds], figures: LoadFigures) -> None:
        worker = get_current_worker()
        try:
            run_load(pipeline.submit, pool, stop=lambda: worker.is_cancelled or self._stop.is_set(),
                     figures=figures)
        except Exception as exc:
            figures.last_error = str(exc)
            self.post_message(LoadStopped(str(exc)))
            return
        self.post_message(LoadStopped(""))

    def on_load_stopped(self, message: LoadStopped) -> None:
        self.load_running = False
        self._draw_load(self.papp.cluster_state)
        if message.reason:
            self.notify(f"load stopped: {message.reason}", severity="error")

    def action_toggle_load(self) -> None:
        if self.load_running:
            self.stop_load()
        else:
            self.start_load()

    def action_inflight(self, step: int) -> None:
        self.figures.inflight = max(1, min(64, self.figures.inflight + step))
        self._draw_load(self.papp.cluster_state)
