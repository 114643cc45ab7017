"""The Shards screen: choose K, replicas and a strategy, move boundaries by hand, assign stages
to nodes, save or load the plan, and deploy it.

`p` asks the planner for its shape (R replicas of K stages) over every live node, and the
screen says why it chose it; `r` sets the replicas by hand. With replicas, each stage's line
names the nodes that run it, one per replica.

Planning runs in a thread worker (a big graph takes a tenth of a second per re-plan); a moved
boundary re-plans with the same node order (`replan_model`), so the figures follow the keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Footer, Static
from textual.worker import get_current_worker

from periphery_app.control import ClusterControl, OpenedModel
from periphery_app.messages import Deployed, PlanChanged, ProgressReported
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.screens.modals import ChoiceModal, PromptModal
from periphery_app.screens.shards_view import controls_text
from periphery_app.widgets.stage_chart import StageChart
from periphery_core.cluster.handles import view_specs
from periphery_core.cluster.state import ClusterState
from periphery_core.cluster.views import StageDeploy
from periphery_core.errors import PlanError
from periphery_core.generate.planning import plan_model, plan_shape, replan_model
from periphery_core.partition.plan import (
    STRATEGIES,
    DeviceSpec,
    ShardPlan,
    load_plan,
    require_plan_for,
)
from periphery_core.progress import Progress

BY_HAND = "replicas set by hand (r)"


def moved(cuts: Sequence[int], boundary: int, delta: int, n: int) -> list[int]:
    """Cuts with one boundary moved by `delta`, kept strictly between its neighbours."""
    out = list(cuts)
    lo = out[boundary - 1] + 1 if boundary > 0 else 1
    hi = out[boundary + 1] - 1 if boundary + 1 < len(out) else n - 1
    out[boundary] = max(lo, min(hi, out[boundary] + delta))
    return out


class ShardsScreen(PeripheryScreen):
    """Plan the shards and deploy them."""

    MODE = "shards"
    LABEL = "Shards"
    CSS_PATH = "shards.tcss"
    # Most used first: a narrow footer cuts the last ones (they stay under ? and ^p).
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "deploy", "Deploy"),
        Binding("plus,equals_sign", "change_k(1)", "K+"),
        Binding("minus", "change_k(-1)", "K-"),
        Binding("a", "assign", "Assign"),
        Binding("b", "rebalance", "Balance"),
        Binding("p", "planner_shape", "Planner's shape"),
        Binding("r", "cycle_replicas", "Replicas"),
        Binding("t", "cycle_strategy", "Strategy"),
        Binding("A", "auto_assign", "Auto-assign", show=False),
        Binding("s", "save", "Save"),
        Binding("o", "load", "Load"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.k = 2
        self.replicas = 1
        self.strategy = "balanced"
        self.assignment: list[str | None] = []
        self.status = ""
        self._opened: OpenedModel | None = None
        self._cuts: list[int] = []
        self.plans_shown = 0  # for tests: plans this screen has displayed

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        yield Static("", id="controls")
        with VerticalScroll(id="stages"):
            yield StageChart(id="chart")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.papp, "opened", self._model_changed)
        self.watch(self.papp, "plan", self._plan_changed)
        self.watch(self.papp, "cluster_state", self._state_changed)
        self.query_one(StageChart).focus()

    # ------------------------------------------------------------------ state in

    def _model_changed(self, opened: OpenedModel | None) -> None:
        self._opened = opened
        if opened is None:
            return
        plan = self.papp.plan
        deployed = self.papp.cluster_state.assignment
        if deployed and (plan is None or plan.nodes_needed != len(deployed)):
            state = self.papp.cluster_state  # plan for the pipeline the cluster runs
            self.k, self.replicas = state.plan_stages, state.replicas
            self.assignment = list(deployed)
        if plan is None or plan.model_sha256 != opened.analysis.sha256:
            self._plan(opened, self.k, self.strategy, self._devices(self.k), self.replicas)

    def _plan_changed(self, plan: ShardPlan | None) -> None:
        if plan is not None:
            self.k, self.replicas = plan.k, plan.replicas
            self._cuts = plan.cuts
            pipeline = self.papp.control.pipeline
            if pipeline is not None and plan is pipeline.plan:  # it runs: on the nodes it runs on
                self.assignment = list(self.papp.cluster_state.assignment)
            if len(self.assignment) != plan.nodes_needed:
                need = plan.nodes_needed
                self.assignment = (self.assignment + [None] * need)[:need]
            if plan.strategy in STRATEGIES:
                self.strategy = plan.strategy
            self.plans_shown += 1
            if self.status.startswith("planning the shape"):  # it has come: the figures say it
                self.status = ""
            self._take_joined_nodes()
        self._redraw()

    def _state_changed(self, state: ClusterState) -> None:
        if (state.assignment and len(state.assignment) == len(self.assignment)
                and not any(self.assignment)):
            self.assignment = list(state.assignment)
        self._take_joined_nodes()
        if self.is_current:
            self._redraw()

    def _take_joined_nodes(self) -> None:
        """A plan none of whose stages has a node takes the nodes that are ready, in name
        order, once there are enough, and is planned again on their figures (its K, replicas
        and strategy kept; cuts moved by hand kept too): a model opened before its nodes
        joined is otherwise left planned for reference devices. A plan with any node
        assigned, or a cluster running a deployment, is left as it is."""
        plan, opened = self.papp.plan, self._opened
        if (plan is None or opened is None or any(self.assignment)
                or self.papp.cluster_state.assignment):
            return
        ready = {n.id for n in self.papp.cluster_state.nodes.values()
                 if n.state in ("ready", "busy")}
        ids = [key for key, _ in self._candidates() if key in ready]
        if len(ids) < plan.nodes_needed:
            return
        self.assignment = list[str | None](ids[:plan.nodes_needed])
        devices = self._devices(self.k)
        if plan.strategy not in STRATEGIES or devices is None:  # (cut by hand)
            self._after_assignment()
            return
        nodes = self.papp.cluster_state.nodes
        self._say(f"planned again on {', '.join(nodes[i].name for i in ids[:plan.nodes_needed])}"
                  ", the nodes that joined")
        self._plan(opened, self.k, self.strategy, devices, self.replicas)

    def on_screen_resume(self) -> None:
        self._redraw()

    def _deploy_shown(self, plan: ShardPlan | None,
                      state: ClusterState) -> Mapping[int, StageDeploy]:
        """Deploy progress for the plan on screen only if it is the plan the cluster runs (or
        is deploying), and a stage whose node was lost says so."""
        if plan is None or tuple(self.assignment) != state.assignment:
            return {}
        pipeline = self.papp.control.pipeline
        if state.deploy_status == "deployed" and pipeline is not None:
            running = pipeline.plan  # (without a pipeline of ours, the state is all we know)
            if running is None or [s.nodes for s in running.stages] != \
                    [s.nodes for s in plan.stages]:
                return {}  # another plan runs: this one was never deployed
        shown = dict(state.deploy)
        for index, d in shown.items():
            node = state.nodes.get(d.node_id)
            if node is not None and node.state == "lost":
                shown[index] = dataclasses.replace(d, status="failed",
                                                   error=f"node {node.name} lost")
        return shown

    def _names(self) -> list[str | None]:
        """Each stage's node; with replicas, the stage's node in every replica."""
        nodes = self.papp.cluster_state.nodes
        names = [nodes[a].name if a and a in nodes else None for a in self.assignment]
        if self.replicas == 1:
            return names
        k = self.k
        return [" + ".join(n or "?" for n in names[i::k]) if any(names[i::k]) else None
                for i in range(k)]

    def _redraw(self) -> None:
        plan = self.papp.plan
        state = self.papp.cluster_state
        self.query_one(StageChart).set_data(plan, self._names(), self._deploy_shown(plan, state))
        controls = controls_text(self.k, self.replicas, self.strategy, plan, self.assignment,
                                 state)
        self.query_one("#controls", Static).update(controls)
        self.query_one("#status", Static).update(self.status)

    def _say(self, text: str) -> None:
        self.status = text
        self.query_one("#status", Static).update(text)

    # ------------------------------------------------------------------ planning

    def _devices(self, k: int) -> list[DeviceSpec] | None:
        """The assigned nodes' measured figures: the master's, or the event fold's where the
        master does not know them (an app drawing recorded events). A stage with no node yet
        is costed on a node like the others (the middle one by speed), not on a reference
        machine, which put every stage's figures at reference speed (None: no node at all)."""
        slots = (list(self.assignment) + [None] * k)[:k]
        ids = [i for i in slots if i]
        control, nodes = self.papp.control, self.papp.cluster_state.nodes
        if not ids:
            return None
        if control.has_master and all(i in control.master().nodes for i in ids):
            specs = control.master().devices(ids)
        elif all(i in nodes for i in ids):
            specs = view_specs([nodes[i] for i in ids])
        else:
            return None
        like = sorted(specs, key=lambda d: d.speed)[len(specs) // 2]
        known = iter(specs)
        return [next(known) if node else dataclasses.replace(like, name=f"stage {s} (no node)")
                for s, node in enumerate(slots)]

    @work(thread=True, exclusive=True, group="plan")
    def _plan(self, opened: OpenedModel, k: int, strategy: str,
              devices: list[DeviceSpec] | None, replicas: int = 1) -> None:
        worker = get_current_worker()
        try:
            plan = plan_model(opened.loaded, opened.analysis, k, strategy=strategy,
                              devices=devices, decoder=opened.decoder)
            if replicas > 1:
                plan = plan.with_replicas(replicas, BY_HAND)
        except Exception as exc:
            self.report_failure(exc)
            return
        if not worker.is_cancelled:
            self.post_message(PlanChanged(plan))

    @work(thread=True, exclusive=True, group="plan")
    def _replan(self, opened: OpenedModel, plan: ShardPlan, cuts: list[int],
                devices: list[DeviceSpec] | None) -> None:
        worker = get_current_worker()
        try:
            new = replan_model(opened.loaded, opened.analysis, plan, cuts, devices,
                               opened.decoder)
        except Exception as exc:
            self.report_failure(exc)
            return
        if not worker.is_cancelled:
            self.post_message(PlanChanged(new))

    @on(StageChart.BoundaryMoved)
    def _boundary_moved(self, event: StageChart.BoundaryMoved) -> None:
        plan, opened = self.papp.plan, self._opened
        if plan is None or opened is None:
            return
        n = sum(len(s.nodes) for s in plan.stages)
        cuts = moved(self._cuts or plan.cuts, event.stage, event.delta, n)
        if cuts == self._cuts:
            self.app.bell()
            return
        self._cuts = cuts
        self._replan(opened, plan, cuts, self._devices(plan.k))

    def action_change_k(self, step: int) -> None:
        if self._opened is None:
            return
        k = max(1, min(len(self._opened.analysis.nodes), self.k + step))
        if k != self.k:
            self.k, self.replicas = k, 1  # K by hand: one pipeline (r adds replicas)
            # Assignments follow K: new stages take connected nodes no stage uses yet, so
            # going back to a K gives that K's plan again on the same nodes.
            taken = {a for a in self.assignment[:k] if a}
            free = [i for i, _ in self._candidates() if i not in taken]
            grown = [a if a else (free.pop(0) if free else None)
                     for a in (self.assignment + [None] * k)[:k]]
            self.assignment = grown
            self._plan(self._opened, k, self.strategy, self._devices(k))
            self._redraw()

    def action_cycle_replicas(self) -> None:
        """One more replica of this plan's pipeline while live nodes allow, then back to 1."""
        plan = self.papp.plan
        if plan is None:
            return
        alive = len(self._candidates())
        replicas = plan.replicas + 1 if (plan.replicas + 1) * plan.k <= alive else 1
        if replicas == plan.replicas:
            self.notify(f"{plan.k} stages: {alive} nodes make no more replicas", severity="warning")
            return
        taken = {a for a in self.assignment[:replicas * plan.k] if a}
        free = [i for i, _ in self._candidates() if i not in taken]
        need = replicas * plan.k
        self.assignment = [a if a else (free.pop(0) if free else None)
                           for a in (self.assignment + [None] * need)[:need]]
        self.post_message(PlanChanged(plan.with_replicas(replicas, BY_HAND)))

    @work(thread=True, exclusive=True, group="plan")
    def _plan_shape(self, opened: OpenedModel, devices: list[DeviceSpec],
                    strategy: str) -> None:
        worker = get_current_worker()
        try:
            plan = plan_shape(opened.loaded, opened.analysis, devices, strategy=strategy,
                              decoder=opened.decoder)
        except Exception as exc:
            self.report_failure(exc)
            return
        if not worker.is_cancelled:
            self.post_message(PlanChanged(plan))

    def action_planner_shape(self) -> None:
        """The shape the planner picks for every live node (partition.shape), with its reason."""
        if self._opened is None:
            return
        ids = [key for key, _ in self._candidates()]
        self.assignment = list[str | None](ids)
        devices = self._devices(len(ids)) if ids else None
        if devices is None:
            self.notify("no nodes yet: add some on the Cluster screen (4)", severity="warning")
            return
        self._say(f"planning the shape for {len(ids)} nodes…")
        self._plan_shape(self._opened, devices, self.strategy)

    def action_cycle_strategy(self) -> None:
        self.strategy = STRATEGIES[(STRATEGIES.index(self.strategy) + 1) % len(STRATEGIES)]
        self._plan_again()

    def action_rebalance(self) -> None:
        """The balanced cuts for this K, whatever made the plan shown (a cut moved by hand,
        another strategy): re-planning with the same strategy would give the same plan."""
        self.strategy = "balanced"
        self._plan_again()

    def _plan_again(self) -> None:
        """Plan the current K with the current strategy, as the same replicas."""
        if self._opened is not None:
            self._plan(self._opened, self.k, self.strategy, self._devices(self.k), self.replicas)
            self._redraw()

    # ------------------------------------------------------------------ assignment

    def _candidates(self) -> list[tuple[str, str]]:
        state = self.papp.cluster_state
        out = []
        for node in sorted(state.nodes.values(), key=lambda n: n.name):
            if node.state == "lost":
                continue
            speed = f"{node.speed:.2f}x" if node.speed is not None else "?"
            out.append((node.id, f"{node.name:<10} {node.host}:{node.port}  "
                                 f"{node.device or '?'}  {speed}  {node.state}"))
        return out

    def action_assign(self) -> None:
        plan = self.papp.plan
        if plan is None:
            return
        stage = self.query_one(StageChart).selected
        choices = self._candidates()
        if not choices:
            self.notify("no nodes yet: add some on the Cluster screen (4)", severity="warning")
            return

        def chosen(node_id: str | None) -> None:
            if node_id is None:
                return
            self.assign(stage, node_id)

        self.app.push_screen(ChoiceModal(f"Node for stage {stage}", choices), chosen)

    def assign(self, stage: int, node_id: str) -> None:
        """Put `node_id` on `stage`; a node already on another stage swaps places with it."""
        if node_id in self.assignment:
            other = self.assignment.index(node_id)
            self.assignment[other] = self.assignment[stage]
        self.assignment[stage] = node_id
        self._after_assignment()

    def action_auto_assign(self) -> None:
        ids = [key for key, _ in self._candidates()]
        if len(ids) < self.k:
            self.notify(f"{self.k} stages but {len(ids)} nodes", severity="warning")
            return
        self.assignment = list[str | None](ids[: self.k])
        self._after_assignment()

    def _after_assignment(self) -> None:
        plan, opened = self.papp.plan, self._opened
        devices = self._devices(self.k)
        if plan is not None and opened is not None and devices is not None:
            self._replan(opened, plan, self._cuts or plan.cuts, devices)
        self._redraw()

    # ------------------------------------------------------------------ files

    def action_save(self) -> None:
        plan = self.papp.plan
        if plan is None:
            return

        def answered(path: str | None) -> None:
            if not path:
                return
            try:
                written = plan.save(Path(path).expanduser())
            except (OSError, PlanError) as exc:
                self.report_failure(exc)
                return
            self._say(f"plan saved to {written}")

        self.app.push_screen(PromptModal("Save plan to", "plan.json", "plan.json"), answered)

    def action_load(self) -> None:
        def answered(path: str | None) -> None:
            if path:
                self.load_plan_file(Path(path).expanduser())

        self.app.push_screen(PromptModal("Load plan from", "plan.json", "plan.json"), answered)

    def load_plan_file(self, path: Path) -> None:
        """Read a plan file and make it the current plan (it must be for the open model)."""
        try:
            plan = load_plan(path)
            if self._opened is None:
                raise PlanError("open the plan's model first")
            require_plan_for(plan, self._opened.analysis.sha256, self._opened.loaded.name,
                             path.name)
        except (OSError, PlanError) as exc:
            self.report_failure(exc)
            return
        self.post_message(PlanChanged(plan))
        self._say(f"plan loaded from {path}")

    # ------------------------------------------------------------------ deploy

    def action_deploy(self) -> None:
        plan, opened = self.papp.plan, self._opened
        if plan is None or opened is None:
            return
        need = plan.nodes_needed
        if not all(self.assignment[:need]):
            ids = [key for key, _ in self._candidates()]
            if len(ids) < need:
                self.report_failure(PlanError(
                    f"the plan runs {plan.shape} on {need} nodes but {len(ids)} are "
                    "available: add nodes on the Cluster screen (4), or lower K or replicas"))
                return
            taken = {a for a in self.assignment if a}
            spare = iter(i for i in ids if i not in taken)
            self.assignment = [a or next(spare) for a in
                               (self.assignment + [None] * need)[:need]]
        assignment = tuple(a for a in self.assignment[:need] if a)
        self._say("deploying: extracting shards…")
        self._deploy(self.papp.control, opened, plan, assignment)

    @work(thread=True, exclusive=True, group="deploy")
    def _deploy(self, control: ClusterControl, opened: OpenedModel, plan: ShardPlan,
                assignment: tuple[str, ...]) -> None:
        def progress(p: Progress) -> None:
            self.post_message(ProgressReported(p))

        try:
            control.deploy(opened, plan, assignment, progress)
        except Exception as exc:
            self.post_message(ProgressReported(Progress("deploy", 1, 1, "failed")))
            self.report_failure(exc)
            return
        self.post_message(Deployed(assignment))

    def on_progress_reported(self, message: ProgressReported) -> None:
        p = message.progress
        if p.task == "extract":
            self._say(f"deploying: extracting shard {min(p.done + 1, p.total)} of {p.total}; "
                      "then uploading to the nodes")
        elif p.task == "deploy" and p.detail == "failed":
            self._say("deploy failed")

    def on_deployed(self, message: Deployed) -> None:
        plan = self.papp.plan
        shape = plan.shape if plan is not None else f"{len(message.assignment)} stages"
        self._say(f"deployed {shape} on {len(message.assignment)} nodes: every stage is ready")
