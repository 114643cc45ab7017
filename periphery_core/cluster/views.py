"""What the cluster state holds per node and per deploy stage, and the read-only tables of them.

Design choice: every record is an immutable value, so `periphery_core.cluster.state.apply` can
build a new state that shares each unchanged record with the old one. A table "update"
(`FrozenMap.set`) returns a new map and leaves the old one as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

K = TypeVar("K")
V = TypeVar("V")

NodeState = Literal["discovered", "joining", "ready", "busy", "lost"]
StageStatus = Literal["pending", "sending", "ready", "failed"]

NODE_STATES: tuple[NodeState, ...] = get_args(NodeState)
"""Every state a node can be in, in display order."""


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

    def drop(self, keys: Iterable[K]) -> FrozenMap[K, V]:
        """A map without `keys` (this one, when it holds none of them)."""
        gone = set(keys) & self._data.keys()
        if not gone:
            return self
        return FrozenMap({k: v for k, v in self._data.items() if k not in gone})


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
        workers: Requests it computes at once (periphery-node --workers).
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
    gpu_memory_bytes: int | None = None
    kv_bytes: int | None = None  # a language model's stage: KV cache held
    sequences: int | None = None  # ... for this many sequences
    workers: int = 1


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
