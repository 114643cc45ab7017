"""A node announces itself over mDNS as ``{name}-{id[:8]}._periphery._tcp.local.``.

`start` returns at once: registering probes the network for ~1.6 s, so a worker thread does it
(see `mdns.py` for how nothing here blocks). Records carry a TTL of 120 s instead of the RFC's
75 minutes for the service records, so a node that died without a goodbye drops out of
browsers within minutes; the master's heartbeats notice a dead node much sooner, this only
keeps the discovered list honest.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import threading
from collections.abc import Mapping
from typing import Any

from zeroconf import ServiceInfo, Zeroconf

from periphery_core.discovery import SERVICE_TYPE, DiscoveryError
from periphery_core.discovery.mdns import JOIN_TIMEOUT, open_zeroconf, run_on_loop

log = logging.getLogger(__name__)

# Seconds records live in caches; see the module docstring.
_TTL = 120
# A DNS label (the service instance name) is at most 63 bytes.
_MAX_LABEL = 63


def instance_label(name: str, node_id: str) -> str:
    """Return the DNS-SD instance label ``"{name}-{node_id[:8]}"`` made safe for DNS.

    Dots would read as label separators and are replaced by ``-``; the name part is shortened so
    the label fits in 63 bytes.

    Args:
        name: The node's human name (often the host name).
        node_id: The node's unique id; its first 8 characters keep labels unique.

    Returns:
        A label of at most 63 UTF-8 bytes.
    """
    suffix = f"-{node_id[:8]}".replace(".", "-")
    base = name.replace(".", "-").strip() or "node"
    while len((base + suffix).encode("utf-8")) > _MAX_LABEL:
        base = base[:-1]
    return base + suffix


def _packed_address(host: str) -> bytes:
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        raise DiscoveryError(
            f"cannot advertise host {host!r}: give the node's IP address, e.g. 10.0.0.2"
        ) from None


class MdnsAdvertiser:
    """Announces one node as ``{name}-{node_id[:8]}._periphery._tcp.local.``.

    Args:
        node_id: The node's unique id (also sent as TXT ``id`` if `properties` lacks it).
        name: The node's human name.
        port: The node's control port.
        host: The IP address peers should connect to.
        properties: The TXT record (id, name, protocol version, device, memory...).
        interfaces: IP addresses of the interfaces to announce on; ``None`` for all.

    Raises:
        DiscoveryError: `host` is not an IP address or `port` is not in 1..65535.

    Attributes:
        registered: Set once the service is registered (probing done, announced).
        failed: Set if zeroconf could not start or register; the error is logged.
    """

    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        port: int,
        host: str,
        properties: Mapping[str, str],
        interfaces: list[str] | None = None,
    ) -> None:
        if not 1 <= port <= 65535:
            raise DiscoveryError(f"cannot advertise port {port}: it must be in 1..65535")
        self._address = _packed_address(host)
        self._node_id = node_id
        self._port = port
        self._interfaces = None if interfaces is None else list(interfaces)
        self._label = instance_label(name, node_id)
        self.service_name = f"{self._label}.{SERVICE_TYPE}"
        self._properties = self._with_id(properties)
        self._version = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()
        self.failed = threading.Event()

    def _with_id(self, properties: Mapping[str, str]) -> dict[str, str]:
        merged = {"id": self._node_id}
        merged.update({str(k): str(v) for k, v in properties.items()})
        return merged

    def _info(self, name: str, properties: Mapping[str, str]) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=dict(properties),
            server=f"{self._label}.local.",
            addresses=[self._address],
            host_ttl=_TTL,
            other_ttl=_TTL,
        )

    def start(self) -> None:
        """Begin advertising in a background thread and return at once.

        Watch `registered` to know when peers can see the node. Calling `start` again is a
        no-op.
        """
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"mdns-advertiser-{self._label}", daemon=True
            )
        self._thread.start()

    def update(self, properties: Mapping[str, str]) -> None:
        """Replace the TXT record and re-announce it in the background.

        Args:
            properties: The new TXT record (replaces the old one whole).
        """
        with self._lock:
            self._properties = self._with_id(properties)
            self._version += 1
        self._wake.set()

    def stop(self) -> None:
        """Send goodbyes, close zeroconf and end the worker; safe to call twice.

        Cancels a registration still probing; returns within a few seconds at worst.
        """
        self._stopping.set()
        self._wake.set()
        with self._lock:
            pending = list(self._pending)
            thread = self._thread
        for future in pending:
            future.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("mDNS advertiser for %s did not stop in time", self.service_name)

    def _run(self) -> None:
        try:
            zc = open_zeroconf(self._interfaces)
        except OSError as error:
            log.error("mDNS: cannot open zeroconf to advertise %s: %s", self.service_name, error)
            self.failed.set()
            return
        try:
            self._serve(zc)
        except Exception:
            log.exception("mDNS: advertising %s failed", self.service_name)
            self.failed.set()
        finally:
            # close() sends goodbyes for every service still registered, then shuts down.
            try:
                zc.close()
            except Exception as error:  # a goodbye that times out must not leak the sockets
                log.warning("mDNS: closing zeroconf for %s: %s", self.service_name, error)

    def _serve(self, zc: Zeroconf) -> None:
        with self._lock:
            properties, published = self._properties, self._version
        info = self._info(self.service_name, properties)

        async def register() -> None:
            announced = await zc.async_register_service(info, allow_name_change=True)
            await announced

        if self._stopping.is_set():
            return
        try:
            run_on_loop(zc, register(), self._pending, self._stopping)
        except concurrent.futures.CancelledError:
            return
        # allow_name_change may have renamed us if another node uses the same label.
        name = info.name
        if name != self.service_name:
            log.info("mDNS: %s was taken, advertising as %s", self.service_name, name)
            self.service_name = name
        self.registered.set()

        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            with self._lock:
                properties, version = self._properties, self._version
            if version == published:
                continue
            info = self._info(name, properties)
            try:
                run_on_loop(zc, _update(zc, info), self._pending, self._stopping)
            except concurrent.futures.CancelledError:
                return
            published = version


async def _update(zc: Zeroconf, info: ServiceInfo) -> None:
    announced = await zc.async_update_service(info)
    await announced
