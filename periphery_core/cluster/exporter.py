"""The Prometheus exporter: the folded cluster state as metrics text, served over HTTP.

Design choice: rendering lives here, beside the server that serves it, not in the state fold:
`periphery_core.cluster.state` and `periphery_core.cluster.metrics` know nothing of Prometheus,
and this module only reads a `ClusterState` (so imports run one way: exporter -> state ->
metrics). Text follows the exposition format 0.0.4; the server is the standard library's, one
thread per scrape, reading the tracker's current state (an immutable value, so no lock is held
while rendering).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from periphery_core.cluster.metrics import QUANTILES
from periphery_core.cluster.state import ClusterState
from periphery_core.cluster.tracker import StateTracker
from periphery_core.cluster.views import NODE_STATES
from periphery_core.errors import PeripheryError


def escape_label_value(value: str) -> str:
    r"""Escape a label value for the Prometheus text format (``\\``, ``\"``, ``\n``)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Exposition:
    """Collects metric families in order and renders them once."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
    ) -> None:
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                self._lines.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                self._lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def prometheus_text(state: ClusterState, now: float) -> str:
    """Render the cluster's metrics in the Prometheus text exposition format 0.0.4.

    Every family has HELP and TYPE lines. Latency quantiles are gauges over the latency window
    (NaN when it is empty); stage gauges are medians of each stage's recent timings; node gauges
    cover nodes that are not lost and have reported stats. Label values are escaped.

    Args:
        state: The folded cluster state.
        now: The scrape time (seconds, the events' clock), for windowed figures and busy nodes.

    Returns:
        The exposition text, ending with a newline.
    """
    out = _Exposition()
    counts = dict.fromkeys(NODE_STATES, 0)
    for node_id in state.nodes:
        counts[state.node_state(node_id, now)] += 1
    out.family(
        "periphery_nodes",
        "gauge",
        "Nodes known to the master, by state.",
        (({"state": s}, n) for s, n in counts.items()),
    )
    out.family(
        "periphery_requests_total",
        "counter",
        "Requests completed since the master started.",
        [({}, state.requests_completed)],
    )
    out.family(
        "periphery_request_failures_total",
        "counter",
        "Requests that failed since the master started.",
        [({}, state.requests_failed)],
    )
    pct = state.latency(now)
    out.family(
        "periphery_latency_seconds",
        "gauge",
        f"End-to-end request latency quantiles over the last {state.latency_window.window_s:g} s.",
        ((({"quantile": f"{q / 100:g}"}), pct[key]) for key, q in QUANTILES),
    )
    out.family(
        "periphery_throughput_rps",
        "gauge",
        f"Completed requests per second over the last {state.latency_window.window_s:g} s.",
        [({}, state.throughput(now))],
    )
    summaries = state.stage_stats.summaries()
    for name, attr, what in (  # by stage; with replicas, by replica and stage
        ("periphery_stage_compute_seconds", "compute_median", "running the shard"),
        ("periphery_stage_queue_seconds", "queue_median", "waiting in the node's queue"),
        ("periphery_stage_transfer_seconds", "transfer_median", "moving the activation in"),
    ):
        out.family(
            name,
            "gauge",
            f"Median seconds per request spent {what}, over recent requests, by stage.",
            ((slot_labels(s.stage, state.plan_stages, state.replicas), getattr(s, attr))
             for s in summaries),
        )
    live = [n for n in state.nodes.values() if n.state != "lost"]
    out.family(
        "periphery_node_cpu_percent",
        "gauge",
        "CPU use of the node process, in percent.",
        (({"node": n.id}, n.cpu_percent) for n in live if n.cpu_percent is not None),
    )
    out.family(
        "periphery_node_rss_bytes",
        "gauge",
        "Resident memory of the node process, in bytes.",
        (({"node": n.id}, n.rss_bytes) for n in live if n.rss_bytes is not None),
    )
    out.family(
        "periphery_node_gpu_percent",
        "gauge",
        "Use of the node's GPU, in percent (nodes running on one).",
        (({"node": n.id}, n.gpu_percent) for n in live if n.gpu_percent is not None),
    )
    out.family(
        "periphery_node_gpu_memory_bytes",
        "gauge",
        "Memory held on the node's GPU, in bytes (nodes running on one).",
        (({"node": n.id}, n.gpu_memory_bytes) for n in live if n.gpu_memory_bytes is not None),
    )
    return out.text()


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


def slot_labels(slot: int, stages: int, replicas: int) -> dict[str, str]:
    """A stage timing's labels: `stage` (the slot) for one pipeline; with replicas, `replica`
    and `stage` within it, as the dashboard's `R1·S0` reads."""
    if replicas <= 1 or stages < 1:
        return {"stage": str(slot)}
    return {"replica": str(slot // stages), "stage": str(slot % stages)}
