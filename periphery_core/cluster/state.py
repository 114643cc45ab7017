"""The cluster view as a fold of events: `apply(state, event) -> ClusterState` is pure.

Design choice: `ClusterState` is an immutable value. `apply` never mutates its input; it builds
a new state that shares every unchanged part with the old one (copy-on-write). Node and deploy
tables are `FrozenMap`s (a read-only mapping whose "updates" return a new map); the latency
window and stage stats are the immutable values of `periphery_core.cluster.metrics`; the recent
events log is a tuple capped at `RECENT_EVENTS`. So a UI may keep any earlier state, compare two
states, or hand one to another thread without locks, and tests fold plain event lists.

Time comes only from events. The fold keeps `clock`, the latest event time it has seen; a node
is "busy" while a request through its stage completed within `BUSY_S` of that clock. Readers
that want the view at their own wall-clock time pass `now` (`ClusterState.node_state(id, now)`,
`ClusterState.latency(now)`, `ClusterState.throughput(now)`).

Shape: one small function per event type (`_on_*`), in one table, `_RULES`, keyed by type. A
rule may also carry an order check that says why an event cannot follow the state so far; such
an event is ignored, with that reason in the log, and the fold stays total (see `apply`). The
parts common to every event (the clock, busy nodes settling back to ready, the log) are
`apply`'s own. The records a state is made of are in `periphery_core.cluster.views`.

Cost: a completed request is the hot event (one per request). It rebuilds the state record
(twice: its own function's change, then the clock), adds to the latency window and stage
stats, and updates `last_request` (one small map); a node record is rebuilt only when its state
changes (ready -> busy -> ready), not per request.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from periphery_core.cluster.events import (
    DeployFailed,
    DeployFinished,
    DeployStarted,
    Event,
    NodeDiscovered,
    NodeExited,
    NodeJoined,
    NodeLost,
    NodeStats,
    Rebalanced,
    Recovered,
    RecoveryFailed,
    RecoveryStarted,
    RequestCompleted,
    RequestFailed,
    ShardProgress,
    SpreadBack,
    StageReady,
    describe,
)
from periphery_core.cluster.metrics import LatencyWindow, StageStats
from periphery_core.cluster.views import FrozenMap, NodeState, NodeView, StageDeploy

DeployStatus = Literal["idle", "deploying", "deployed", "failed"]

BUSY_S = 2.0
"""A node is busy while a request through its stage completed within this many seconds."""

RECENT_EVENTS = 200
"""How many event summaries `ClusterState.recent` keeps."""

# High-rate events are summarised by counters and gauges; logging each would push the facts a
# reader looks for (joins, losses, failures) out of the 200-line log within a second.
_NOT_LOGGED = (NodeStats, ShardProgress, RequestCompleted)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The cluster as the master's events describe it; an immutable value. Build it with
    `ClusterState.empty()` and `apply`/`fold`; never construct one by hand.

    Attributes:
        nodes: Every node ever seen, by id.
        plan_stages: Stages of the plan last deployed (0 before any deploy).
        replicas: Replicas of that pipeline serving side by side.
        assignment: `assignment[j]` is the node id running slot `j` (stage `j % plan_stages`
            of replica `j // plan_stages`; events and timings name stages by slot).
        deploy: Deployment progress per slot.
        deploy_status: "idle", "deploying", "deployed" or "failed".
        requests_completed: Requests completed since the start.
        requests_failed: Requests failed since the start.
        latency_window: Recent end-to-end latencies.
        stage_stats: Recent per-stage timings of the current deployment.
        recent: Summaries of the latest events, oldest first, at most `RECENT_EVENTS` (not
            the high-rate `_NOT_LOGGED`; one ignored as out of order is logged with why).
        last_request: Per node id, when a request through one of its stages last completed.
        clock: Latest event time seen, None before the first event.
        recovering: A lost node's pipeline is being rebuilt (new requests wait).
        recoveries: Recoveries that completed since the start.
        rebalances: Moves of the cuts on measured compute since the start.
    """

    nodes: FrozenMap[str, NodeView] = field(default_factory=FrozenMap)
    plan_stages: int = 0
    replicas: int = 1
    assignment: tuple[str, ...] = ()
    links: tuple[str, ...] = ()  # per slot: how its outputs travel ("ipc" or "tcp")
    deploy: FrozenMap[int, StageDeploy] = field(default_factory=FrozenMap)
    deploy_status: DeployStatus = "idle"
    requests_completed: int = 0
    requests_failed: int = 0
    latency_window: LatencyWindow = field(default_factory=LatencyWindow)
    stage_stats: StageStats = field(default_factory=StageStats)
    recent: tuple[str, ...] = ()
    last_request: FrozenMap[str, float] = field(default_factory=FrozenMap)
    clock: float | None = None
    recovering: bool = False
    recoveries: int = 0
    rebalances: int = 0

    @classmethod
    def empty(cls, window_s: float = 30.0, stage_samples: int = 256) -> ClusterState:
        """The state before any event.

        Args:
            window_s: Width of the latency and throughput window in seconds (`math.inf`: the
                whole run, as a run's final summary wants).
            stage_samples: Recent timings kept per stage.

        Returns:
            An empty state.
        """
        return cls(
            latency_window=LatencyWindow(window_s=window_s),
            stage_stats=StageStats(max_samples=stage_samples),
        )

    def latency(self, now: float) -> dict[str, float]:
        """End-to-end latency percentiles over the window at the reader's time `now`:
        ``{"p50": ..., "p90": ..., "p99": ...}`` in seconds; NaN values when empty."""
        return self.latency_window.percentiles(now)

    def throughput(self, now: float) -> float:
        """Completed requests per second over the window at the reader's time `now` (0.0
        with no requests in the window)."""
        return self.latency_window.throughput(now)

    def slot_label(self, slot: int) -> str:
        """How a slot reads: `S1`, or with replicas `R0·S1` (replica 0's stage 1)."""
        if self.replicas == 1 or self.plan_stages < 1:
            return f"S{slot}"
        return f"R{slot // self.plan_stages}·S{slot % self.plan_stages}"

    def bottleneck_stage(self) -> int | None:
        """The stage with the largest median queue + compute + transfer time, or None."""
        return self.stage_stats.bottleneck()

    def node_state(self, node_id: str, now: float | None = None) -> NodeState:
        """A known node's state at the reader's time `now` (the events' clock; None: the
        state's own): "busy" turns back into "ready" `BUSY_S` after its last completed request,
        even when no event has arrived since. KeyError for an unknown node."""
        node = self.nodes[node_id]
        if node.state != "busy" or now is None:
            return node.state
        last = self.last_request.get(node_id)
        return "ready" if last is None or now - last > BUSY_S else "busy"

    def nodes_in(self, state: NodeState, now: float | None = None) -> tuple[NodeView, ...]:
        """The nodes in `state`, sorted by id, "busy" judged at `now` (None: the state's
        clock)."""
        return tuple(
            node for _, node in sorted(self.nodes.items()) if self.node_state(node.id, now) == state
        )


def _stamp(t: float) -> str:
    """UTC time of day for the log: fixed, so folds are reproducible whatever the host's zone."""
    try:
        return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{t:.3f}"


def _one_line(text: str) -> str:
    """Escape control characters (a node may name itself "a\\nb") so one event is one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _settle_busy(
    nodes: FrozenMap[str, NodeView], last_request: Mapping[str, float], clock: float
) -> FrozenMap[str, NodeView]:
    """Turn busy nodes whose last request is older than `BUSY_S` back into ready ones."""
    for node in list(nodes.values()):
        if node.state == "busy" and clock - last_request.get(node.id, -math.inf) > BUSY_S:
            nodes = nodes.set(node.id, dataclasses.replace(node, state="ready"))
    return nodes


# --- one function per event ---------------------------------------------------------------------
# Each takes the state so far and an event of its type and returns the new state. The clock, the
# settling of busy nodes and the event log are `apply`'s, the same for every event.


def _on_discovered(state: ClusterState, event: NodeDiscovered) -> ClusterState:
    if event.node_id in state.nodes:  # a known node keeps its state: advertising is no news
        return state
    node = NodeView(id=event.node_id, name=event.name, host=event.host, port=event.port,
                    state="discovered", last_seen=event.t)
    return dataclasses.replace(state, nodes=state.nodes.set(node.id, node))


def _on_joined(state: ClusterState, event: NodeJoined) -> ClusterState:
    old = state.nodes.get(event.node_id) or NodeView(
        id=event.node_id, name=event.name, host=event.host, port=event.port, state="ready",
        last_seen=event.t)
    # A repeated hello must not hide a deploy in progress or recent work.
    joined: NodeState = old.state if old.state in ("joining", "busy") else "ready"
    node = dataclasses.replace(
        old, name=event.name, host=event.host, port=event.port, device=event.device,
        cores=event.cores, memory_bytes=event.memory_bytes,
        speed=event.speed if event.speed is not None else old.speed, rtt_s=event.rtt_s,
        bandwidth=event.bandwidth, workers=event.workers, state=joined,
        last_seen=max(old.last_seen, event.t))
    return _without_replaced(dataclasses.replace(state, nodes=state.nodes.set(node.id, node)))


def _without_replaced(state: ClusterState) -> ClusterState:
    """Drop each lost node outside the deploy whose address a joined node holds: its process
    was started again there (the log keeps its loss and the new one's join)."""
    live = {(n.host, n.port) for n in state.nodes.values() if n.state not in ("lost",
                                                                              "discovered")}
    gone = [n.id for n in state.nodes.values() if n.state == "lost"
            and (n.host, n.port) in live and n.id not in state.assignment]
    return dataclasses.replace(state, nodes=state.nodes.drop(gone)) if gone else state


def _on_lost(state: ClusterState, event: NodeLost) -> ClusterState:
    old = state.nodes.get(event.node_id)
    if old is None:
        return state
    return dataclasses.replace(
        state, nodes=state.nodes.set(old.id, dataclasses.replace(old, state="lost")))


def _on_stats(state: ClusterState, event: NodeStats) -> ClusterState:
    old = state.nodes.get(event.node_id)
    if old is None:
        return state
    node = dataclasses.replace(
        old, cpu_percent=event.cpu_percent, rss_bytes=event.rss_bytes,
        memory_percent=event.memory_percent, gpu_percent=event.gpu_percent,
        gpu_memory_bytes=event.gpu_memory_bytes,
        speed=event.speed if event.speed is not None else old.speed, kv_bytes=event.kv_bytes,
        sequences=event.sequences, last_seen=max(old.last_seen, event.t))
    return dataclasses.replace(state, nodes=state.nodes.set(old.id, node))


def _on_deploy_started(state: ClusterState, event: DeployStarted) -> ClusterState:
    assigned = {node_id: i for i, node_id in reversed(list(enumerate(event.assignment)))}
    nodes = state.nodes
    for node in state.nodes.values():
        new_state: NodeState
        if node.id in assigned:
            new_state = "lost" if node.state == "lost" else "joining"
        else:  # a node left out of the new plan is idle, whatever it did for the old one
            new_state = "ready" if node.state in ("joining", "busy") else node.state
        updated = dataclasses.replace(node, stage=assigned.get(node.id), state=new_state,
                                      provider=None)
        if updated != node:
            nodes = nodes.set(node.id, updated)
    return _without_replaced(dataclasses.replace(
        state, nodes=nodes, plan_stages=event.plan_stages, replicas=event.replicas,
        assignment=event.assignment,
        deploy=FrozenMap((i, StageDeploy(stage=i, node_id=node_id))
                         for i, node_id in enumerate(event.assignment)),
        deploy_status="deploying",
        stage_stats=StageStats(max_samples=state.stage_stats.max_samples)))


def _on_shard_progress(state: ClusterState, event: ShardProgress) -> ClusterState:
    old = state.deploy[event.stage]
    stage = dataclasses.replace(
        old, status="sending" if old.status == "pending" else old.status,
        sent_bytes=event.sent_bytes, total_bytes=event.total_bytes)
    return dataclasses.replace(state, deploy=state.deploy.set(event.stage, stage))


def _on_stage_ready(state: ClusterState, event: StageReady) -> ClusterState:
    old = state.deploy[event.stage]
    stage = dataclasses.replace(old, status="ready", provider=event.provider, error=None,
                                sent_bytes=max(old.sent_bytes, old.total_bytes))
    nodes = state.nodes
    node = nodes.get(event.node_id)
    if node is not None:
        nodes = nodes.set(node.id, dataclasses.replace(
            node, state="lost" if node.state == "lost" else "ready", stage=event.stage,
            provider=event.provider, last_seen=max(node.last_seen, event.t)))
    return dataclasses.replace(state, nodes=nodes,
                               deploy=state.deploy.set(event.stage, stage))


def _on_deploy_failed(state: ClusterState, event: DeployFailed) -> ClusterState:
    stage = dataclasses.replace(state.deploy[event.stage], status="failed", error=event.reason)
    nodes = state.nodes
    node = nodes.get(event.node_id)
    if node is not None and node.state == "joining":  # alive, just not serving
        nodes = nodes.set(node.id, dataclasses.replace(node, state="ready"))
    return dataclasses.replace(state, nodes=nodes, deploy_status="failed",
                               deploy=state.deploy.set(event.stage, stage))


def _on_deploy_finished(state: ClusterState, event: DeployFinished) -> ClusterState:
    failed = state.deploy_status == "failed" or any(
        s.status == "failed" for s in state.deploy.values())
    return dataclasses.replace(state, deploy_status="failed" if failed else "deployed",
                               links=event.links)


def _on_request_completed(state: ClusterState, event: RequestCompleted) -> ClusterState:
    nodes = state.nodes
    latest = dict(state.last_request)
    for timing in event.stages:  # the nodes of the stages it passed are busy for a while
        if not 0 <= timing.stage < len(state.assignment):
            continue
        node = nodes.get(state.assignment[timing.stage])
        if node is None or node.state == "lost":
            continue
        latest[node.id] = max(latest.get(node.id, event.t), event.t)
        if node.state != "busy":
            nodes = nodes.set(node.id, dataclasses.replace(node, state="busy"))
    return dataclasses.replace(
        state, nodes=nodes, requests_completed=state.requests_completed + 1,
        latency_window=state.latency_window.add(event.t, event.latency_s),
        stage_stats=state.stage_stats.add(event.stages), last_request=FrozenMap(latest))


def _on_request_failed(state: ClusterState, event: RequestFailed) -> ClusterState:
    return dataclasses.replace(state, requests_failed=state.requests_failed + 1)


def _on_recovery_started(state: ClusterState, event: RecoveryStarted) -> ClusterState:
    return dataclasses.replace(state, recovering=True)


def _on_recovered(state: ClusterState, event: Recovered) -> ClusterState:
    return dataclasses.replace(state, recovering=False, recoveries=state.recoveries + 1)


def _on_rebalanced(state: ClusterState, event: Rebalanced) -> ClusterState:
    return dataclasses.replace(state, rebalances=state.rebalances + 1)


def _on_recovery_failed(state: ClusterState, event: RecoveryFailed) -> ClusterState:
    return dataclasses.replace(state, recovering=False, deploy_status="failed")


# --- the order check ----------------------------------------------------------------------------
# Each says why an event cannot follow the state so far, or returns None when it can.


def _stages_match_assignment(state: ClusterState, event: DeployStarted) -> str | None:
    if event.plan_stages * event.replicas != len(event.assignment):
        shape = "" if event.replicas == 1 else f" x {event.replicas} replicas"
        return f"{event.plan_stages} stages{shape} but {len(event.assignment)} nodes assigned"
    return None


def _a_deploy_started(state: ClusterState, event: Event) -> str | None:
    return "no deploy has started" if state.deploy_status == "idle" else None


def _a_stage_of_the_deploy(
    state: ClusterState, event: ShardProgress | StageReady | DeployFailed
) -> str | None:
    if state.deploy_status == "idle":
        return "no deploy has started"
    stage = state.deploy.get(event.stage)
    if stage is None:
        return f"stage {event.stage} is not one of the {len(state.deploy)} being deployed"
    if stage.node_id != event.node_id:
        return f"stage {event.stage} was assigned to {stage.node_id}, not {event.node_id}"
    return None


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one event type is folded: `check` says why it is out of order (None: never), `on`
    folds it in."""

    on: Callable[[ClusterState, Any], ClusterState]
    check: Callable[[ClusterState, Any], str | None] | None = None


_RULES: dict[type, _Rule] = {
    NodeDiscovered: _Rule(_on_discovered),
    NodeJoined: _Rule(_on_joined),
    NodeLost: _Rule(_on_lost),
    NodeStats: _Rule(_on_stats),
    DeployStarted: _Rule(_on_deploy_started, _stages_match_assignment),
    ShardProgress: _Rule(_on_shard_progress, _a_stage_of_the_deploy),
    StageReady: _Rule(_on_stage_ready, _a_stage_of_the_deploy),
    DeployFailed: _Rule(_on_deploy_failed, _a_stage_of_the_deploy),
    DeployFinished: _Rule(_on_deploy_finished, _a_deploy_started),
    RequestCompleted: _Rule(_on_request_completed),
    RequestFailed: _Rule(_on_request_failed),
    RecoveryStarted: _Rule(_on_recovery_started),
    Recovered: _Rule(_on_recovered),
    SpreadBack: _Rule(lambda state, event: state),  # its deploy's events move the stages
    NodeExited: _Rule(lambda state, event: state),  # (what joins in its place is a NodeJoined)
    Rebalanced: _Rule(_on_rebalanced),
    RecoveryFailed: _Rule(_on_recovery_failed),
}


def apply(state: ClusterState, event: Event) -> ClusterState:
    """Fold one event into the cluster state.

    Pure: `state` is not changed; the result shares its unchanged parts.

    Semantics: `NodeDiscovered` adds a "discovered" node unless the id is known. `NodeJoined` makes
    a node "ready" with its figures (a lost node that joins again is ready again; a "joining" or
    "busy" node keeps that state). `NodeLost` makes it "lost", keeping figures and stage.
    `NodeStats` updates utilisation, `last_seen` and the speed if it carries one. `DeployStarted`
    resets deploy progress and stage timings, assigns stages and makes assigned nodes "joining"
    (lost nodes stay lost). After either of those two, a lost node outside the deploy whose address
    a joined node holds (its process started again there) is dropped. `ShardProgress` records bytes
    sent. `StageReady` marks the stage ready and its node "ready". `DeployFailed` marks the stage
    failed and the deploy "failed". `DeployFinished` ends the deploy and records its links.
    `RequestCompleted` counts the request, records its latency and stage timings and makes the nodes
    of its stages "busy" for `BUSY_S`. `RequestFailed` counts a failure. `RecoveryStarted` sets
    `recovering`; `Recovered` clears it and counts the recovery; `SpreadBack`, `NodeExited` are only
    logged; `Rebalanced` counts a move of the cuts; `RecoveryFailed` clears it and marks the deploy
    "failed". Unknown nodes change no node.

    Order: the fold is total, so a live view never crashes on an odd event; an event that
    cannot follow the state so far changes nothing but the log, where it is "ignored" with the
    reason (a run of identical reasons is logged once, so a stale upload cannot flood the log).
    Out of order are: a `DeployStarted` whose stage count is not its assignment's length; a
    `ShardProgress`, `StageReady` or `DeployFailed` before any deploy, for a stage the deploy
    does not have, or from a node other than the one the stage was assigned to (a stale report
    from an earlier deploy); and a `DeployFinished` before any deploy. Request and recovery
    events are facts of their own and always count, so a view that starts watching a running
    cluster counts requests from then on.

    Args:
        state: The state so far.
        event: The next event.

    Returns:
        The new state. Raises TypeError when `event` is not a cluster event (a caller's bug).
    """
    rule = _RULES.get(type(event))
    if rule is None:
        raise TypeError(f"not a cluster event: {event!r}")
    problem = rule.check(state, event) if rule.check is not None else None
    if problem is not None:
        return _ignored(state, event, problem)
    clock = event.t if state.clock is None else max(state.clock, event.t)
    new = rule.on(state, event)
    nodes = _settle_busy(new.nodes, new.last_request, clock)
    recent = new.recent
    if not isinstance(event, _NOT_LOGGED):
        def name(node_id: str) -> str:
            node = nodes.get(node_id)
            return node.name if node is not None and node.name else node_id

        recent = _logged(recent, _one_line(f"{_stamp(event.t)} {describe(event, name)}"))
    return dataclasses.replace(new, clock=clock, nodes=nodes, recent=recent)


def _logged(recent: tuple[str, ...], line: str) -> tuple[str, ...]:
    return (*recent[-(RECENT_EVENTS - 1) :], line)


def _ignored(state: ClusterState, event: Event, problem: str) -> ClusterState:
    """The state with only a log line added saying why `event` was ignored."""
    what = _one_line(f"ignored {type(event).__name__}: {problem}")
    if state.recent and state.recent[-1].partition(" ")[2] == what:
        return state
    return dataclasses.replace(state, recent=_logged(state.recent, f"{_stamp(event.t)} {what}"))


def fold(events: Iterable[Event], initial: ClusterState | None = None) -> ClusterState:
    """Fold a sequence of events into a state.

    Args:
        events: Events in the order they happened.
        initial: State to start from; `ClusterState.empty()` when None.

    Returns:
        The state after every event.
    """
    state = ClusterState.empty() if initial is None else initial
    for event in events:
        state = apply(state, event)
    return state
