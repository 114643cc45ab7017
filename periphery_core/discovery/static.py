"""Peers the user names by address (`--peer HOST:PORT`), for networks where mDNS does not pass.

Every spec is validated when `StaticPeers` is built, so a typo fails at the command line with
one clear line instead of as a connection timeout later. Host names are kept as given (not
resolved here): resolving is the connecting socket's job, and a name may resolve differently
by the time the master connects. The node id is ``"HOST:PORT"`` until the node's hello tells
the master its real id.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from periphery_core.discovery import DiscoveryError, NodeAddress

# A DNS host name or an IPv4 address: labels of letters, digits, '-' and '_', joined by dots.
_LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
_HOST_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")


def parse_peer(spec: str) -> tuple[str, int]:
    """Split a ``HOST:PORT`` peer spec into a host and a port.

    IPv6 addresses go in brackets (``[::1]:5555``); the host is returned without them.

    Args:
        spec: The peer as the user typed it, e.g. ``"10.0.0.2:5555"`` or ``"localhost:5555"``.

    Returns:
        ``(host, port)`` with ``1 <= port <= 65535``.

    Raises:
        DiscoveryError: The spec has no port, an empty or malformed host, or a port that is not
            a number in 1..65535.
    """
    text = spec.strip()
    usage = f"peer {spec!r} is not HOST:PORT (e.g. 10.0.0.2:5555 or [::1]:5555)"
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise DiscoveryError(usage)
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DiscoveryError(f"{usage}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise DiscoveryError(f"{usage}: the port is missing")
        if not host:
            raise DiscoveryError(f"{usage}: the host is empty")
        if ":" in host:
            raise DiscoveryError(f"{usage}: put an IPv6 address in brackets, e.g. [{host}]:PORT")
        if not _HOST_NAME.match(host):
            raise DiscoveryError(f"{usage}: {host!r} is not a host name or address")
    if not port_text:
        raise DiscoveryError(f"{usage}: the port is missing")
    if not port_text.isdigit() or not port_text.isascii():
        raise DiscoveryError(f"{usage}: the port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise DiscoveryError(f"{usage}: the port {port} is not in 1..65535")
    return host, port


class StaticPeers:
    """A fixed list of peers; implements `Discovery`.

    Args:
        peers: ``HOST:PORT`` specs; all are validated here (see `parse_peer`). Duplicates
            collapse to one node.

    Raises:
        DiscoveryError: A spec is malformed.
    """

    def __init__(self, peers: Sequence[str]) -> None:
        addresses: dict[tuple[str, int], NodeAddress] = {}
        for spec in peers:
            host, port = parse_peer(spec)
            key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            addresses.setdefault(
                (host.lower(), port),
                NodeAddress(
                    node_id=key, name=key, host=host, port=port, properties={}, source="static"
                ),
            )
        self._nodes = list(addresses.values())

    def start(self) -> None:
        """Nothing to start: the peers are known from the outset."""

    def stop(self) -> None:
        """Nothing to stop."""

    def nodes(self) -> list[NodeAddress]:
        """Return the peers, in the order first given."""
        return list(self._nodes)

    def wait_for(self, count: int | None, timeout: float) -> list[NodeAddress]:
        """Return the peers at once: all are known from the outset and no other will come."""
        return self.nodes()
