"""`/metrics` in Prometheus' text format: the service's requests and rates, and the cluster's
caches and stage times as the master's events report them.

Everything is read when the endpoint is scraped (a custom collector over the live figures), so
nothing here can drift from what the service and the nodes say.
"""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from periphery_core.cluster import events as ev
from periphery_core.cluster.exporter import slot_labels
from periphery_core.generate.service import Slots, TextService


class ServeMetrics(Collector):
    """Figures of one service (a `TextService`, or a `TensorService`) and its cluster, as
    Prometheus metrics."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.http: dict[tuple[str, int], int] = defaultdict(int)  # (path, status) -> count
        self._kv: dict[str, tuple[int, int]] = {}  # node name -> (cache bytes, sequences)
        self._stage_s: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=200))
        self._lock = threading.Lock()
        master = service.pipeline.master
        self._names = master.nodes
        self._unsubscribe = master.bus.subscribe(self._on_event)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, ev.NodeStats) and event.kv_bytes is not None:
            handle = self._names.get(event.node_id)
            name = handle.name if handle is not None else event.node_id
            with self._lock:
                self._kv[name] = (event.kv_bytes, event.sequences or 0)
        elif isinstance(event, ev.RequestCompleted):
            with self._lock:
                for t in event.stages:
                    self._stage_s[t.stage].append(t.compute_s)

    def count(self, path: str, status: int) -> None:
        with self._lock:
            self.http[(path, status)] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self._unsubscribe()

    def collect(self) -> Iterator[Metric]:
        s: Slots = self.service
        with self._lock:
            http = dict(self.http)
            kv = dict(self._kv)
            stages = {k: list(v) for k, v in self._stage_s.items()}
        requests = CounterMetricFamily("periphery_http_requests", "HTTP requests by path and "
                                       "status", labels=["path", "status"])
        for (path, status), n in sorted(http.items()):
            requests.add_metric([path, str(status)], n)
        yield requests
        yield CounterMetricFamily("periphery_rejected_busy", "Requests refused with 429",
                                  value=s.rejected)
        yield GaugeMetricFamily("periphery_requests_in_flight", "Requests running now",
                                value=s.in_flight)
        if isinstance(s, TextService):
            yield from self._text(s)
        plan = self.service.pipeline.plan
        k, replicas = (plan.k, plan.replicas) if plan is not None else (1, 1)
        by = ["replica", "stage"] if replicas > 1 else ["stage"]
        stage = GaugeMetricFamily("periphery_stage_compute_seconds",
                                  "Median compute time of a stage's latest steps (by replica "
                                  "and stage with replicas)", labels=by)
        for slot, values in sorted(stages.items()):
            if values:
                labels = slot_labels(slot, k, replicas)
                stage.add_metric([labels[b] for b in by], statistics.median(values))
        yield stage
        cache = GaugeMetricFamily("periphery_kv_cache_bytes", "KV cache a node holds",
                                  labels=["node"])
        held = GaugeMetricFamily("periphery_kv_cache_sequences",
                                 "Sequences whose KV cache a node holds", labels=["node"])
        for name, (nbytes, n) in sorted(kv.items()):
            cache.add_metric([name], nbytes)
            held.add_metric([name], n)
        yield cache
        yield held

    def _text(self, s: TextService) -> Iterator[Metric]:
        f = s.figures
        seqs = CounterMetricFamily("periphery_sequences", "Sequences by how they ended",
                                   labels=["outcome"])
        for outcome, n in (("finished", f.finished), ("cancelled", f.cancelled),
                           ("failed", f.failed), ("rejected", s.rejected)):
            seqs.add_metric([outcome], n)
        yield seqs
        yield CounterMetricFamily("periphery_prompt_tokens", "Prompt tokens prefilled",
                                  value=f.prompt_tokens)
        yield CounterMetricFamily("periphery_generated_tokens", "Tokens generated",
                                  value=f.new_tokens)
        yield GaugeMetricFamily("periphery_sequences_in_flight", "Sequences generating now",
                                value=s.in_flight)
        yield GaugeMetricFamily("periphery_time_to_first_token_seconds",
                                "Median time to first token of the latest sequences",
                                value=statistics.median(f.ttft_s) if f.ttft_s else 0.0)
        yield GaugeMetricFamily("periphery_decode_tokens_per_second",
                                "Median decode rate of the latest sequences",
                                value=statistics.median(f.tokens_per_s) if f.tokens_per_s
                                else 0.0)
        yield GaugeMetricFamily("periphery_sequences_per_step",
                                "Sequences per batched decode step so far",
                                value=s.steps.mean_batch)
