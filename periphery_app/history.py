"""Latency and throughput over time: samples of a `ClusterState` taken at a steady rate.

The state keeps a window of recent requests; the dashboard's sparklines need a series, so the
app samples the state on its refresh timer into a capped tuple (pure, like the state itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from periphery_core.cluster.state import ClusterState

MAX_SAMPLES = 120


@dataclass(frozen=True, slots=True)
class Sample:
    """The pipeline's figures at one moment (seconds and requests per second)."""

    t: float
    p50_s: float
    p99_s: float
    throughput: float


def sample(state: ClusterState, now: float) -> Sample:
    """Latency percentiles and throughput over the state's window at `now`."""
    lat = state.latency(now)
    return Sample(now, lat["p50"], lat["p99"], state.throughput(now))


def append(history: tuple[Sample, ...], s: Sample) -> tuple[Sample, ...]:
    """The history with `s` added, capped at `MAX_SAMPLES`."""
    return (*history[-(MAX_SAMPLES - 1):], s)
