"""The Periphery Textual app: the screens, the keys that switch them, and the shared state.

Design choice: attributes down, messages up. The app holds what every screen reads (the open
model, the plan, the folded cluster state and its sampled history) as reactive attributes that
screens watch; screens and their thread workers post facts (`ModelOpened`, `PlanChanged`, ...)
that the app turns into new values. The cluster state is a fold of the master's events made by
`StateTracker` in the core; the app only samples it on a timer, or is given a fixed one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen

from periphery_app.control import ClusterControl, OpenedModel, open_model
from periphery_app.history import Sample, append, sample
from periphery_app.messages import (
    Deployed,
    ModelOpened,
    NodesConnected,
    OperationFailed,
    PlanChanged,
)
from periphery_app.recent import remember
from periphery_app.screens.base import PeripheryScreen, as_user_error
from periphery_app.screens.chat import ChatScreen
from periphery_app.screens.cluster import ClusterScreen
from periphery_app.screens.dashboard import DashboardScreen
from periphery_app.screens.graph import GraphScreen
from periphery_app.screens.help import keys_help
from periphery_app.screens.modals import DetailsModal, ErrorModal
from periphery_app.screens.model import ModelScreen
from periphery_app.screens.quantize import QuantizeScreen
from periphery_app.screens.shards import ShardsScreen
from periphery_app.widgets.graph_view import GraphView
from periphery_app.widgets.stage_chart import StageChart
from periphery_core.cluster.state import ClusterState
from periphery_core.generate.planning import plan_model
from periphery_core.partition.plan import ShardPlan


class PeripheryApp(App[None]):
    """Plan, deploy and watch a sharded ONNX pipeline from the terminal."""

    CSS_PATH = "app.tcss"
    TITLE = "Periphery"
    # The main screens, in the order of their keys (1, 2, ...) and of the screen bar.
    SCREENS_IN_ORDER: ClassVar[tuple[type[PeripheryScreen], ...]] = (
        ModelScreen, GraphScreen, ShardsScreen, ClusterScreen, DashboardScreen, QuantizeScreen,
        ChatScreen,
    )
    MODES: ClassVar[dict[str, str | Callable[[], Screen]]] = {
        cls.MODE: cls for cls in SCREENS_IN_ORDER
    }
    DEFAULT_MODE = "model"
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(str(i), f"show('{cls.MODE}')", cls.LABEL,
                  tooltip=f"Show the {cls.LABEL} screen", show=False)
          for i, cls in enumerate(SCREENS_IN_ORDER, start=1)),
        Binding("question_mark", "help", "Keys"),
        Binding("escape", "go_back", "Back", show=False),
        Binding("q", "quit", "Quit"),
    ]

    opened: reactive[OpenedModel | None] = reactive(None, always_update=True)
    plan: reactive[ShardPlan | None] = reactive(None, always_update=True)
    cluster_state: reactive[ClusterState] = reactive(ClusterState.empty, always_update=True)
    history: reactive[tuple[Sample, ...]] = reactive((), always_update=True)

    def __init__(
        self,
        model: Path | None = None,
        *,
        demo: bool = False,
        demo_nodes: int = 3,
        browse_dir: Path | None = None,
        fixed_state: ClusterState | None = None,
        fixed_history: tuple[Sample, ...] | None = None,
        clock: Callable[[], float] = time.time,
        refresh_s: float = 0.2,
        keys_dir: Path | None = None,
        insecure: bool = False,
        device: str = "cpu",
        cost_scale: float | None = None,
    ) -> None:
        """Create the app.

        Args:
            model: A model to open at start.
            demo: Start local nodes, open `model`, plan, deploy and stream (the whole loop).
            demo_nodes: Local nodes (and stages) for the demo.
            browse_dir: The folder the file picker starts in (default: the working folder).
            fixed_state: Show this cluster state instead of a live one (snapshots).
            fixed_history: Show this latency history instead of sampling one (snapshots).
            clock: The time source for "now" (fixed in snapshots).
            refresh_s: How often the live cluster state is sampled.
            keys_dir: The master's CurveZMQ key folder for nodes added by address.
            insecure: Run the master without keys (on a network you trust).
            device: What local nodes run their stages on (`cpu`, `cuda[:N]`).
            cost_scale: Plan models on this scale of their estimates instead of one measured
                by running them here (`generate.planning.calibrated`; snapshots).
        """
        super().__init__()
        self.control = ClusterControl(keys_dir, insecure, device)
        self.initial_model = model
        self.demo = demo
        self.demo_nodes = demo_nodes
        self.browse_dir = (browse_dir or Path.cwd()).resolve()
        self.now = clock
        self.refresh_s = refresh_s
        self._fixed = fixed_state is not None
        self._cost_scale = cost_scale
        self._running_plan: ShardPlan | None = None  # the pipeline's plan, as last polled
        self._mode_history: list[str] = []
        if fixed_state is not None:
            self.set_reactive(PeripheryApp.cluster_state, fixed_state)
        if fixed_history is not None:
            self.set_reactive(PeripheryApp.history, fixed_history)

    # ------------------------------------------------------------------ lifecycle

    def on_mount(self) -> None:
        if not self._fixed:
            self.set_interval(self.refresh_s, self._poll_state)
        if self.demo:
            self.run_demo()
        elif self.initial_model is not None:
            screen = self.screen
            if isinstance(screen, ModelScreen):
                screen.open(self.initial_model)

    def _poll_state(self) -> None:
        tracker = self.control.tracker
        if tracker is None:
            return
        state = tracker.state
        if state is not self.cluster_state:
            self.cluster_state = state
        pipeline = self.control.pipeline
        running = pipeline.plan if pipeline is not None else None
        if running is not self._running_plan:
            # The pipeline moved its cuts (a rebalance, a recovery): show the plan that runs,
            # unless the user is looking at another one of their own.
            if self.plan is self._running_plan and self._running_plan is not None \
                    and self.opened is not None and pipeline is not None \
                    and pipeline.loaded is self.opened.loaded:
                self.plan = running
            self._running_plan = running
        if state.requests_completed:
            self.history = append(self.history, sample(state, self.now()))

    async def action_quit(self) -> None:
        """Stop the load and the workers, close the master and local nodes, then exit."""
        self.workers.cancel_all()
        await asyncio.to_thread(self.control.close)
        self.exit()

    # ------------------------------------------------------------------ navigation

    def action_show(self, mode: str) -> None:
        if mode != self.current_mode:
            self._mode_history.append(self.current_mode)
            self.switch_mode(mode)

    def action_go_back(self) -> None:
        if self._mode_history:
            self.switch_mode(self._mode_history.pop())

    def action_help(self) -> None:
        sections: list[tuple[str, Iterable]] = [("Everywhere", self.BINDINGS)]
        sections += [(f"{cls.LABEL} screen", cls.BINDINGS) for cls in self.SCREENS_IN_ORDER]
        sections += [("Graph drawing", GraphView.BINDINGS), ("Stage bars", StageChart.BINDINGS)]
        self.push_screen(DetailsModal("Keys", keys_help(sections), wide=True))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        seen = set()
        for active in screen.active_bindings.values():
            b = active.binding
            if not b.description or b.action in seen or b.action == "quit":
                continue
            seen.add(b.action)
            yield SystemCommand(b.description, b.tooltip or f"{b.description} ({b.key})",
                                partial(self.run_action, b.action, active.node))

    # ------------------------------------------------------------------ facts from below

    def on_model_opened(self, message: ModelOpened) -> None:
        remember(message.opened.loaded.path)
        self.plan = None
        opened = message.opened
        if self._cost_scale is not None:
            opened = replace(opened, analysis=replace(opened.analysis,
                                                      cost_scale=self._cost_scale))
        self.opened = opened
        self.notify(f"opened {message.opened.loaded.name}: "
                    f"{len(message.opened.analysis.nodes):,} nodes")
        deployed = self.control.pipeline
        if deployed is not None and deployed.deployed \
                and deployed.loaded.path != message.opened.loaded.path:
            self.notify(f"the cluster still runs {deployed.loaded.name}: deploy "
                        f"{message.opened.loaded.name} on the Shards screen (3) to replace it",
                        severity="warning", timeout=10)

    def on_plan_changed(self, message: PlanChanged) -> None:
        self.plan = message.plan

    def on_operation_failed(self, message: OperationFailed) -> None:
        self.push_screen(ErrorModal(message.error.title, message.error.message))

    def on_nodes_connected(self, message: NodesConnected) -> None:
        self.notify(f"connected: {', '.join(message.names)}")

    async def on_deployed(self, message: Deployed) -> None:
        self.notify(f"deployed on {len(message.assignment)} nodes")
        if self.demo:
            self.demo = False
            self._mode_history.append(self.current_mode)
            if self.opened is not None and self.opened.decoder is not None:
                await self.switch_mode("chat")  # a language model: talk to it
                return
            await self.switch_mode("dashboard")
            screen = self.screen
            if isinstance(screen, DashboardScreen):
                screen.start_load()

    # ------------------------------------------------------------------ the demo

    @work(thread=True, exclusive=True, group="demo")
    def run_demo(self) -> None:
        """Local nodes, the model, a K-stage plan, a deploy; then the dashboard streams."""
        control = self.control
        path = self.initial_model
        try:
            if path is None:
                raise FileNotFoundError("no model given for the demo")
            self.call_from_thread(self.notify, f"starting {self.demo_nodes} local nodes…")
            handles = control.start_local(self.demo_nodes)
            self.post_message(NodesConnected([h.name for h in handles]))
            opened = open_model(path)
            self.post_message(ModelOpened(opened))
            ids = [h.node_id for h in handles]
            plan = plan_model(opened.loaded, opened.analysis, self.demo_nodes,
                              devices=control.master().devices(ids), decoder=opened.decoder)
            self.post_message(PlanChanged(plan))
            control.deploy(opened, plan, ids)
        except Exception as exc:
            self.post_message(OperationFailed(as_user_error(exc)))
            return
        self.post_message(Deployed(tuple(ids)))
