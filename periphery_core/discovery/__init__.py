"""How the master finds `periphery-node` daemons: one small interface, two ways to fill it.

`MdnsBrowser` (zeroconf, `discovery/mdns_browser.py`) finds nodes that advertise themselves on
the LAN (`discovery/mdns_advertiser.py`); `StaticPeers` (`discovery/static.py`) takes nodes the
user names by address, for networks where multicast does not pass. Both implement `Discovery`,
and `discovery/combined.py` makes the ones a command asks for into one, so the master neither
knows nor cares which one fed it. A node found here is only a candidate: the master confirms it
with a hello over the control socket before trusting anything it advertises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from periphery_core.errors import DiscoveryError

SERVICE_TYPE = "_periphery._tcp.local."


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """Where to reach one node, as discovery saw it.

    Attributes:
        node_id: The unique id the node advertises (TXT key ``id``). Static peers use
            ``"HOST:PORT"`` until a hello confirms the real id.
        name: A human name for the node.
        host: The IP address to connect to.
        port: The node's control port (its ZeroMQ ROUTER socket).
        properties: The decoded TXT record, ``str -> str``; empty for static peers.
        source: ``"mdns"`` or ``"static"``.
    """

    node_id: str
    name: str
    host: str
    port: int
    properties: Mapping[str, str] = field(hash=False)
    source: str


class Discovery(Protocol):
    """The interface the master uses, whatever finds the nodes."""

    def start(self) -> None:
        """Begin discovering; returns without waiting for any node."""
        ...

    def stop(self) -> None:
        """Stop discovering and release sockets and threads; safe to call twice."""
        ...

    def nodes(self) -> list[NodeAddress]:
        """Return a snapshot of the nodes currently known."""
        ...

    def wait_for(self, count: int | None, timeout: float) -> list[NodeAddress]:
        """Wait until at least `count` nodes are known, `timeout` seconds pass, or discovery
        stops, and return the nodes known then (fewer than `count` after a timeout).

        ``None`` waits for whatever turns up within `timeout`. A source that knows every node
        it will ever know from the start returns at once.
        """
        ...


__all__ = ["SERVICE_TYPE", "Discovery", "DiscoveryError", "NodeAddress"]
