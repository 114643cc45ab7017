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

Cost: a completed request is the hot event (one per request). It rebuilds the state record, adds
to the latency window and stage stats, and updates `last_request` (one small map); a node record
is rebuilt only when its state changes (ready -> busy -> ready), not per request.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from periphery_core.cluster.events import (
    EVENT_TYPES,
    DeployFailed,
    DeployFinished,
    DeployStarted,
    Event,
    NodeDiscovered,
    NodeJoined,
    NodeLost,
    NodeStats,
    Recovered,
    RecoveryFailed,
    RecoveryStarted,
    RequestCompleted,
    RequestFailed,
    ShardProgress,
    StageReady,
    describe,
)
from periphery_core.cluster.metrics import LatencyWindow, StageStats

K = TypeVar("K")
V = TypeVar("V")

NodeState = Literal["discovered", "joining", "ready", "busy", "lost"]
StageStatus = Literal["pending", "sending", "ready", "failed"]
DeployStatus = Literal["idle", "deploying", "deployed", "failed"]

BUSY_S = 2.0
"""A node is busy while a request through its stage completed within this many seconds."""

RECENT_EVENTS = 200
"""How many event summaries `ClusterState.recent` keeps."""

# High-rate events are summarised by counters and gauges; logging each would push the facts a
# reader looks for (joins, losses, failures) out of the 200-line log within a second.
_NOT_LOGGED = (NodeStats, ShardProgress, RequestCompleted)


class FrozenMap(Mapping[K, V]):
    """A read-only mapping; `set` returns a new map and leaves this one as it was.

    Equal maps compare equal (to any `Mapping`) and hash alike, so states holding them can be
    compared and used as keys.
    """

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def set(self, key: K, value: V) -> FrozenMap[K, V]:
        """Return a new map with `key` bound to `value`.

        Args:
            key: The key.
            value: Its new value.

        Returns:
            The new map; this one is unchanged.
        """
        data = dict(self._data)
        data[key] = value
        return FrozenMap(data)


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the master knows about one node.

    Figures a node has not reported yet are None. A lost node keeps its last figures and stage.

    Attributes:
        id: Node id.
        name: Display name.
        host: Address the master reaches it at.
        port: Its port.
        device: Device kind it runs on (e.g. "cpu", "cuda").
        cores: CPU cores.
        memory_bytes: Memory available to it.
        speed: Measured speed relative to the reference machine.
        rtt_s: Round-trip time from the master, in seconds.
        bandwidth: Measured bandwidth from the master, in bytes per second.
        state: "discovered", "joining", "ready", "busy" or "lost", as of the state's clock.
        stage: Stage it is assigned, or None.
        provider: Execution provider serving its stage, once ready.
        cpu_percent: Last reported CPU use of the node process.
        rss_bytes: Last reported resident memory.
        memory_percent: Last reported share of host memory used.
        gpu_percent: Last reported GPU use, None when it has no GPU.
        last_seen: Time of the last event from or about this node.
    """

    id: str
    name: str
    host: str
    port: int
    state: NodeState
    last_seen: float
    device: str | None = None
    cores: int | None = None
    memory_bytes: int | None = None
    speed: float | None = None
    rtt_s: float | None = None
    bandwidth: float | None = None
    stage: int | None = None
    provider: str | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    memory_percent: float | None = None
    gpu_percent: float | None = None
    kv_bytes: int | None = None  # a language model's stage: KV cache held
    sequences: int | None = None  # ... for this many sequences


@dataclass(frozen=True, slots=True)
class StageDeploy:
    """Deployment progress of one stage.

    Attributes:
        stage: Stage index.
        node_id: Node the stage is assigned to.
        status: "pending", "sending", "ready" or "failed".
        sent_bytes: Shard bytes sent so far.
        total_bytes: Shard size in bytes (0 until the first progress report).
        provider: Execution provider once ready.
        error: Why it failed, once failed.
    """

    stage: int
    node_id: str
    status: StageStatus = "pending"
    sent_bytes: int = 0
    total_bytes: int = 0
    provider: str | None = None
    error: str | None = None

    @property
    def fraction(self) -> float:
        """Share of the shard sent, in [0, 1]; 1.0 once ready."""
        if self.status == "ready":
            return 1.0
        if self.total_bytes <= 0:
            return 0.0
        return min(1.0, self.sent_bytes / self.total_bytes)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The cluster as the master's events describe it; an immutable value.

    Build it with `ClusterState.empty()` and `apply`/`fold`; never construct one by hand.

    Attributes:
        nodes: Every node ever seen, by id.
        plan_stages: Stages of the plan last deployed (0 before any deploy).
        assignment: `assignment[i]` is the node id running stage `i`.
        deploy: Deployment progress per stage index.
        deploy_status: "idle", "deploying", "deployed" or "failed".
        requests_completed: Requests completed since the start.
        requests_failed: Requests failed since the start.
        latency_window: Recent end-to-end latencies.
        stage_stats: Recent per-stage timings of the current deployment.
        recent: Summaries of the latest events, oldest first, at most `RECENT_EVENTS` (node
            stats, shard progress and completed requests are counted, not logged).
        last_request: Per node id, when a request through one of its stages last completed.
        clock: Latest event time seen, None before the first event.
        recovering: A lost node's pipeline is being rebuilt (new requests wait).
        recoveries: Recoveries that completed since the start.
    """

    nodes: FrozenMap[str, NodeView] = field(default_factory=FrozenMap)
    plan_stages: int = 0
    assignment: tuple[str, ...] = ()
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

    @classmethod
    def empty(cls, window_s: float = 30.0, stage_samples: int = 256) -> ClusterState:
        """The state before any event.

        Args:
            window_s: Width of the latency and throughput window in seconds.
            stage_samples: Recent timings kept per stage.

        Returns:
            An empty state.
        """
        return cls(
            latency_window=LatencyWindow(window_s=window_s),
            stage_stats=StageStats(max_samples=stage_samples),
        )

    def latency(self, now: float) -> dict[str, float]:
        """End-to-end latency percentiles over the window at `now`.

        Args:
            now: The reader's time.

        Returns:
            ``{"p50": ..., "p90": ..., "p99": ...}`` in seconds; NaN values when empty.
        """
        return self.latency_window.percentiles(now)

    def throughput(self, now: float) -> float:
        """Completed requests per second over the window at `now`.

        Args:
            now: The reader's time.

        Returns:
            Requests per second (0.0 with no requests in the window).
        """
        return self.latency_window.throughput(now)

    def bottleneck_stage(self) -> int | None:
        """The stage with the largest median queue + compute + transfer time, or None."""
        return self.stage_stats.bottleneck()

    def node_state(self, node_id: str, now: float | None = None) -> NodeState:
        """A node's state at time `now`: "busy" turns back into "ready" `BUSY_S` after its last
        completed request, even when no event has arrived since.

        Args:
            node_id: A known node's id.
            now: The reader's time (seconds, the events' clock); None uses the state's clock.

        Returns:
            The state.

        Raises:
            KeyError: The node is unknown.
        """
        node = self.nodes[node_id]
        if node.state != "busy" or now is None:
            return node.state
        last = self.last_request.get(node_id)
        return "ready" if last is None or now - last > BUSY_S else "busy"

    def nodes_in(self, state: NodeState, now: float | None = None) -> tuple[NodeView, ...]:
        """Nodes in a given state, by id.

        Args:
            state: The state to select.
            now: Judge "busy" at this time; None uses the state's own clock.

        Returns:
            The matching nodes, sorted by id.
        """
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


def _apply_node_event(state: ClusterState, event: Event) -> FrozenMap[str, NodeView]:
    nodes = state.nodes
    match event:
        case NodeDiscovered():
            if event.node_id not in nodes:
                nodes = nodes.set(
                    event.node_id,
                    NodeView(
                        id=event.node_id,
                        name=event.name,
                        host=event.host,
                        port=event.port,
                        state="discovered",
                        last_seen=event.t,
                    ),
                )
        case NodeJoined():
            old = nodes.get(event.node_id)
            if old is None:
                old = NodeView(
                    id=event.node_id,
                    name=event.name,
                    host=event.host,
                    port=event.port,
                    state="ready",
                    last_seen=event.t,
                )
            # A repeated hello must not hide a deploy in progress or recent work.
            joined: NodeState = old.state if old.state in ("joining", "busy") else "ready"
            node = dataclasses.replace(
                old,
                name=event.name,
                host=event.host,
                port=event.port,
                device=event.device,
                cores=event.cores,
                memory_bytes=event.memory_bytes,
                speed=event.speed if event.speed is not None else old.speed,
                rtt_s=event.rtt_s,
                bandwidth=event.bandwidth,
                state=joined,
                last_seen=max(old.last_seen, event.t),
            )
            nodes = nodes.set(event.node_id, node)
        case NodeLost():
            old = nodes.get(event.node_id)
            if old is not None:
                nodes = nodes.set(event.node_id, dataclasses.replace(old, state="lost"))
        case NodeStats():
            old = nodes.get(event.node_id)
            if old is not None:
                nodes = nodes.set(
                    event.node_id,
                    dataclasses.replace(
                        old,
                        cpu_percent=event.cpu_percent,
                        rss_bytes=event.rss_bytes,
                        memory_percent=event.memory_percent,
                        gpu_percent=event.gpu_percent,
                        speed=event.speed if event.speed is not None else old.speed,
                        kv_bytes=event.kv_bytes, sequences=event.sequences,
                        last_seen=max(old.last_seen, event.t),
                    ),
                )
    return nodes


def apply(state: ClusterState, event: Event) -> ClusterState:
    """Fold one event into the cluster state.

    Pure: `state` is not changed; the result shares its unchanged parts.

    Semantics: `NodeDiscovered` adds a "discovered" node unless the id is known. `NodeJoined`
    makes a node "ready" with its figures (a lost node that joins again is ready again; a
    "joining" or "busy" node keeps that state). `NodeLost` makes it "lost", keeping figures and
    stage. `NodeStats` updates utilisation, `last_seen` and the speed if it carries one.
    `DeployStarted` resets deploy progress and stage timings, assigns stages and makes assigned
    nodes "joining" (lost nodes stay lost). `ShardProgress` records bytes sent. `StageReady`
    marks the stage ready and its node "ready". `DeployFailed` marks the stage failed and the
    deploy "failed". `DeployFinished` ends the deploy. `RequestCompleted` counts the request,
    records its latency and stage timings and makes the nodes of its stages "busy" for
    `BUSY_S`. `RequestFailed` counts a failure. `RecoveryStarted` sets `recovering`;
    `Recovered` clears it and counts the recovery; `RecoveryFailed` clears it and marks the
    deploy "failed". Events about unknown nodes change no node.

    Args:
        state: The state so far.
        event: The next event.

    Returns:
        The new state.

    Raises:
        TypeError: `event` is not a cluster event.
    """
    if not isinstance(event, EVENT_TYPES):
        raise TypeError(f"not a cluster event: {event!r}")
    clock = event.t if state.clock is None else max(state.clock, event.t)
    nodes = state.nodes
    last_request = state.last_request
    changes: dict[str, object] = {}

    match event:
        case NodeDiscovered() | NodeJoined() | NodeLost() | NodeStats():
            nodes = _apply_node_event(state, event)

        case DeployStarted():
            assigned = {node_id: i for i, node_id in reversed(list(enumerate(event.assignment)))}
            node: NodeView | None
            for node in state.nodes.values():
                stage = assigned.get(node.id)
                if node.id in assigned:
                    new_state: NodeState = "lost" if node.state == "lost" else "joining"
                elif node.state in ("joining", "busy"):
                    new_state = "ready"
                else:
                    new_state = node.state
                updated = dataclasses.replace(node, stage=stage, state=new_state, provider=None)
                if updated != node:
                    nodes = nodes.set(node.id, updated)
            changes.update(
                plan_stages=event.plan_stages,
                assignment=event.assignment,
                deploy=FrozenMap(
                    (i, StageDeploy(stage=i, node_id=node_id))
                    for i, node_id in enumerate(event.assignment)
                ),
                deploy_status="deploying",
                stage_stats=StageStats(max_samples=state.stage_stats.max_samples),
            )

        case ShardProgress():
            old_stage = state.deploy.get(event.stage)
            base = old_stage or StageDeploy(stage=event.stage, node_id=event.node_id)
            status: StageStatus = "sending" if base.status == "pending" else base.status
            changes["deploy"] = state.deploy.set(
                event.stage,
                dataclasses.replace(
                    base,
                    status=status,
                    sent_bytes=event.sent_bytes,
                    total_bytes=event.total_bytes,
                ),
            )

        case StageReady():
            base = state.deploy.get(event.stage) or StageDeploy(
                stage=event.stage, node_id=event.node_id
            )
            changes["deploy"] = state.deploy.set(
                event.stage,
                dataclasses.replace(
                    base,
                    node_id=event.node_id,
                    status="ready",
                    sent_bytes=max(base.sent_bytes, base.total_bytes),
                    provider=event.provider,
                    error=None,
                ),
            )
            node = nodes.get(event.node_id)
            if node is not None:
                ready: NodeState = "lost" if node.state == "lost" else "ready"
                nodes = nodes.set(
                    node.id,
                    dataclasses.replace(
                        node,
                        state=ready,
                        stage=event.stage,
                        provider=event.provider,
                        last_seen=max(node.last_seen, event.t),
                    ),
                )

        case DeployFailed():
            base = state.deploy.get(event.stage) or StageDeploy(
                stage=event.stage, node_id=event.node_id
            )
            changes["deploy"] = state.deploy.set(
                event.stage, dataclasses.replace(base, status="failed", error=event.reason)
            )
            changes["deploy_status"] = "failed"
            node = nodes.get(event.node_id)
            if node is not None and node.state == "joining":
                nodes = nodes.set(node.id, dataclasses.replace(node, state="ready"))

        case DeployFinished():
            failed = state.deploy_status == "failed" or any(
                s.status == "failed" for s in state.deploy.values()
            )
            changes["deploy_status"] = "failed" if failed else "deployed"

        case RequestCompleted():
            changes.update(
                requests_completed=state.requests_completed + 1,
                latency_window=state.latency_window.add(event.t, event.latency_s),
                stage_stats=state.stage_stats.add(event.stages),
            )
            latest = dict(last_request)
            for timing in event.stages:
                if not 0 <= timing.stage < len(state.assignment):
                    continue
                node = nodes.get(state.assignment[timing.stage])
                if node is None or node.state == "lost":
                    continue
                latest[node.id] = max(latest.get(node.id, event.t), event.t)
                if node.state != "busy":
                    nodes = nodes.set(node.id, dataclasses.replace(node, state="busy"))
            last_request = FrozenMap(latest)
            changes["last_request"] = last_request

        case RequestFailed():
            changes["requests_failed"] = state.requests_failed + 1

        case RecoveryStarted():
            changes["recovering"] = True

        case Recovered():
            changes.update(recovering=False, recoveries=state.recoveries + 1)

        case RecoveryFailed():
            changes.update(recovering=False, deploy_status="failed")

    nodes = _settle_busy(nodes, last_request, clock)
    if nodes is not state.nodes:
        changes["nodes"] = nodes
    if not isinstance(event, _NOT_LOGGED):
        def name(node_id: str) -> str:
            node = nodes.get(node_id)
            return node.name if node is not None and node.name else node_id

        line = _one_line(f"{_stamp(event.t)} {describe(event, name)}")
        changes["recent"] = (*state.recent[-(RECENT_EVENTS - 1) :], line)
    return dataclasses.replace(state, clock=clock, **changes)  # type: ignore[arg-type]


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
