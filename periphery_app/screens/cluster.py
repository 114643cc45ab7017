"""The Cluster screen: the nodes as the master's events describe them, and the event log.

The table is a view of the app's folded `ClusterState` (a node that computes several requests
at once says so beside its device: `cuda, 4 at once`), plus the nodes advertised over mDNS
that the master has not joined yet (the cluster control browses from the screen's first look on,
rows appear and go as nodes do); `c` connects the selected one. `s` serves the deployed model
over HTTP (as `periphery serve` does) and the summary then names the endpoint and its rate.
Adding a node by address or starting local nodes runs in a thread worker, and what happens
shows up as events.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Label, Log

from periphery_app.control import ClusterControl, OpenedModel
from periphery_app.liveness import master_stopped, node_status
from periphery_app.messages import NodesConnected
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.screens.modals import PromptModal
from periphery_app.units import human_bytes
from periphery_core.cluster.handles import advertised_release
from periphery_core.cluster.state import ClusterState
from periphery_core.discovery import NodeAddress

# Most important first: on a narrow terminal the last columns are the ones cut.
COLUMNS = ("name", "state", "stage", "address", "speed", "cpu", "device", "memory", "rss")


class ClusterScreen(PeripheryScreen):
    """Nodes, their state and the event log."""

    MODE = "cluster"
    LABEL = "Cluster"
    CSS_PATH = "cluster.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "connect_selected", "Connect"),
        Binding("a", "add_node", "Add node"),
        Binding("l", "start_local", "Local nodes"),
        Binding("s", "serve", "Serve HTTP"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._shown_recent: tuple[str, ...] = ()
        self._discovered: dict[str, NodeAddress] = {}  # advertised, not joined: by node id
        self._served: tuple[float, int] | None = None  # (when, requests) at the last draw

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        yield DataTable(id="nodes", cursor_type="row", zebra_stripes=True)
        yield Label("", id="summary")
        yield Log(id="events", max_lines=500)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.watch(self.papp, "cluster_state", self._state_changed)
        self.papp.control.start_discovery()
        self.set_interval(1.0, self._poll_discovery)

    def _poll_discovery(self) -> None:
        """Nodes advertised now and not joined: redraw when that set changes."""
        joined = self.papp.cluster_state.nodes
        found = {a.node_id: a for a in self.papp.control.discovered() if a.node_id not in joined}
        # Redraw on a change, and while nodes are connected: a silence shows even when no
        # event arrives to say so.
        if found.keys() != self._discovered.keys() or (joined and self.is_current):
            self._discovered = found
            self._draw(self.papp.cluster_state)

    def on_screen_resume(self) -> None:
        self._state_changed(self.papp.cluster_state)

    def _state_changed(self, state: ClusterState) -> None:  # (one parameter: Textual's watch)
        if not self.is_current and self._shown_recent:
            return  # redrawn on resume
        self._draw(state)

    def _draw(self, state: ClusterState) -> None:
        now = self.papp.now()
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for node in sorted(state.nodes.values(), key=lambda n: n.name):
            table.add_row(
                node.name,
                node_status(state, node, now),
                state.slot_label(node.stage) if node.stage is not None else "-",
                f"{node.host}:{node.port}",
                f"{node.speed:.2f}x" if node.speed is not None else "-",
                (f"{node.cpu_percent:.0f}%" if node.cpu_percent is not None else "-")
                + (f" gpu {node.gpu_percent:.0f}%" if node.gpu_percent is not None else ""),
                (node.device or "?")[:12]
                + (f", {node.workers} at once" if node.workers > 1 else ""),
                human_bytes(node.memory_bytes),
                human_bytes(node.rss_bytes),
                key=node.id,
            )
        waiting = [a for i, a in self._discovered.items() if i not in state.nodes]
        for address in sorted(waiting, key=lambda a: a.name):
            # one of another release says so before anyone tries it (c says what to do)
            found = "[yellow]other release[/]" if advertised_release(address) else \
                "[dim]discovered[/]"
            table.add_row(address.name, found, "-",
                          f"{address.host}:{address.port}", "-", "-", "-", "-", "-",
                          key=address.node_id)
        rows = len(state.nodes) + len(waiting)
        if rows:
            table.move_cursor(row=min(row, rows - 1))
        counts = {s: len(state.nodes_in(s, now)) for s in ("ready", "busy", "joining", "lost")}
        summary = self._summary(state, counts, len(waiting))
        failure = self.papp.control.master_failure
        if failure is not None:
            summary = master_stopped(failure)
        summary += self._endpoint_line()
        self.query_one("#summary", Label).update(summary)
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

    def _endpoint_line(self) -> str:
        """The HTTP endpoint, if one runs: where, and its requests per second since the last
        draw."""
        endpoint = self.papp.control.endpoint
        if endpoint is None:
            self._served = None
            return ""
        now, total = self.papp.now(), endpoint.requests()
        rate = 0.0
        if self._served is not None and now > self._served[0]:
            rate = (total - self._served[1]) / (now - self._served[0])
        self._served = (now, total)
        return (f"\n endpoint [b]{endpoint.url}[/] ({endpoint.service.routes}) · "
                f"{rate:.1f} requests/s · {total} answered · "
                f"{endpoint.service.in_flight} in flight · s stops it")

    @staticmethod
    def _summary(state: ClusterState, counts: dict[str, int], waiting: int) -> str:
        """One line: the nodes and the deploy, and what to do when there is nothing yet."""
        if not state.nodes and not waiting:
            return (" no nodes yet · looking for nodes on the network (mDNS): start "
                    "periphery-node on a host, press l for local nodes, or a to add one by "
                    "address where multicast is blocked")
        parts = [f"{v} {k}" for k, v in counts.items() if v]
        if waiting:
            parts.append(f"{waiting} discovered (select one, c connects)")
        return (f" {len(state.nodes)} nodes: {', '.join(parts)} · deploy {state.deploy_status}"
                " · events (newest last)")

    # ------------------------------------------------------------------ actions

    def action_connect_selected(self) -> None:
        """Connect to the discovered node under the cursor."""
        table = self.query_one(DataTable)
        if not table.row_count:
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        address = self._discovered.get(str(key))
        if address is None:
            self.notify("that node is already connected: c connects a discovered one")
            return
        if (mismatch := advertised_release(address)) is not None:
            self.report_failure(mismatch)  # what to do, at once
            return
        self.notify(f"connecting to {address.name}…")
        self._connect_address(self.papp.control, address)

    @work(thread=True, group="connect")
    def _connect_address(self, control: ClusterControl, address: NodeAddress) -> None:
        try:
            handle = control.connect_address(address)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(NodesConnected([handle.name]))

    def action_add_node(self) -> None:
        def answered(spec: str | None) -> None:
            if spec:
                self.notify(f"connecting to {spec}…")
                self._connect(self.papp.control, spec)

        self.app.push_screen(PromptModal("Add node by address", "HOST:PORT"), answered)

    @work(thread=True, group="connect")
    def _connect(self, control: ClusterControl, spec: str) -> None:
        try:
            handle = control.connect(spec)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(NodesConnected([handle.name]))

    def action_start_local(self) -> None:
        self.notify("starting 3 local node processes…")
        self._start_local(self.papp.control, 3)

    def action_serve(self) -> None:
        """Serve the deployed model over HTTP on 127.0.0.1, or stop serving."""
        control = self.papp.control
        if control.endpoint is not None:
            control.stop_endpoint()
            self.notify("the HTTP endpoint is stopped")
            self._draw(self.papp.cluster_state)
            return
        opened = self.papp.opened
        if opened is None:
            self.notify("open and deploy a model first (o, then the Shards screen, 3)")
            return
        self._serve(control, opened)

    @work(thread=True, exclusive=True, group="serve")
    def _serve(self, control: ClusterControl, opened: OpenedModel) -> None:
        try:
            endpoint = control.start_endpoint(opened)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.app.call_from_thread(self.notify, f"serving at {endpoint.url}")
        self.app.call_from_thread(self._draw, self.papp.cluster_state)

    @work(thread=True, exclusive=True, group="local")
    def _start_local(self, control: ClusterControl, n: int) -> None:
        try:
            handles = control.start_local(n)
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
