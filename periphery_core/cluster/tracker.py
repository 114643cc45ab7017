"""A live view of the cluster: events from a bus folded into a `ClusterState`, and a
Prometheus endpoint that serves it.

The fold itself is pure (`state.apply`); this is the one place that holds the current state,
behind a lock, for readers on other threads (the CLI, the app's timers, the HTTP server).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.events import Event
from periphery_core.cluster.metrics import prometheus_text
from periphery_core.cluster.state import ClusterState, apply
from periphery_core.errors import PeripheryError


class StateTracker:
    """Subscribe to a bus and keep the folded state."""

    def __init__(self, bus: EventBus, initial: ClusterState | None = None) -> None:
        self._lock = threading.Lock()
        self._state = initial or ClusterState.empty()
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            self._state = apply(self._state, event)

    @property
    def state(self) -> ClusterState:
        with self._lock:
            return self._state

    def close(self) -> None:
        self._unsubscribe()


class MetricsServer:
    """Serve `GET /metrics` in Prometheus text format from a tracker's state."""

    def __init__(self, tracker: StateTracker, port: int, host: str = "127.0.0.1") -> None:
        tracker_ref = tracker

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = prometheus_text(tracker_ref.state, time.time()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # no access log on the master's console

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise PeripheryError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="metrics-http")
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=2)
