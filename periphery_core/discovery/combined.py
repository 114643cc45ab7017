"""Several ways of finding nodes, used as one `Discovery`.

A command takes nodes from the peers the user named and, unless told not to, from mDNS.
`discovery_for` builds what the command's options ask for; the caller sees only `Discovery`
and waits on it, so it returns as soon as the nodes it needs are known instead of sleeping
out a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from periphery_core.discovery import Discovery, NodeAddress
from periphery_core.discovery.static import StaticPeers


class Combined:
    """The nodes of several discoveries, in the order given; implements `Discovery`.

    A node two sources both find at the same address (a `--peer` that mDNS also finds) is
    listed once, as the first source found it; found at two addresses it is listed by each
    (their ids differ until a hello, which the master then tells apart).
    """

    def __init__(self, sources: Sequence[Discovery]) -> None:
        self._sources = list(sources)

    def start(self) -> None:
        """Start every source; if one cannot start, stop those already started and raise."""
        started: list[Discovery] = []
        try:
            for source in self._sources:
                source.start()
                started.append(source)
        except BaseException:
            for source in started:
                source.stop()
            raise

    def stop(self) -> None:
        """Stop every source; safe to call twice."""
        for source in self._sources:
            source.stop()

    def nodes(self) -> list[NodeAddress]:
        """Return every source's nodes, source by source, each address once."""
        seen: set[tuple[str, int]] = set()
        out = []
        for source in self._sources:
            for node in source.nodes():
                if (node.host, node.port) not in seen:
                    seen.add((node.host, node.port))
                    out.append(node)
        return out

    def wait_for(self, count: int | None, timeout: float) -> list[NodeAddress]:
        """Wait on each source in turn for the nodes the others have not found yet, all within
        one `timeout` (see `Discovery.wait_for`)."""
        deadline = time.monotonic() + timeout
        for source in self._sources:
            if count is not None and len(self.nodes()) >= count:
                break
            others = len(self.nodes()) - len(source.nodes())
            source.wait_for(None if count is None else count - others,
                            max(0.0, deadline - time.monotonic()))
        return self.nodes()


def discovery_for(peers: Sequence[str], *, mdns: bool,
                  interfaces: Sequence[str] | None = None) -> Discovery:
    """The nodes named by `peers` (``HOST:PORT``) and, with `mdns`, those browsing finds.

    Args:
        peers: Peer specs, validated here.
        mdns: Browse mDNS as well.
        interfaces: The interface addresses to browse on; ``None`` or empty for all.

    Raises:
        DiscoveryError: A peer spec is malformed.
    """
    static = StaticPeers(peers)
    if not mdns:
        return static
    from periphery_core.discovery.mdns_browser import MdnsBrowser  # zeroconf only when used

    return Combined([static, MdnsBrowser(interfaces=list(interfaces or ()) or None)])
