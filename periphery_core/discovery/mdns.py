"""Nodes announce themselves with mDNS/DNS-SD (zeroconf); the master browses for them.

Key design choice: nothing here blocks the caller or zeroconf's own threads.

* `MdnsAdvertiser.start` returns at once. Registration probes the network for ~1.6 s, so a
  worker thread opens the zeroconf instance and registers; `update` only records the new
  properties and wakes that worker, which re-announces them. Probing runs as a task on
  zeroconf's event loop so that `stop` can cancel it instead of waiting it out.
* `MdnsBrowser`'s zeroconf handler only enqueues ``(name, state change)``. Its own worker thread
  resolves each service (also cancellable by `stop`), decodes the TXT record and calls
  `on_change`. A record from a hostile or broken peer (bad UTF-8, no address) is skipped with one
  log line; it never stops the worker.

Every constructor takes ``interfaces``: ``None`` means all interfaces (what users want on a
LAN); tests pass ``["127.0.0.1"]`` so that nothing leaves the machine. Bound to loopback only,
discovery between processes takes ~1-2 s (the advertiser's probing dominates).

Records carry a TTL of 120 s instead of the RFC's 75 minutes for the service records, so a node
that died without a goodbye drops out of browsers within minutes; the master's heartbeats
notice a dead node much sooner, this only keeps the discovered list honest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from periphery_core.discovery import SERVICE_TYPE, DiscoveryError, NodeAddress

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Seconds records live in caches; see the module docstring.
_TTL = 120
# Milliseconds a browser waits for one service's SRV/TXT/A records.
_RESOLVE_TIMEOUT_MS = 3000
# Seconds `stop` waits for a worker thread to finish (it is cancelled, so normally far less).
_JOIN_TIMEOUT = 2.0
# A DNS label (the service instance name) is at most 63 bytes.
_MAX_LABEL = 63

ChangeKind = Literal["added", "updated", "removed"]


def _open_zeroconf(interfaces: list[str] | None) -> Zeroconf:
    if interfaces is None:
        return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=list(interfaces))


def _run_on_loop(
    zc: Zeroconf,
    coro: Coroutine[Any, Any, _T],
    slot: list[concurrent.futures.Future[Any]],
    stopping: threading.Event,
) -> _T:
    """Run `coro` on zeroconf's event loop and wait for it, keeping its future in `slot`.

    Keeping the future lets `stop` (another thread) cancel the wait: `stop` sets `stopping`
    and then cancels what is in `slot`, and this checks `stopping` after filling `slot`, so a
    task started while `stop` runs is cancelled by one side or the other.

    Raises:
        concurrent.futures.CancelledError: The wait was cancelled.
    """
    if zc.loop is None or stopping.is_set():
        coro.close()
        raise concurrent.futures.CancelledError
    future = asyncio.run_coroutine_threadsafe(coro, zc.loop)
    slot.append(future)
    if stopping.is_set():
        future.cancel()
    try:
        return future.result()
    finally:
        slot.remove(future)


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


def decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Decode a TXT record's raw key/value pairs to ``str -> str``.

    A key without a value (``key`` or ``key=``) decodes to ``""``.

    Args:
        properties: Raw pairs as zeroconf parsed them from the wire.

    Returns:
        The decoded pairs.

    Raises:
        ValueError: A key or value is not UTF-8, or a key is empty.
    """
    decoded: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        try:
            key = raw_key.decode("utf-8")
            value = "" if raw_value is None else raw_value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"TXT entry {raw_key!r} is not UTF-8") from error
        if not key:
            raise ValueError("TXT entry has an empty key")
        decoded[key] = value
    return decoded


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
            thread.join(timeout=_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("mDNS advertiser for %s did not stop in time", self.service_name)

    def _run(self) -> None:
        try:
            zc = _open_zeroconf(self._interfaces)
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
            _run_on_loop(zc, register(), self._pending, self._stopping)
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
                _run_on_loop(zc, _update(zc, info), self._pending, self._stopping)
            except concurrent.futures.CancelledError:
                return
            published = version


async def _update(zc: Zeroconf, info: ServiceInfo) -> None:
    announced = await zc.async_update_service(info)
    await announced


class MdnsBrowser:
    """Finds nodes advertised with `MdnsAdvertiser`; implements `Discovery`.

    Args:
        interfaces: IP addresses of the interfaces to browse on; ``None`` for all.
        on_change: Called as ``on_change(kind, address)`` with kind ``"added"``,
            ``"updated"`` or ``"removed"``, from the browser's worker thread (never from a
            zeroconf handler). It should return quickly; exceptions are logged and ignored.
    """

    def __init__(
        self,
        *,
        interfaces: list[str] | None = None,
        on_change: Callable[[ChangeKind, NodeAddress], None] | None = None,
    ) -> None:
        self._interfaces = None if interfaces is None else list(interfaces)
        self._on_change = on_change
        self._known: dict[str, NodeAddress] = {}
        self._changed = threading.Condition()
        self._events: queue.SimpleQueue[tuple[str, ServiceStateChange] | None] = queue.SimpleQueue()
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._warned: set[tuple[str, bytes]] = set()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open zeroconf and begin browsing; returns at once. A second call is a no-op.

        Raises:
            DiscoveryError: The multicast sockets cannot be opened (e.g. no such interface).
        """
        with self._lock:
            if self._zc is not None or self._stopping.is_set():
                return
            try:
                self._zc = _open_zeroconf(self._interfaces)
            except OSError as error:
                raise DiscoveryError(f"cannot browse for nodes with mDNS: {error}") from error
            self._thread = threading.Thread(target=self._run, name="mdns-browser", daemon=True)
            self._thread.start()
            self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_state])

    def stop(self) -> None:
        """Stop browsing, end the worker and close zeroconf; safe to call twice."""
        self._stopping.set()
        with self._lock:
            browser, self._browser = self._browser, None
            thread, self._thread = self._thread, None
            zc, self._zc = self._zc, None
            pending = list(self._pending)
        if browser is not None:
            browser.cancel()
        self._events.put(None)
        for future in pending:
            future.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("mDNS browser worker did not stop in time")
        if zc is not None:
            zc.close()
        with self._changed:
            self._changed.notify_all()

    def nodes(self) -> list[NodeAddress]:
        """Return the nodes currently known, sorted by name then id."""
        with self._changed:
            found = list(self._known.values())
        return sorted(found, key=lambda node: (node.name, node.node_id))

    def wait_for(self, count: int, timeout: float) -> list[NodeAddress]:
        """Block until at least `count` nodes are known, or `timeout` seconds pass.

        Args:
            count: How many nodes to wait for.
            timeout: Seconds to wait at most.

        Returns:
            The nodes known when it returns (fewer than `count` after a timeout).
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._known) < count and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        return self.nodes()

    def _on_state(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Runs in zeroconf's browser thread: only enqueue, never resolve or call out here.
        self._events.put((name, state_change))

    def _run(self) -> None:
        while True:
            event = self._events.get()
            if event is None or self._stopping.is_set():
                return
            name, state_change = event
            try:
                self._handle(name, state_change)
            except Exception:
                log.exception("mDNS: handling %s for %s failed", state_change.name, name)

    def _handle(self, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self._changed:
                gone = self._known.pop(name, None)
                self._changed.notify_all()
            if gone is not None:
                self._emit("removed", gone)
            return
        address = self._resolve(name)
        if address is None:
            return
        with self._changed:
            before = self._known.get(name)
            self._known[name] = address
            self._changed.notify_all()
        if before is None:
            self._emit("added", address)
        elif before != address:
            self._emit("updated", address)

    def _resolve(self, name: str) -> NodeAddress | None:
        zc = self._zc
        if zc is None:
            return None
        info = ServiceInfo(SERVICE_TYPE, name)
        try:
            found = _run_on_loop(
                zc, info.async_request(zc, _RESOLVE_TIMEOUT_MS), self._pending, self._stopping
            )
        except concurrent.futures.CancelledError:
            return None
        if not found:
            log.info("mDNS: %s did not answer with its records in time", name)
            return None
        return self._address_from(name, info)

    def _address_from(self, name: str, info: ServiceInfo) -> NodeAddress | None:
        try:
            properties = decode_txt(info.properties)
        except ValueError as error:
            self._warn_once(name, info.text or b"", f"skipping {name}: {error}")
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
        if not addresses or not info.port:
            self._warn_once(name, info.text or b"", f"skipping {name}: no address or port")
            return None
        label = name[: -len(SERVICE_TYPE) - 1] if name.endswith(SERVICE_TYPE) else name
        return NodeAddress(
            node_id=properties.get("id") or name,
            name=properties.get("name") or label,
            host=addresses[0],
            port=info.port,
            properties=properties,
            source="mdns",
        )

    def _warn_once(self, name: str, text: bytes, message: str) -> None:
        # A hostile peer re-announces often: one log line per distinct record, not per packet.
        key = (name, text)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("mDNS: %s", message)

    def _emit(self, kind: ChangeKind, address: NodeAddress) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(kind, address)
        except Exception:
            log.exception("mDNS: on_change(%r, %s) raised", kind, address.node_id)
