"""What the master knows of each node, and the two views of it others read.

A `NodeHandle` is written by the master's control thread alone (from the node's answer to
hello, its pongs and stats, and its control connection's monitor); other threads read it. Two
things are derived from it, each in one place: the `NodeJoined` event (for a node's first
hello and for a lost node that answers again) and the planner's `DeviceSpec`, whose speed is
the measured one only where `speeds.planning_speeds` trusts the measurements: a planner fed
noise plans worse than one that assumes equal nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from periphery_core import __version__
from periphery_core.cluster import events as ev
from periphery_core.cluster.speeds import NodeSpeed, parse_speed, planning_speeds
from periphery_core.cluster.views import NodeView
from periphery_core.discovery import NodeAddress
from periphery_core.errors import ClusterError
from periphery_core.partition.plan import DEFAULT_BANDWIDTH, DeviceSpec
from periphery_core.wire import PROTOCOL_VERSION

log = logging.getLogger("periphery.master")


def other_release(host: str, port: int, version: object) -> ClusterError:
    """The one line for a node that speaks another wire protocol version than this master."""
    return ClusterError(
        f"node {host}:{port} speaks wire protocol {version!s:.20} and this master "
        f"{PROTOCOL_VERSION}: install the same Periphery release on both (this one is "
        f"{__version__})")


def advertised_release(address: NodeAddress) -> ClusterError | None:
    """`other_release` for a node whose mDNS record (TXT `proto`) names another protocol
    version, known before connecting; None when it names this one or none (a static peer)."""
    version = address.properties.get("proto")
    if version is None or version == str(PROTOCOL_VERSION):
        return None
    return other_release(address.host, address.port, version)


# The share of a node's free memory the planner may fill: the rest is headroom for the
# runtime's own allocations and for whatever else the host runs.
MEMORY_SHARE = 0.8


@dataclass
class NodeHandle:
    """What the master knows of one node."""

    address: NodeAddress
    node_id: str = ""
    name: str = ""
    device: str = ""
    data_endpoint: str = ""
    cores: int = 0
    memory: int = 0
    free_memory: int = 0
    speed: float | None = None  # None: not measured yet
    rtt_s: float | None = None
    bandwidth: float | None = None
    last_seen: float = 0.0
    # When the oldest ping the node has not answered yet was sent (None: it has answered
    # everything): the silence a loss is judged on. Time the master itself did not ping (a
    # master busy serialising a big model's shards) is not the node's silence.
    unanswered_since: float | None = None
    loading_until: float = 0.0  # building a shard's session until then, or until ready/error
    gone_since: float | None = None  # when its control connection closed (None: it is up)
    lost: bool = False
    stage: int | None = None
    key: bytes | None = None  # the node's CurveZMQ public key (None: insecure)
    holds: tuple[int, str, bool] | None = None  # (stage, sha256, exact) the node already runs
    master_silent_s: float = 0.0  # how long the node had heard from no master, at hello
    data_ipc: str = ""  # its data socket for processes on its host (same_host.py)
    host: str = ""  # its host's identity (same_host.host_identity); '' unknown
    workers: int = 1  # requests it computes at once
    socket: Any = None
    monitor: Any = None  # the socket's monitor: its connection closing and coming back
    waiters: dict[str, list[Future]] = field(default_factory=dict)

    def take_info(self, f: Mapping[str, Any]) -> None:
        """What the node's `info` (its answer to hello) says of it; `decode` has checked the
        type and range of every field read here (wire/protocol.py)."""
        self.node_id, self.name = str(f["node"]), str(f.get("name", f["node"]))
        self.device, self.data_endpoint = str(f["device"]), str(f["data"])
        self.cores, self.memory = int(f["cores"]), int(f["memory"])
        self.free_memory = int(f.get("free", 0) or 0)
        held = (f.get("stage"), f.get("sha256"))
        self.holds = (int(held[0]), str(held[1]), bool(f.get("exact", True))) \
            if isinstance(held[0], int) and held[0] >= 0 and held[1] else None
        self.master_silent_s = float(f.get("master_silent_s", 0.0) or 0.0)
        self.data_ipc, self.host = str(f.get("ipc") or ""), str(f.get("host") or "")
        self.workers = int(f.get("workers", 1) or 1)
        self.speed = parse_speed(f.get("speed"))
        self.lost = False

    def link_events(self, monitor: zmq.Socket) -> None:
        """Note when the node's control connection closed, and when it is back (what its
        socket's monitor holds)."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                if self.gone_since is None:
                    self.gone_since = time.time()
            elif event["event"] == zmq.EVENT_CONNECTED:
                self.gone_since = None

    def joined(self) -> ev.NodeJoined:
        """The event that says this node is connected and usable, as it is now."""
        a = self.address
        return ev.NodeJoined(
            t=time.time(), node_id=self.node_id, name=self.name, host=a.host, port=a.port,
            device=self.device, cores=self.cores, memory_bytes=self.memory,
            speed=self.speed, rtt_s=self.rtt_s, bandwidth=self.bandwidth, workers=self.workers)


def device_specs(handles: Sequence[NodeHandle]) -> list[DeviceSpec]:
    """The planner's description of `handles`, in order: speed, free memory and link.

    Measured speeds only when none is unknown and identical machines agree (speeds.py); else
    equal speeds, with the reason logged as a warning.
    """
    return _specs([(NodeSpeed(h.name, h.device, h.cores, h.speed), h.free_memory, h.bandwidth,
                    h.workers) for h in handles])


def view_specs(views: Sequence[NodeView]) -> list[DeviceSpec]:
    """The planner's description of nodes known only from the event fold (an app with no
    master of its own, such as one drawing recorded events): as `device_specs`, with the
    memory a node reported in place of its free memory."""
    return _specs([(NodeSpeed(v.name, v.device or "", v.cores or 0, v.speed), v.memory_bytes,
                    v.bandwidth, v.workers) for v in views])


def _specs(nodes: Sequence[tuple[NodeSpeed, int | None, float | None, int]]
           ) -> list[DeviceSpec]:
    trusted = planning_speeds([node[0] for node in nodes])
    if trusted.warning:
        log.warning("%s", trusted.warning)
    return [
        DeviceSpec(name=node.name, speed=speed,
                   memory_bytes=int(memory * MEMORY_SHARE) if memory else None,
                   bandwidth=bandwidth if bandwidth else DEFAULT_BANDWIDTH, workers=workers)
        for (node, memory, bandwidth, workers), speed in zip(nodes, trusted.speeds, strict=True)
    ]
