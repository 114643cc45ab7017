"""The Cluster screen: the nodes as the master's events describe them, and the event log.

The table is a view of the app's folded `ClusterState`; adding a node by address or starting
local nodes runs in a thread worker, and what happens shows up as events (NodeJoined, ...).
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Label, Log

from periphery_app.messages import NodesConnected
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.screens.modals import PromptModal
from periphery_app.session import Session
from periphery_app.units import human_bytes
from periphery_core.cluster.state import ClusterState

COLUMNS = ("name", "address", "device", "speed", "memory", "cpu", "rss", "stage", "state")
STATE_STYLE = {"ready": "green", "busy": "bold cyan", "joining": "yellow", "lost": "bold red",
               "discovered": "dim"}


class ClusterScreen(PeripheryScreen):
    """Nodes, their state and the event log."""

    CSS_PATH = "cluster.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add_node", "Add node"),
        Binding("l", "start_local", "Local nodes"),
    ]

    def __init__(self) -> None:
        super().__init__(name="cluster")
        self._shown_recent: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        yield DataTable(id="nodes", cursor_type="row", zebra_stripes=True)
        yield Label("", id="summary")
        yield Log(id="events", max_lines=500)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Cluster"
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.watch(self.papp, "cluster_state", self._state_changed)

    def on_screen_resume(self) -> None:
        self._state_changed(self.papp.cluster_state)

    def _state_changed(self, state: ClusterState) -> None:
        if not self.is_current and self._shown_recent:
            return  # redrawn on resume
        now = self.papp.now()
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for node in sorted(state.nodes.values(), key=lambda n: n.name):
            status = state.node_state(node.id, now)
            table.add_row(
                node.name,
                f"{node.host}:{node.port}",
                (node.device or "?")[:12],
                f"{node.speed:.2f}x" if node.speed is not None else "-",
                human_bytes(node.memory_bytes),
                f"{node.cpu_percent:.0f}%" if node.cpu_percent is not None else "-",
                human_bytes(node.rss_bytes),
                str(node.stage) if node.stage is not None else "-",
                f"[{STATE_STYLE.get(status, '')}]{status}[/]",
                key=node.id,
            )
        if state.nodes:
            table.move_cursor(row=min(row, len(state.nodes) - 1))
        counts = {s: len(state.nodes_in(s, now)) for s in ("ready", "busy", "joining", "lost")}
        self.query_one("#summary", Label).update(
            f" {len(state.nodes)} nodes: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
            + f" · deploy {state.deploy_status} · events (newest last)")
        if state.recent != self._shown_recent:
            # Append only what is new: the log then tails while the user is at its end and
            # stays put when they have scrolled up to read (Textual's Log does that on write).
            log = self.query_one(Log)
            new = _new_lines(self._shown_recent, state.recent)
            if new is None:
                log.clear()
                new = state.recent[-200:]
            log.write_lines(new)
            self._shown_recent = state.recent

    # ------------------------------------------------------------------ actions

    def action_add_node(self) -> None:
        def answered(spec: str | None) -> None:
            if spec:
                self.notify(f"connecting to {spec}…")
                self._connect(self.papp.session, spec)

        self.app.push_screen(PromptModal("Add node by address", "HOST:PORT"), answered)

    @work(thread=True, group="connect")
    def _connect(self, session: Session, spec: str) -> None:
        try:
            handle = session.connect(spec)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(NodesConnected([handle.name]))

    def action_start_local(self) -> None:
        self.notify("starting 3 local node processes…")
        self._start_local(self.papp.session, 3)

    @work(thread=True, exclusive=True, group="local")
    def _start_local(self, session: Session, n: int) -> None:
        try:
            handles = session.start_local(n)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(NodesConnected([h.name for h in handles]))


def _new_lines(shown: tuple[str, ...], recent: tuple[str, ...]) -> tuple[str, ...] | None:
    """The lines of `recent` after those already `shown`, where `recent` is `shown` with old
    lines dropped from the front and new ones appended; None when they share nothing."""
    if not shown:
        return recent
    for k in range(min(len(shown), len(recent)), 0, -1):
        if shown[-k:] == recent[:k]:
            return recent[k:]
    return None
