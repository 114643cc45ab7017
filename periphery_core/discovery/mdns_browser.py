"""The master finds nodes that announce themselves over mDNS; implements `Discovery`.

zeroconf's handler only enqueues ``(name, state change)``; the browser's own worker thread
resolves each service, decodes its TXT record and reports the change (see `mdns.py` for how
nothing here blocks). A record from a hostile or broken peer is skipped with one log line per
distinct record.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from periphery_core.discovery import SERVICE_TYPE, DiscoveryError, NodeAddress
from periphery_core.discovery.mdns import JOIN_TIMEOUT, open_zeroconf, run_on_loop

log = logging.getLogger(__name__)

# Milliseconds a browser waits for one service's SRV/TXT/A records.
_RESOLVE_TIMEOUT_MS = 3000

ChangeKind = Literal["added", "updated", "removed"]


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
                self._zc = open_zeroconf(self._interfaces)
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
            thread.join(timeout=JOIN_TIMEOUT)
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

    def wait_for(self, count: int | None, timeout: float) -> list[NodeAddress]:
        """Block until at least `count` nodes are known, `timeout` seconds pass, or `stop`.

        Args:
            count: How many nodes to wait for; ``None`` browses for the whole `timeout`.
            timeout: Seconds to wait at most.

        Returns:
            The nodes known when it returns (fewer than `count` after a timeout).
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while (count is None or len(self._known) < count) and not self._stopping.is_set():
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
            found = run_on_loop(
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
