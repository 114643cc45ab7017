"""Nodes announce themselves with mDNS/DNS-SD (zeroconf); the master browses for them.

This module is the zeroconf ground both sides stand on; `mdns_advertiser.py` announces a
node and `mdns_browser.py` finds nodes. Key design choice: nothing in them blocks the caller
or zeroconf's own threads.

* `MdnsAdvertiser.start` returns at once. Registration probes the network for ~1.6 s, so a
  worker thread opens the zeroconf instance and registers; `update` only records the new
  properties and wakes that worker, which re-announces them. Probing runs as a task on
  zeroconf's event loop so that `stop` can cancel it instead of waiting it out.
* `MdnsBrowser`'s zeroconf handler only enqueues ``(name, state change)``. Its own worker thread
  resolves each service (also cancellable by `stop`), decodes the TXT record and calls
  `on_change`. A record from a hostile or broken peer (bad UTF-8, no address) is skipped with one
  log line; it never stops the worker.

Both wait on zeroconf's event loop through `run_on_loop`, which `stop` can cancel.

Every constructor takes ``interfaces``: ``None`` means all interfaces (what users want on a
LAN); tests pass ``["127.0.0.1"]`` so that nothing leaves the machine. Bound to loopback only,
discovery between processes takes ~1-2 s (the advertiser's probing dominates).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from zeroconf import InterfaceChoice, IPVersion, Zeroconf

_T = TypeVar("_T")

# Seconds `stop` waits for a worker thread to finish (it is cancelled, so normally far less).
JOIN_TIMEOUT = 2.0


def open_zeroconf(interfaces: list[str] | None) -> Zeroconf:
    """A zeroconf instance on `interfaces` (IP addresses), or on every IPv4 one for ``None``.

    Raises:
        OSError: The multicast sockets cannot be opened (e.g. no such interface).
    """
    if interfaces is None:
        return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=list(interfaces))


def run_on_loop(
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
