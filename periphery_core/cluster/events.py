"""Typed cluster events: the past-tense facts the master emits and every view folds.

Design choice: an event is a small frozen, slotted dataclass that records *what happened and
when* (`t`, wall-clock seconds from the master's clock) and nothing else. Views never ask the
master for its state; they fold these facts with `periphery_core.cluster.state.apply`, so the
TUI, the CLI's `--json` output and a replayed JSON log all see the same cluster.

`event_to_dict` / `event_from_dict` are the edge where events leave and enter the process (JSON
logs, `--json` output). Inside the process events are trusted typed data; `event_from_dict`
validates every field against the dataclass's annotations and raises `ValueError` for anything
that does not fit, so a corrupt log line is a data error, never a half-built event.

Nothing here holds state: the bus that carries events to their subscribers is
`periphery_core.cluster.bus`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, Union, get_args, get_origin, get_type_hints

from periphery_core.partition.plan import shape_text
from periphery_core.units import human_bytes


@dataclass(frozen=True, slots=True)
class StageTiming:
    """Where one request spent its time in one stage, in seconds.

    Attributes:
        stage: Stage index in the plan.
        queue_s: Time the activation waited in the node's queue.
        compute_s: Time the node's session ran the shard.
        transfer_s: Time to move the activation to this stage over the network.
    """

    stage: int
    queue_s: float
    compute_s: float
    transfer_s: float

    @property
    def total_s(self) -> float:
        """Queue, compute and transfer time together."""
        return self.queue_s + self.compute_s + self.transfer_s


@dataclass(frozen=True, slots=True)
class NodeDiscovered:
    """A node was seen (mDNS or a static peer) but not yet talked to."""

    node_id: str
    name: str
    host: str
    port: int
    source: str
    t: float


@dataclass(frozen=True, slots=True)
class NodeJoined:
    """A node answered hello; `speed` is its measured speed relative to the reference (None:
    not measured yet; a later `NodeStats` carries it)."""

    node_id: str
    name: str
    host: str
    port: int
    device: str
    cores: int
    memory_bytes: int
    speed: float | None
    rtt_s: float | None
    bandwidth: float | None
    t: float
    workers: int = 1  # requests it computes at once (periphery-node --workers)


@dataclass(frozen=True, slots=True)
class NodeLost:
    """A node stopped answering or its connection dropped."""

    node_id: str
    reason: str
    t: float


@dataclass(frozen=True, slots=True)
class NodeStats:
    """A node reported its utilisation, and its speed once measured (None: no news)."""

    node_id: str
    cpu_percent: float
    rss_bytes: int
    memory_percent: float
    gpu_percent: float | None
    t: float
    speed: float | None = None
    kv_bytes: int | None = None  # a language model's stage: KV cache held, and for how many
    sequences: int | None = None
    gpu_memory_bytes: int | None = None  # held on its GPU (a node running on one)


@dataclass(frozen=True, slots=True)
class DeployStarted:
    """A plan's deployment began: `plan_stages` stages times `replicas`; `assignment[j]` is
    the node id that runs slot `j`, stage `j % plan_stages` of replica `j // plan_stages` (the
    `stage` of later deploy events and of stage timings is this slot)."""

    plan_stages: int
    assignment: tuple[str, ...]
    t: float
    replicas: int = 1


@dataclass(frozen=True, slots=True)
class ShardProgress:
    """Part of a stage's shard was sent to its node."""

    node_id: str
    stage: int
    sent_bytes: int
    total_bytes: int
    t: float


@dataclass(frozen=True, slots=True)
class StageReady:
    """A node loaded its shard and serves its stage with the named execution provider."""

    node_id: str
    stage: int
    provider: str
    t: float


@dataclass(frozen=True, slots=True)
class DeployFailed:
    """A node could not receive or load its stage's shard."""

    node_id: str
    stage: int
    reason: str
    t: float


@dataclass(frozen=True, slots=True)
class DeployFinished:
    """The deployment that began with the last `DeployStarted` ended. `links[j]` is how slot
    `j` sends its outputs on: "ipc", a private Unix socket to a process on its own host, or
    "tcp" (CurveZMQ with keys); see `cluster/same_host.py`."""

    t: float
    links: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestCompleted:
    """A request left the last stage; `stages` are its per-stage timings."""

    request_id: str
    latency_s: float
    stages: tuple[StageTiming, ...]
    t: float


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """A request failed; `stage` is where, or None when it cannot be attributed to one."""

    request_id: str
    stage: int | None
    reason: str
    t: float


@dataclass(frozen=True, slots=True)
class RecoveryStarted:
    """Nodes of the running pipeline were lost: new requests wait while it is re-planned."""

    lost: tuple[str, ...]  # node ids
    inflight: int  # requests waiting for a result, to be replayed
    t: float


@dataclass(frozen=True, slots=True)
class Recovered:
    """The pipeline serves again on the nodes still alive, and in-flight requests were replayed.

    `detected_s` runs from the lost node's last sign of life to its loss being declared (None
    when unknown), `recovered_s` from that declaration to the new pipeline serving.
    """

    lost: tuple[str, ...]
    assignment: tuple[str, ...]
    detected_s: float | None
    recovered_s: float
    replayed: int
    t: float


@dataclass(frozen=True, slots=True)
class SpreadBack:
    """A node joined while a recovery had left the pipeline on fewer nodes than its deploy
    asked for (a lost node back, or its process restarted), and the pipeline spread back over
    them, losing no request. `joined` names the nodes it now runs on that it did not."""

    joined: tuple[str, ...]
    assignment: tuple[str, ...]
    replayed: int
    t: float


@dataclass(frozen=True, slots=True)
class Rebalanced:
    """The pipeline moved its cuts toward balance on measured stage compute (cluster.rebalance),
    losing no request.

    `measured_s` is each stage's median compute per request before the move; `before` and
    `after` are the nodes per stage; `predicted_s` is the slowest stage's compute the new cuts
    should give.
    """

    measured_s: tuple[float, ...]
    before: tuple[int, ...]
    after: tuple[int, ...]
    predicted_s: float
    replayed: int
    t: float


@dataclass(frozen=True, slots=True)
class NodeExited:
    """A node process this host started (a local cluster's) ended. Started again, it listens
    at `restarted_at` (HOST:PORT) as node `new_id`; else that is empty and `left_down` says why
    (empty: no restart was asked for). `running`: the local nodes running after it."""

    name: str
    how: str  # "signal 9", "exit code 1"
    restarted_at: str
    new_id: str
    left_down: str
    running: int
    t: float


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """The pipeline could not be rebuilt (no node left, or every deploy failed)."""

    reason: str
    t: float


Event: TypeAlias = (
    NodeDiscovered
    | NodeJoined
    | NodeLost
    | NodeStats
    | DeployStarted
    | ShardProgress
    | StageReady
    | DeployFailed
    | DeployFinished
    | RequestCompleted
    | RequestFailed
    | RecoveryStarted
    | Recovered
    | SpreadBack
    | Rebalanced
    | NodeExited
    | RecoveryFailed
)

EVENT_TYPES: tuple[type[Event], ...] = (
    NodeDiscovered,
    NodeJoined,
    NodeLost,
    NodeStats,
    DeployStarted,
    ShardProgress,
    StageReady,
    DeployFailed,
    DeployFinished,
    RequestCompleted,
    RequestFailed,
    RecoveryStarted,
    Recovered,
    SpreadBack,
    Rebalanced,
    NodeExited,
    RecoveryFailed,
)
"""Every event class, in a stable order."""

_BY_NAME: dict[str, type[Event]] = {cls.__name__: cls for cls in EVENT_TYPES}


# --- dict form ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Turn a field value into JSON-ready data (tuples become lists, timings become dicts)."""
    if isinstance(value, StageTiming):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def event_to_dict(event: Event) -> dict[str, Any]:
    """Convert an event to a JSON-ready dict tagged with its class name.

    Args:
        event: Any cluster event.

    Returns:
        A new dict: `{"type": "<ClassName>", <field>: <value>, ...}` where tuples are lists and
        `StageTiming`s are dicts. `event_from_dict` reverses it exactly.
    """
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in dataclasses.fields(event):
        out[f.name] = _plain(getattr(event, f.name))
    return out


def _type_name(value: Any) -> str:
    return type(value).__name__


def _decode(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the annotation `hint` and convert it; raise ValueError if unfit."""
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {_type_name(value)}")
        (item_hint, _ellipsis) = get_args(hint)
        return tuple(_decode(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is StageTiming:
        return _decode_fields(StageTiming, value, where)
    if hint is float:
        # JSON writes 2.0 as 2 in some encoders; bool is an int subclass but never a number here.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {_type_name(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {_type_name(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {_type_name(value)}")
        return value
    raise TypeError(f"{where}: no decoder for annotation {hint!r}")  # a bug here, not bad data


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _decode_fields(cls: type, data: Any, where: str, skip: frozenset[str] = frozenset()) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {_type_name(data)}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    # A field with a default (added in a later version) may be absent from older records.
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
    missing = [n for n in names if n not in data and n not in optional]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(str(k) for k in data if k not in names and k not in skip)
    if extra:
        raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}")
    hints = _hints(cls)
    kwargs = {n: _decode(data[n], hints[n], f"{where}.{n}") for n in names if n in data}
    return cls(**kwargs)


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Build an event from the dict form written by `event_to_dict`.

    Args:
        data: A mapping with a `"type"` tag naming an event class and exactly that class's
            fields. Integers are accepted where a float is expected.

    Returns:
        The event.

    Raises:
        ValueError: `data` is not a mapping, the type is unknown, a field is missing or unknown,
            or a value has the wrong type.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"event: expected an object, got {_type_name(data)}")
    tag = data.get("type")
    if not isinstance(tag, str) or tag not in _BY_NAME:
        raise ValueError(f"event: unknown type {tag!r}")
    event: Event = _decode_fields(_BY_NAME[tag], data, tag, skip=frozenset({"type"}))
    return event


# --- one-line summaries -------------------------------------------------------------------------


def describe(event: Event, name: Callable[[str], str] = str) -> str:
    """Say what an event means in one short line for an event log (no time stamp).

    Args:
        event: Any cluster event.
        name: Turns a node id into what the log shows (its name, where known).

    Returns:
        A human-readable summary such as ``"node gpu-1 joined (cuda, 16 cores, 1.80x)"``.
    """
    match event:
        case NodeDiscovered():
            return f"node {event.name} discovered at {event.host}:{event.port} ({event.source})"
        case NodeJoined():
            return (
                f"node {event.name} joined ({event.device}, {event.cores} cores, "
                f"{human_bytes(event.memory_bytes)}, "
                f"{'speed unknown' if event.speed is None else f'{event.speed:.2f}x'}"
                f"{f', {event.workers} at once' if event.workers > 1 else ''})"
            )
        case NodeLost():
            return f"node {name(event.node_id)} lost: {event.reason}"
        case NodeStats():
            return f"node {name(event.node_id)} cpu {event.cpu_percent:.0f}%"
        case DeployStarted():
            return (f"deploy started: {shape_text(event.plan_stages, event.replicas)} on "
                    f"{', '.join(name(n) for n in event.assignment)}")
        case ShardProgress():
            return (
                f"stage {event.stage} → {name(event.node_id)}: "
                f"{human_bytes(event.sent_bytes)} of {human_bytes(event.total_bytes)}"
            )
        case StageReady():
            return f"stage {event.stage} ready on {name(event.node_id)} ({event.provider})"
        case DeployFailed():
            return f"stage {event.stage} failed on {name(event.node_id)}: {event.reason}"
        case DeployFinished():
            same = sum(link == "ipc" for link in event.links)
            if not same:
                return "deploy finished"
            return (f"deploy finished: {same} of {len(event.links)} links on this host's "
                    "private sockets, the rest over TCP" if same < len(event.links) else
                    "deploy finished: every link on this host's private sockets")
        case RequestCompleted():
            return f"request {event.request_id} done in {event.latency_s * 1000:.1f} ms"
        case RequestFailed():
            where = "" if event.stage is None else f" at stage {event.stage}"
            return f"request {event.request_id} failed{where}: {event.reason}"
        case RecoveryStarted():
            return (f"recovering: lost {', '.join(event.lost)}; re-planning onto the nodes "
                    f"still alive, {event.inflight} requests to replay")
        case Recovered():
            detected = "" if event.detected_s is None else f"detected in {event.detected_s:.2f} s, "
            return (f"recovered: {detected}serving again after {event.recovered_s:.2f} s on "
                    f"{len(event.assignment)} node{'s' if len(event.assignment) != 1 else ''} "
                    f"({', '.join(event.assignment)}), "
                    f"{event.replayed} requests replayed")
        case SpreadBack():
            return (f"spread back: {', '.join(event.joined)} joined; serving again on "
                    f"{len(event.assignment)} nodes ({', '.join(event.assignment)}), "
                    f"{event.replayed} requests replayed")
        case Rebalanced():
            measured = ", ".join(f"S{i} {m * 1000:.1f} ms" for i, m in enumerate(event.measured_s))
            return (f"rebalanced on measured compute ({measured}): stages of "
                    f"{'/'.join(map(str, event.before))} nodes now "
                    f"{'/'.join(map(str, event.after))}, slowest stage predicted "
                    f"{event.predicted_s * 1000:.1f} ms, {event.replayed} requests replayed")
        case NodeExited():
            if event.restarted_at:
                return (f"node {event.name} exited ({event.how}); started again at "
                        f"{event.restarted_at}, id {event.new_id[:12]}")
            down = f", left down: {event.left_down}" if event.left_down else ""
            return (f"node {event.name} exited ({event.how}){down}; {event.running} local "
                    f"node{'s' if event.running != 1 else ''} still running")
        case RecoveryFailed():
            return f"recovery failed: {event.reason}"
    raise TypeError(f"not a cluster event: {event!r}")
