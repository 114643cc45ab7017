"""How live what the app shows is.

Everything the app shows of the cluster is folded from the master's events. When they stop (a
node stops reporting, or the master itself stops), the last figures stay in the state and
would read as live: every screen that shows them marks them instead, in the same words.
"""

from __future__ import annotations

from rich.markup import escape

from periphery_core.cluster.state import ClusterState
from periphery_core.cluster.views import NodeView

# A live node reports every second: silent longer than this, what its row shows may be old.
STALE_S = 5.0
STATE_STYLE = {"ready": "green", "busy": "bold cyan", "joining": "yellow", "lost": "bold red",
               "discovered": "dim"}


def node_status(state: ClusterState, node: NodeView, now: float) -> str:
    """The node's state as Rich markup: its own style while it reports, `ready? silent 12 s`
    once its reports stopped (a lost node is simply lost)."""
    status = state.node_state(node.id, now)
    silent = now - node.last_seen
    if status == "lost" or silent <= STALE_S:
        return f"[{STATE_STYLE.get(status, '')}]{status}[/]"
    return f"[yellow]{status}? silent {silent:.0f} s[/]"


def master_stopped(failure: str) -> str:
    """The line that replaces a screen's live summary once the master stopped working."""
    return (f" [b red]master not responding[/]: {escape(failure)}; what is shown may be old: "
            "restart the app")
