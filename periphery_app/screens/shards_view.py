"""What the Shards screen says above its stage bars: K, the replicas and the strategy chosen,
the plan's bottleneck, balance and predicted shape, and which stages have no node yet.

A function of the plan, the choices and the cluster's state, kept apart from the screen's
keys and workers (`shards.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from periphery_app.units import human_bytes, human_rate, human_seconds
from periphery_core.cluster.state import ClusterState
from periphery_core.partition.plan import ShardPlan


def controls_text(k: int, replicas: int, strategy: str, plan: ShardPlan | None,
                  assignment: Sequence[str | None], state: ClusterState) -> Text:
    """The screen's controls line and, with a plan, its figures and any stage without a node."""
    controls = Text(no_wrap=True, overflow="ellipsis")
    controls.append(f" K = {k} ", style="bold reverse")
    controls.append(" (+/-)   replicas ")
    controls.append(f" {replicas} ", style="bold reverse")
    controls.append(" (r)   strategy ")
    controls.append(f" {strategy} ", style="bold reverse")
    controls.append(" (t)   p: the planner's shape")
    if plan is None:
        return controls
    if plan.strategy != strategy:
        controls.append(f"  this plan: {plan.strategy}", style="yellow")
        if plan.strategy == "manual":
            controls.append(" (cut by hand; b re-balances)", style="yellow")
    controls.append(f"\n bottleneck stage {plan.bottleneck_stage}: "
                    f"{human_seconds(plan.bottleneck_s)} per request · balance "
                    f"{plan.balance_ratio:.2f}x ideal · boundaries "
                    f"{human_bytes(plan.boundary_bytes)} · {plan.strategy}")
    head, _, against = plan.shape_reason.partition(", against ")
    if head.startswith(f"{plan.shape}: "):  # the planner's reason: its figure, once
        controls.append(f"\n shape {head}")
        if against:
            controls.append(f" · against {against}", style="dim")
    else:
        controls.append(f"\n shape {plan.shape}: {human_rate(plan.predicted_rps)} requests/s "
                        "predicted")
        if plan.shape_reason:
            controls.append(f" · why: {plan.shape_reason}", style="dim")
    free = [i for i in range(plan.k) if i >= len(assignment) or not assignment[i]]
    if free:
        alive = sum(1 for n in state.nodes.values() if n.state != "lost")
        more = f" (K = {plan.k} > {alive} nodes)" if plan.k > alive else ""
        controls.append(
            f"\n stage{'s' if len(free) > 1 else ''} {', '.join(map(str, free))} "
            f"ha{'ve' if len(free) > 1 else 's'} no node{more}: "
            + ("the figures assume reference devices" if not any(assignment) else
               f"{'their' if len(free) > 1 else 'its'} figures assume a node like the others")
            + "; a assigns a node", style="yellow")
    return controls
