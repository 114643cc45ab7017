"""The cluster view as a fold: event lists in, states out; metrics, dict form and the bus."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import statistics
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.events import (
    EVENT_TYPES,
    DeployFailed,
    DeployFinished,
    DeployStarted,
    Event,
    NodeDiscovered,
    NodeExited,
    NodeJoined,
    NodeLost,
    NodeStats,
    Rebalanced,
    Recovered,
    RecoveryFailed,
    RecoveryStarted,
    RequestCompleted,
    RequestFailed,
    ShardProgress,
    SpreadBack,
    StageReady,
    StageTiming,
    describe,
    event_from_dict,
    event_to_dict,
)
from periphery_core.cluster.exporter import prometheus_text
from periphery_core.cluster.metrics import LatencyWindow, StageStats
from periphery_core.cluster.state import (
    BUSY_S,
    RECENT_EVENTS,
    ClusterState,
    apply,
    fold,
)
from periphery_core.cluster.views import FrozenMap

# --- event builders: the figures that do not matter to a test get fixed values ----------------


def discovered(node: str, t: float, host: str = "10.0.0.1") -> NodeDiscovered:
    return NodeDiscovered(node_id=node, name=node, host=host, port=5555, source="mdns", t=t)


def joined(node: str, t: float, speed: float = 1.0, name: str | None = None) -> NodeJoined:
    return NodeJoined(
        node_id=node,
        name=name or node,
        host="10.0.0.1",
        port=5555 + zlib.crc32(node.encode()) % 50000,  # each node an address of its own
        device="cpu",
        cores=8,
        memory_bytes=16 << 30,
        speed=speed,
        rtt_s=0.002,
        bandwidth=1.2e8,
        t=t,
    )


def lost(node: str, t: float) -> NodeLost:
    return NodeLost(node_id=node, reason="timeout", t=t)


def stats(node: str, t: float, cpu: float = 50.0, rss: int = 1 << 28) -> NodeStats:
    return NodeStats(
        node_id=node, cpu_percent=cpu, rss_bytes=rss, memory_percent=12.5, gpu_percent=None, t=t
    )


def deploy(t: float, *nodes: str) -> DeployStarted:
    return DeployStarted(plan_stages=len(nodes), assignment=nodes, t=t)


def done(rid: int, t: float, latency: float, *timings: tuple[float, float, float]) -> Event:
    stages = tuple(StageTiming(i, q, c, x) for i, (q, c, x) in enumerate(timings))
    return RequestCompleted(request_id=str(rid), latency_s=latency, stages=stages, t=t)


def snapshot(value: Any) -> Any:
    """A plain nested copy of everything a state holds, private fields included."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return (
            type(value).__name__,
            tuple((f.name, snapshot(getattr(value, f.name))) for f in fields),
        )
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((repr(k), snapshot(v)) for k, v in value.items())))
    if isinstance(value, (tuple, list)):
        return tuple(snapshot(v) for v in value)
    return value


# --- nodes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([discovered("a", 1)], {"a": "discovered"}, id="discovered"),
        pytest.param([discovered("a", 1), joined("a", 2)], {"a": "ready"}, id="joined"),
        pytest.param([joined("a", 1)], {"a": "ready"}, id="joined-without-discovery"),
        pytest.param([joined("a", 1), lost("a", 2)], {"a": "lost"}, id="lost"),
        pytest.param([joined("a", 1), lost("a", 2), joined("a", 3)], {"a": "ready"}, id="rejoin"),
        pytest.param([joined("a", 1), discovered("a", 2)], {"a": "ready"}, id="rediscovered"),
        pytest.param(
            [joined("a", 1), lost("a", 2), discovered("a", 3)],
            {"a": "lost"},
            id="lost-stays-lost-when-advertised",
        ),
        pytest.param([lost("x", 1), stats("x", 2)], {}, id="unknown-node-ignored"),
        pytest.param(
            [joined("a", 1), joined("b", 1), lost("b", 2), discovered("c", 3)],
            {"a": "ready", "b": "lost", "c": "discovered"},
            id="several",
        ),
    ],
)
def test_node_lifecycle(events: list[Event], expected: dict[str, str]) -> None:
    state = fold(events)
    assert {n.id: n.state for n in state.nodes.values()} == expected


def test_discovery_does_not_overwrite_a_known_node() -> None:
    state = fold([discovered("a", 1, host="10.0.0.1"), discovered("a", 2, host="10.9.9.9")])
    assert state.nodes["a"].host == "10.0.0.1"
    assert state.nodes["a"].device is None


def test_lost_node_keeps_figures_and_stage_and_rejoins_ready() -> None:
    events: list[Event] = [
        joined("a", 1, speed=2.5),
        stats("a", 2, cpu=75.0),
        deploy(3, "a"),
        StageReady("a", 0, "CPUExecutionProvider", t=4),
        lost("a", 5),
    ]
    state = fold(events)
    node = state.nodes["a"]
    assert (node.state, node.speed, node.cores, node.stage, node.cpu_percent) == (
        "lost",
        2.5,
        8,
        0,
        75.0,
    )
    back = apply(state, joined("a", 6, speed=3.0))
    assert (back.nodes["a"].state, back.nodes["a"].speed, back.nodes["a"].stage) == (
        "ready",
        3.0,
        0,
    )


def test_stats_update_utilisation_and_last_seen() -> None:
    state = fold([joined("a", 1), stats("a", 7, cpu=12.0, rss=123)])
    node = state.nodes["a"]
    assert (node.cpu_percent, node.rss_bytes, node.memory_percent, node.last_seen) == (
        12.0,
        123,
        12.5,
        7,
    )


# --- deploy ------------------------------------------------------------------------------------


def test_deploy_flow() -> None:
    state = fold([joined("a", 1), joined("b", 1), joined("c", 1), deploy(2, "a", "b")])
    assert state.deploy_status == "deploying"
    assert (state.plan_stages, state.assignment) == (2, ("a", "b"))
    assert {n.id: (n.state, n.stage) for n in state.nodes.values()} == {
        "a": ("joining", 0),
        "b": ("joining", 1),
        "c": ("ready", None),
    }
    assert [(s.stage, s.node_id, s.status) for s in state.deploy.values()] == [
        (0, "a", "pending"),
        (1, "b", "pending"),
    ]

    state = apply(state, ShardProgress("a", 0, sent_bytes=250, total_bytes=1000, t=2.5))
    assert (state.deploy[0].status, state.deploy[0].fraction) == ("sending", 0.25)

    state = apply(state, StageReady("a", 0, "CPUExecutionProvider", t=3))
    assert (state.nodes["a"].state, state.nodes["a"].provider) == ("ready", "CPUExecutionProvider")
    assert (state.deploy[0].status, state.deploy[0].fraction) == ("ready", 1.0)
    assert state.nodes["b"].state == "joining"
    assert state.deploy_status == "deploying"

    state = fold([StageReady("b", 1, "CUDAExecutionProvider", t=4), DeployFinished(t=5)], state)
    assert state.deploy_status == "deployed"
    assert {n.id: n.state for n in state.nodes.values()} == {
        "a": "ready",
        "b": "ready",
        "c": "ready",
    }


def test_deploy_failure() -> None:
    state = fold(
        [
            joined("a", 1),
            joined("b", 1),
            deploy(2, "a", "b"),
            StageReady("a", 0, "CPUExecutionProvider", t=3),
            DeployFailed("b", 1, "out of memory", t=4),
            DeployFinished(t=5),
        ]
    )
    assert state.deploy_status == "failed"
    assert (state.deploy[1].status, state.deploy[1].error) == ("failed", "out of memory")
    assert state.nodes["b"].state == "ready"  # alive, just not serving


def test_recovery_flow() -> None:
    before: list[Event] = [joined("a", 1), joined("b", 1), deploy(2, "a", "b"),
                           DeployFinished(t=3), lost("b", 5),
                           RecoveryStarted(("b",), inflight=4, t=5.1)]
    state = fold(before)
    assert state.recovering and state.recoveries == 0
    assert "recovering: lost b" in state.recent[-1]
    state = fold([deploy(5.2, "a"), DeployFinished(t=5.3),
                  Recovered(("b",), ("a",), detected_s=2.6, recovered_s=0.2, replayed=4, t=5.3)],
                 state)
    assert not state.recovering and state.recoveries == 1
    assert state.deploy_status == "deployed" and state.assignment == ("a",)
    assert "4 requests replayed" in state.recent[-1]
    failed = fold([RecoveryFailed("no node is left", t=6)], fold(before))
    assert not failed.recovering and failed.deploy_status == "failed"
    assert failed.recent[-1].endswith("recovery failed: no node is left")


def test_redeploy_moves_stages_and_resets_stage_timings() -> None:
    state = fold(
        [
            joined("a", 1),
            joined("b", 1),
            joined("c", 1),
            deploy(2, "a", "b"),
            done(1, 3, 0.1, (0.0, 0.05, 0.0), (0.0, 0.05, 0.0)),
        ]
    )
    assert state.stage_stats.stages() == (0, 1)
    state = apply(state, deploy(20, "c", "b"))
    assert {n.id: (n.state, n.stage) for n in state.nodes.values()} == {
        "a": ("ready", None),
        "b": ("joining", 1),
        "c": ("joining", 0),
    }
    assert state.stage_stats.stages() == ()
    assert state.requests_completed == 1  # counters are totals, never reset


def test_busy_follows_completed_requests_by_event_time() -> None:
    base: list[Event] = [joined("a", 1), joined("b", 1), joined("c", 1), deploy(2, "a", "b")]
    base += [StageReady("a", 0, "cpu", t=3), StageReady("b", 1, "cpu", t=3), DeployFinished(t=3)]
    state = fold([*base, done(1, 10, 0.2, (0, 0.1, 0), (0, 0.1, 0))])
    assert {n.id: n.state for n in state.nodes.values()} == {"a": "busy", "b": "busy", "c": "ready"}
    assert state.node_state("a", now=10 + BUSY_S) == "busy"
    assert state.node_state("a", now=10 + BUSY_S + 0.01) == "ready"
    assert state.node_state("c", now=10 + BUSY_S) == "ready"

    still = apply(state, stats("c", 10 + BUSY_S - 0.1))
    assert still.nodes["a"].state == "busy"
    later = apply(state, stats("c", 10 + BUSY_S + 0.5))
    assert {n.id: n.state for n in later.nodes.values()} == {
        "a": "ready",
        "b": "ready",
        "c": "ready",
    }
    assert [n.id for n in state.nodes_in("busy")] == ["a", "b"]
    assert [n.id for n in state.nodes_in("busy", now=100)] == []


def test_completed_request_does_not_revive_a_lost_node() -> None:
    state = fold([joined("a", 1), deploy(2, "a"), lost("a", 3), done(1, 4, 0.1, (0, 0.1, 0))])
    assert state.nodes["a"].state == "lost"


def test_counters() -> None:
    events: list[Event] = [done(i, i, 0.1) for i in range(5)]
    events += [RequestFailed("x", 1, "boom", t=6), RequestFailed("y", None, "lost", t=7)]
    state = fold(events)
    assert (state.requests_completed, state.requests_failed) == (5, 2)


# --- latency, throughput, windows --------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=400)
)
def test_percentiles_match_numpy(latencies: list[float]) -> None:
    state = fold(done(i, 100 + i * 0.01, lat) for i, lat in enumerate(latencies))
    got = state.latency(now=105)
    want = np.percentile(latencies, [50, 90, 99])
    assert [got["p50"], got["p90"], got["p99"]] == pytest.approx(
        want.tolist(), rel=1e-12, abs=1e-15
    )


def test_window_expiry() -> None:
    rng = np.random.default_rng(7)
    latencies = rng.exponential(0.05, size=200)
    times = np.arange(200) * 0.5  # one request every 0.5 s from t=0 to t=99.5
    state = fold(
        done(i, float(t), float(x)) for i, (t, x) in enumerate(zip(times, latencies, strict=True))
    )
    now = 100.0
    inside = latencies[now - times < 30.0]
    assert len(inside) == 59  # 70.5 .. 99.5: a sample exactly window_s old is out
    got = state.latency(now)
    assert [got["p50"], got["p90"], got["p99"]] == pytest.approx(
        np.percentile(inside, [50, 90, 99]).tolist(), rel=1e-12
    )
    assert state.throughput(now) == pytest.approx(59 / 30.0)
    assert len(state.latency_window) <= 60 + 2 * 128  # expired chunks are dropped, not kept

    empty = state.latency(now + 30)
    assert all(math.isnan(v) for v in empty.values())
    assert state.throughput(now + 30) == 0.0


@pytest.mark.parametrize(
    ("times", "now", "rps"),
    [
        pytest.param([], 10.0, 0.0, id="empty"),
        pytest.param([5.0], 5.0, 0.0, id="no-time-passed"),
        pytest.param([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 10.0, 1.0, id="young-run-not-diluted"),
        pytest.param([float(t) for t in range(100)], 99.5, 1.0, id="full-window"),
        pytest.param([0.0, 50.0, 51.0], 60.0, 2 / 30, id="old-sample-expired"),
    ],
)
def test_throughput(times: list[float], now: float, rps: float) -> None:
    state = fold(done(i, t, 0.1) for i, t in enumerate(times))
    assert state.throughput(now) == pytest.approx(rps)


def test_latency_window_is_capped() -> None:
    window = LatencyWindow(window_s=30.0, max_samples=300)
    for i in range(2000):
        window = window.add(i * 0.001, float(i))  # 1000 requests/s for 2 s
    assert len(window) <= 300 + 128
    kept = window.latencies(now=2.0)
    assert kept == [float(i) for i in range(1700, 2000)]
    # the cap cut into the window: the rate is measured over the span the kept samples cover
    assert window.throughput(2.0) == pytest.approx(300 / (2.0 - 1.7), rel=1e-6)


def test_latency_window_add_leaves_the_original_alone() -> None:
    a = LatencyWindow(window_s=5.0)
    b = a.add(1.0, 0.5)
    assert len(a) == 0 and a.latencies(1.0) == []
    assert b.latencies(1.0) == [0.5]
    with pytest.raises(ValueError):
        LatencyWindow(window_s=0)


# --- stage stats and bottleneck ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "bottleneck"),
    [
        pytest.param([], None, id="none"),
        pytest.param([[(0, 0.1, 0), (0, 0.3, 0), (0, 0.2, 0)]], 1, id="compute"),
        pytest.param([[(0.5, 0.1, 0), (0, 0.3, 0)]], 0, id="queue-counts"),
        pytest.param([[(0, 0.1, 0), (0, 0.1, 0.25)]], 1, id="transfer-counts"),
        pytest.param([[(0, 0.2, 0), (0, 0.2, 0)]], 0, id="tie-lowest-stage"),
        pytest.param(  # one outlier does not move a median
            [[(0, 0.1, 0), (0, 0.2, 0)]] * 4 + [[(0, 5.0, 0), (0, 0.2, 0)]], 1, id="median-not-mean"
        ),
    ],
)
def test_bottleneck_stage(
    requests: list[list[tuple[float, float, float]]], bottleneck: int | None
) -> None:
    state = fold(done(i, i, 1.0, *timings) for i, timings in enumerate(requests))
    assert state.bottleneck_stage() == bottleneck


def test_stage_summaries_and_sample_cap() -> None:
    rng = np.random.default_rng(3)
    rows = rng.uniform(0, 1, size=(50, 3))
    stage_stats = StageStats(max_samples=20)
    for q, c, x in rows:
        stage_stats = stage_stats.add([StageTiming(0, float(q), float(c), float(x))])
    summary = stage_stats.summary(0)
    assert summary is not None
    last = rows[-20:]
    assert summary.count == 20
    assert summary.queue_mean == pytest.approx(float(last[:, 0].mean()))
    assert summary.compute_median == pytest.approx(statistics.median(last[:, 1].tolist()))
    assert summary.transfer_median == pytest.approx(statistics.median(last[:, 2].tolist()))
    assert summary.total_median == pytest.approx(statistics.median(last.sum(axis=1).tolist()))
    assert stage_stats.summary(1) is None


# --- recent events log -------------------------------------------------------------------------


def test_recent_log_is_bounded_and_skips_high_rate_events() -> None:
    events: list[Event] = [joined(f"n{i}", i) for i in range(RECENT_EVENTS + 50)]
    events += [done(1, 999, 0.1), stats("n0", 999)]
    state = fold(events)
    assert len(state.recent) == RECENT_EVENTS
    assert state.recent[-1].endswith(
        f"node n{RECENT_EVENTS + 49} joined (cpu, 8 cores, 16.0 GiB, 1.00x)"
    )
    assert state.recent[0].split(" ", 2)[2].startswith("n50 joined")


def test_recent_log_lines_are_single_lines() -> None:
    state = fold([joined("a", 1, name="evil\nname")])
    assert "\n" not in state.recent[-1] and "evil\\nname" in state.recent[-1]


# --- purity ------------------------------------------------------------------------------------

node_ids = st.sampled_from(["a", "b", "c"])
times = st.floats(0, 100, allow_nan=False)
timings = st.builds(
    StageTiming,
    st.integers(0, 3),
    st.floats(0, 1, allow_nan=False),
    st.floats(0, 1, allow_nan=False),
    st.floats(0, 1, allow_nan=False),
)
texts = st.text(max_size=8)
maybe_float = st.none() | st.floats(0, 1e9, allow_nan=False)

EVENT_STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    NodeDiscovered: st.builds(
        NodeDiscovered, node_ids, texts, texts, st.integers(0, 65535), texts, times
    ),
    NodeJoined: st.builds(
        NodeJoined,
        node_ids,
        texts,
        texts,
        st.integers(0, 65535),
        texts,
        st.integers(1, 256),
        st.integers(0, 1 << 40),
        st.floats(0.01, 100, allow_nan=False),
        maybe_float,
        maybe_float,
        times,
    ),
    NodeLost: st.builds(NodeLost, node_ids, texts, times),
    NodeStats: st.builds(
        NodeStats,
        node_ids,
        st.floats(0, 800, allow_nan=False),
        st.integers(0, 1 << 40),
        st.floats(0, 100, allow_nan=False),
        st.none() | st.floats(0, 100, allow_nan=False),
        times,
    ),
    DeployStarted: st.builds(
        DeployStarted, st.integers(0, 4), st.lists(node_ids, max_size=4).map(tuple), times
    ),
    ShardProgress: st.builds(
        ShardProgress,
        node_ids,
        st.integers(0, 3),
        st.integers(0, 10**9),
        st.integers(0, 10**9),
        times,
    ),
    StageReady: st.builds(StageReady, node_ids, st.integers(0, 3), texts, times),
    DeployFailed: st.builds(DeployFailed, node_ids, st.integers(0, 3), texts, times),
    DeployFinished: st.builds(DeployFinished, times),
    RequestCompleted: st.builds(
        RequestCompleted,
        texts,
        st.floats(0, 10, allow_nan=False),
        st.lists(timings, max_size=4).map(tuple),
        times,
    ),
    RequestFailed: st.builds(RequestFailed, texts, st.none() | st.integers(0, 3), texts, times),
    RecoveryStarted: st.builds(RecoveryStarted, st.tuples(node_ids), st.integers(0, 64), times),
    Recovered: st.builds(Recovered, st.tuples(node_ids), st.tuples(node_ids, node_ids),
                         st.none() | st.floats(0, 10), st.floats(0, 10), st.integers(0, 64),
                         times),
    SpreadBack: st.builds(SpreadBack, st.tuples(node_ids), st.tuples(node_ids, node_ids),
                          st.integers(0, 64), times),
    Rebalanced: st.builds(Rebalanced, st.lists(st.floats(0, 1), min_size=2, max_size=4).map(tuple),
                          st.tuples(st.integers(1, 9), st.integers(1, 9)),
                          st.tuples(st.integers(1, 9), st.integers(1, 9)), st.floats(0, 1),
                          st.integers(0, 64), times),
    NodeExited: st.builds(NodeExited, texts, texts, texts, node_ids, texts, st.integers(0, 8),
                          times),
    RecoveryFailed: st.builds(RecoveryFailed, texts, times),
}
any_event = st.one_of(*EVENT_STRATEGIES.values())


def test_every_event_type_has_a_strategy() -> None:
    assert set(EVENT_STRATEGIES) == set(EVENT_TYPES)


# Three nodes and a deploy first, so that the random events after it often fit the deploy (a
# stage's own node) and are folded in, rather than ignored as out of order.
DEPLOYED = fold([joined("a", 0), joined("b", 0), joined("c", 0), deploy(0, "a", "b", "c")])


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([ClusterState.empty(), DEPLOYED]), st.lists(any_event, max_size=40))
def test_apply_leaves_every_earlier_state_as_it_was(start: ClusterState,
                                                    events: list[Event]) -> None:
    # Each state is compared with a deep copy and a plain snapshot taken when it was made, after
    # every later event: an `apply` that changed its input, or a part that the new state shares
    # with an old one (copy-on-write gone wrong), fails here.
    states = [(start, copy.deepcopy(start), snapshot(start))]
    for event in events:
        new = apply(states[-1][0], event)
        states.append((new, copy.deepcopy(new), snapshot(new)))
        for state, deep_copy, plain in states:
            assert state == deep_copy
            assert snapshot(state) == plain


def test_the_purity_check_sees_a_change_deep_inside_a_state() -> None:
    # The check above can fail: a change to a private part of a state (a map's dict, the
    # latency window's open tail) shows in both of its comparisons.
    state = fold([joined("a", 1), deploy(2, "a"), done(1, 3, 0.1, (0, 0.1, 0))])
    for change in (
        lambda s: s.nodes._data.pop("a"),
        lambda s: object.__setattr__(s.latency_window, "_tail", ()),
    ):
        changed = copy.deepcopy(state)
        plain = snapshot(changed)
        change(changed)
        assert snapshot(changed) != plain
        assert changed != state


def test_apply_returns_a_new_state_and_keeps_the_old_one() -> None:
    old = fold([joined("a", 1)])
    new = apply(old, lost("a", 2))
    assert (old.nodes["a"].state, new.nodes["a"].state) == ("ready", "lost")
    assert (old.clock, new.clock) == (1, 2) and len(new.recent) == len(old.recent) + 1


# --- the order check ---------------------------------------------------------------------------

TWO_STAGES: list[Event] = [joined("a", 1), joined("b", 1), deploy(2, "a", "b")]


@pytest.mark.parametrize(
    ("before", "odd", "reason"),
    [
        pytest.param([joined("a", 1)], StageReady("a", 0, "cpu", t=3), "no deploy has started",
                     id="ready-before-any-deploy"),
        pytest.param([joined("a", 1)], ShardProgress("a", 0, 10, 100, t=3),
                     "no deploy has started", id="progress-before-any-deploy"),
        pytest.param([joined("a", 1)], DeployFailed("a", 0, "boom", t=3),
                     "no deploy has started", id="failure-before-any-deploy"),
        pytest.param([], DeployFinished(t=3), "no deploy has started", id="finished-before-any"),
        pytest.param(TWO_STAGES, StageReady("a", 2, "cpu", t=3),
                     "stage 2 is not one of the 2 being deployed", id="stage-out-of-range"),
        pytest.param(TWO_STAGES, StageReady("b", 0, "cpu", t=3),
                     "stage 0 was assigned to a, not b", id="ready-from-the-wrong-node"),
        pytest.param(TWO_STAGES, ShardProgress("c", 1, 10, 100, t=3),
                     "stage 1 was assigned to b, not c", id="progress-of-a-stale-upload"),
        pytest.param(TWO_STAGES, DeployFailed("c", 1, "late", t=3),
                     "stage 1 was assigned to b, not c", id="failure-of-a-stale-upload"),
        pytest.param([joined("a", 1)], DeployStarted(plan_stages=2, assignment=("a",), t=3),
                     "2 stages but 1 nodes assigned", id="stages-and-assignment-disagree"),
    ],
)
def test_an_event_out_of_order_is_ignored_and_logged_with_why(
    before: list[Event], odd: Event, reason: str
) -> None:
    state = fold(before)
    after = apply(state, odd)
    assert after.recent[-1].endswith(f" ignored {type(odd).__name__}: {reason}")
    # Nothing else changed, the clock included: the odd event's time is not trusted either.
    assert dataclasses.replace(after, recent=state.recent) == state


def test_a_run_of_the_same_ignored_event_is_logged_once() -> None:
    state = fold(TWO_STAGES)
    stale: list[Event] = [ShardProgress("c", 1, n, 100, t=3 + n) for n in range(50)]
    after = fold([*stale, stats("a", 60), *stale], state)
    assert len(after.recent) == len(state.recent) + 1
    assert after.recent[-1].endswith("ignored ShardProgress: stage 1 was assigned to b, not c")
    after = apply(after, lost("a", 70))
    assert len(fold(stale, after).recent) == len(after.recent) + 1  # a new run, a new line


def test_a_stale_failure_does_not_fail_the_deploy_in_progress() -> None:
    state = fold([*TWO_STAGES, StageReady("a", 0, "cpu", t=3), DeployFailed("c", 1, "old", t=4),
                  StageReady("b", 1, "cpu", t=5), DeployFinished(t=6)])
    assert state.deploy_status == "deployed"
    assert [s.status for s in state.deploy.values()] == ["ready", "ready"]


def test_requests_count_before_any_deploy_as_for_a_view_that_joins_a_running_cluster() -> None:
    # A tracker that subscribes after the deploy still counts what it sees; only the nodes it
    # cannot place (no assignment known) are not made busy.
    state = fold([joined("a", 1), done(1, 2, 0.25, (0, 0.2, 0)), RequestFailed("x", 0, "boom", 3)])
    assert (state.requests_completed, state.requests_failed) == (1, 1)
    assert state.latency(3)["p50"] == 0.25 and state.stage_stats.stages() == (0,)
    assert state.nodes["a"].state == "ready"


def test_fold_replays_onto_an_initial_state() -> None:
    events: list[Event] = [joined("a", 1), deploy(2, "a"), done(1, 3, 0.1, (0, 0.1, 0))]
    assert fold(events[1:], fold(events[:1])) == fold(events)


def test_apply_rejects_non_events() -> None:
    with pytest.raises(TypeError):
        apply(ClusterState.empty(), "NodeJoined")  # type: ignore[arg-type]


def test_frozen_map_set_returns_a_new_map() -> None:
    a: FrozenMap[str, int] = FrozenMap({"x": 1})
    b = a.set("y", 2)
    assert dict(a) == {"x": 1} and dict(b) == {"x": 1, "y": 2}
    assert a == {"x": 1} and hash(a) == hash(FrozenMap([("x", 1)]))


# --- dict form ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(any_event)
def test_event_dict_round_trip(event: Event) -> None:
    data = json.loads(json.dumps(event_to_dict(event)))
    assert data["type"] == type(event).__name__
    assert event_from_dict(data) == event


def test_a_record_from_before_a_field_was_added_still_reads() -> None:
    old = {"type": "NodeStats", "node_id": "a", "cpu_percent": 5.0, "rss_bytes": 1,
           "memory_percent": 2.0, "gpu_percent": None, "t": 1.0}
    assert event_from_dict(old) == NodeStats("a", 5.0, 1, 2.0, None, t=1.0)
    with pytest.raises(ValueError, match="missing field"):
        event_from_dict({k: v for k, v in old.items() if k != "rss_bytes"})


def test_ints_are_accepted_where_floats_are_expected() -> None:
    event = event_from_dict({"type": "DeployFinished", "t": 3})
    assert event == DeployFinished(t=3.0) and isinstance(event.t, float)


GOOD = event_to_dict(done(7, 1.0, 0.5, (0.1, 0.2, 0.3)))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param([], id="not-a-dict"),
        pytest.param({"t": 1.0}, id="no-type"),
        pytest.param({"type": "NodeExploded", "t": 1.0}, id="unknown-type"),
        pytest.param({"type": "__init__", "t": 1.0}, id="not-an-event-name"),
        pytest.param({"type": "NodeLost", "node_id": "a", "t": 1.0}, id="missing-field"),
        pytest.param(
            {"type": "NodeLost", "node_id": "a", "reason": "x", "t": 1.0, "extra": 1},
            id="unknown-field",
        ),
        pytest.param({"type": "NodeLost", "node_id": 3, "reason": "x", "t": 1.0}, id="int-for-str"),
        pytest.param(
            {"type": "NodeLost", "node_id": "a", "reason": "x", "t": "1"}, id="str-for-float"
        ),
        pytest.param(
            {"type": "NodeLost", "node_id": "a", "reason": "x", "t": True}, id="bool-for-float"
        ),
        pytest.param({"type": "NodeLost", "node_id": "a", "reason": None, "t": 1.0}, id="null"),
        pytest.param({**event_to_dict(discovered("a", 1)), "port": 5.5}, id="float-for-int"),
        pytest.param({**event_to_dict(deploy(1, "a")), "assignment": "a"}, id="str-for-list"),
        pytest.param({**event_to_dict(deploy(1, "a")), "assignment": [1]}, id="bad-list-item"),
        pytest.param({**GOOD, "stages": [{"stage": 0, "queue_s": 0.1}]}, id="timing-missing"),
        pytest.param({**GOOD, "stages": [[0, 0.1, 0.2, 0.3]]}, id="timing-not-object"),
    ],
)
def test_event_from_dict_rejects_bad_data(data: Any) -> None:
    with pytest.raises(ValueError):
        event_from_dict(data)


# --- Prometheus --------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"^(?P<name>{_NAME})"
    rf"(?:\{{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE}(?:,[a-zA-Z_][a-zA-Z0-9_]*={_LABEL_VALUE})*)?\}})?"
    r" (?P<value>NaN|[+-]Inf|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$"
)
_LABEL = re.compile(rf"([a-zA-Z_][a-zA-Z0-9_]*)=({_LABEL_VALUE})")
_HELP = re.compile(rf"^# HELP (?P<name>{_NAME}) (?:[^\\\n]|\\[\\n])*$")
_TYPE = re.compile(rf"^# TYPE (?P<name>{_NAME}) (?:counter|gauge|summary|histogram|untyped)$")


def _unescape(quoted: str) -> str:
    return re.sub(r"\\([\\\"n])", lambda m: "\n" if m[1] == "n" else m[1], quoted[1:-1])


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A strict parser for what we emit: HELP, then TYPE, then that family's samples."""
    assert text.endswith("\n")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    helped: set[str] = set()
    typed: set[str] = set()
    for line in text[:-1].split("\n"):
        if m := _HELP.match(line):
            assert m["name"] not in helped, f"second HELP for {m['name']}"
            helped.add(m["name"])
        elif m := _TYPE.match(line):
            assert m["name"] in helped and m["name"] not in typed, line
            typed.add(m["name"])
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a valid sample line: {line!r}"
            assert m["name"] in typed, f"sample before its TYPE: {line!r}"
            labels = tuple((k, _unescape(v)) for k, v in _LABEL.findall(m["labels"] or ""))
            key = (m["name"], labels)
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(m["value"])
    return samples


def test_prometheus_text() -> None:
    weird = 'gpu "1"\\ \nbox'
    events: list[Event] = [
        joined("a", 1),
        joined(weird, 1),
        discovered("c", 1),
        joined("d", 1),
        lost("d", 2),
        stats("a", 2, cpu=37.5, rss=1000),
        stats(weird, 2, cpu=80.0, rss=2000),
        NodeStats(node_id=weird, cpu_percent=80.0, rss_bytes=2000, memory_percent=3.0,
                  gpu_percent=93.0, gpu_memory_bytes=5 << 30, t=2.5),
        deploy(3, "a", weird),
        StageReady("a", 0, "cpu", t=4),
        StageReady(weird, 1, "cuda", t=4),
        DeployFinished(t=4),
    ]
    latencies = [0.1, 0.2, 0.3, 0.4, 1.0]
    events += [
        done(i, 10 + i, lat, (0.01, 0.02, 0.0), (0.03, 0.5, 0.04))
        for i, lat in enumerate(latencies)
    ]
    events.append(RequestFailed("x", 1, "boom", t=15))
    state = fold(events)
    now = 15.0
    samples = parse_exposition(prometheus_text(state, now))

    assert samples[("periphery_nodes", (("state", "busy"),))] == 2
    assert samples[("periphery_nodes", (("state", "discovered"),))] == 1
    assert samples[("periphery_nodes", (("state", "lost"),))] == 1
    assert samples[("periphery_nodes", (("state", "ready"),))] == 0
    assert samples[("periphery_requests_total", ())] == 5
    assert samples[("periphery_request_failures_total", ())] == 1
    want = np.percentile(latencies, [50, 90, 99])
    for q, value in zip(("0.5", "0.9", "0.99"), want, strict=True):
        assert samples[("periphery_latency_seconds", (("quantile", q),))] == pytest.approx(value)
    assert samples[("periphery_throughput_rps", ())] == pytest.approx(5 / (now - 10))
    assert samples[("periphery_stage_compute_seconds", (("stage", "1"),))] == pytest.approx(0.5)
    assert samples[("periphery_stage_queue_seconds", (("stage", "0"),))] == pytest.approx(0.01)
    assert samples[("periphery_stage_transfer_seconds", (("stage", "1"),))] == pytest.approx(0.04)
    assert samples[("periphery_node_cpu_percent", (("node", weird),))] == 80.0
    assert samples[("periphery_node_rss_bytes", (("node", "a"),))] == 1000
    # a node on a GPU reports its use; one without has no GPU sample
    assert samples[("periphery_node_gpu_percent", (("node", weird),))] == 93.0
    assert samples[("periphery_node_gpu_memory_bytes", (("node", weird),))] == 5 << 30
    assert ("periphery_node_gpu_percent", (("node", "a"),)) not in samples
    # nodes without stats, and lost nodes, have no utilisation samples
    assert not any(
        name.startswith("periphery_node_") and labels == (("node", "d"),)
        for name, labels in samples
    )

    # with replicas, a stage's figures are labelled by replica and stage (the slot 1 of
    # 2 replicas x 1 stage is replica 1's stage 0), as the dashboard's R1·S0 reads
    two = fold([joined("a", 1), joined("b", 1),
                DeployStarted(plan_stages=1, replicas=2, assignment=("a", "b"), t=2),
                DeployFinished(t=3),
                RequestCompleted(request_id="1", latency_s=0.1, t=4,
                                 stages=(StageTiming(1, 0.0, 0.25, 0.0),))])
    by_replica = parse_exposition(prometheus_text(two, 4.0))
    assert by_replica[("periphery_stage_compute_seconds",
                       (("replica", "1"), ("stage", "0")))] == pytest.approx(0.25)

    # after busy has passed, the same state scraped later shows the nodes ready again
    later = parse_exposition(prometheus_text(state, now + 100))
    assert later[("periphery_nodes", (("state", "ready"),))] == 2
    assert math.isnan(later[("periphery_latency_seconds", (("quantile", "0.5"),))])


def test_prometheus_text_of_an_empty_cluster_parses() -> None:
    samples = parse_exposition(prometheus_text(ClusterState.empty(), 0.0))
    assert samples[("periphery_requests_total", ())] == 0
    assert samples[("periphery_throughput_rps", ())] == 0


# --- the bus -----------------------------------------------------------------------------------


def test_bus_fans_out_and_survives_a_raising_subscriber(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    first: list[Event] = []
    last: list[Event] = []

    def explode(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    bus.subscribe(first.append)
    bus.subscribe(explode)
    bus.subscribe(last.append)
    events: list[Event] = [joined("a", 1), lost("a", 2)]
    with caplog.at_level(logging.ERROR, logger="periphery_core.cluster.bus"):
        for event in events:
            bus.publish(event)
    assert first == events and last == events
    assert "subscriber bug" in caplog.text


def test_bus_unsubscribe() -> None:
    bus = EventBus()
    got: list[Event] = []
    unsubscribe = bus.subscribe(got.append)
    twice = bus.subscribe(got.append)  # the same callback twice is two subscriptions
    bus.publish(DeployFinished(t=1))
    unsubscribe()
    unsubscribe()  # idempotent
    bus.publish(DeployFinished(t=2))
    twice()
    bus.publish(DeployFinished(t=3))
    assert [e.t for e in got] == [1, 1, 2]
    assert len(bus) == 0


def test_bus_keeps_one_order_when_a_subscriber_publishes() -> None:
    bus = EventBus()
    seen: dict[str, list[float]] = {"a": [], "b": []}

    def a(event: Event) -> None:
        seen["a"].append(event.t)
        if event.t == 1:
            bus.publish(DeployFinished(t=2))

    bus.subscribe(a)
    bus.subscribe(lambda e: seen["b"].append(e.t))
    bus.publish(DeployFinished(t=1))
    assert seen == {"a": [1, 2], "b": [1, 2]}


def test_bus_from_many_threads_delivers_everything_in_one_order() -> None:
    bus = EventBus()
    a: list[Event] = []
    b: list[Event] = []
    bus.subscribe(a.append)
    bus.subscribe(b.append)

    def publish_many(k: int) -> None:
        for i in range(500):
            bus.publish(stats(f"n{k}", i))

    threads = [threading.Thread(target=publish_many, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(a) == 2000 and a == b
    for k in range(4):  # each publisher's own events stay in its order
        assert [e.t for e in a if isinstance(e, NodeStats) and e.node_id == f"n{k}"] == list(
            range(500)
        )


def test_a_rebalance_is_counted_and_told_in_one_line() -> None:
    moved = Rebalanced(measured_s=(0.0172, 0.0009), before=(12, 3), after=(1, 14),
                       predicted_s=0.0112, replayed=4, t=9.0)
    assert fold([moved, moved], DEPLOYED).rebalances == 2
    line = describe(moved)
    assert "S0 17.2 ms, S1 0.9 ms" in line and "12/3 nodes now 1/14" in line


def test_spreading_back_is_told_in_one_line_and_moves_nothing_itself() -> None:
    back = SpreadBack(joined=("c",), assignment=("a", "b", "c"), replayed=3, t=9.0)
    state = fold([back], DEPLOYED)
    assert state.recent[-1].endswith("spread back: c joined; serving again on 3 nodes "
                                     "(a, b, c), 3 requests replayed")
    assert dataclasses.replace(state, recent=DEPLOYED.recent, clock=DEPLOYED.clock) == DEPLOYED


def test_replicas_fold_by_slot_and_read_as_replica_and_stage() -> None:
    """Two replicas of two stages: four slots, each its node; a deploy whose nodes do not
    make up its shape is ignored, with why."""
    state = fold([joined(n, 1) for n in "abcd"] + [
        DeployStarted(plan_stages=2, replicas=2, assignment=("a", "b", "c", "d"), t=2),
        StageReady("d", 3, "cpu", t=3),
    ])
    assert (state.plan_stages, state.replicas, len(state.deploy)) == (2, 2, 4)
    assert state.deploy[3].status == "ready" and state.nodes["d"].stage == 3
    assert [state.slot_label(s) for s in range(4)] == ["R0·S0", "R0·S1", "R1·S0", "R1·S1"]
    assert fold([]).slot_label(1) == "S1"
    odd = apply(state, DeployStarted(plan_stages=2, replicas=2, assignment=("a", "b", "c"),
                                     t=4))
    assert odd.recent[-1].endswith("2 stages x 2 replicas but 3 nodes assigned")


def test_a_process_started_again_at_a_lost_node_s_address_replaces_it_in_the_view() -> None:
    """A node restarted where it listened joins with a new id: the lost node it replaces leaves
    the table (the log keeps its loss and the new join); one at another address stays lost,
    and one that still holds a stage of the deploy stays until a deploy moves the stage."""
    def at(node: str, t: float, port: int) -> NodeJoined:
        return dataclasses.replace(joined(node, t, name="local1"), port=port)

    state = fold([at("old", 1, 5001), at("other", 1, 5002), deploy(2, "other"), lost("old", 3),
                  at("gone", 3, 5003), lost("gone", 4)])
    assert state.node_state("old") == "lost"
    state = apply(state, at("new", 5, 5001))
    assert set(state.nodes) == {"other", "gone", "new"}
    assert state.node_state("new") == "ready" and state.node_state("gone") == "lost"
    assert state.recent[-4].endswith("node local1 lost: timeout")  # the log keeps its loss
    assert "node local1 joined" in state.recent[-1]
    # joined before the recovery's deploy moved its stage: kept until that deploy
    held = fold([at("a", 1, 5001), deploy(2, "a"), lost("a", 3), at("b", 4, 5001)])
    assert set(held.nodes) == {"a", "b"} and held.node_state("a") == "lost"
    assert set(apply(held, deploy(5, "b")).nodes) == {"b"}


def test_a_tracker_read_while_events_pour_in_sees_every_event_in_order() -> None:
    """Events are folded when the state is read (on the reader's thread, not the results
    thread that publishes them): readers on other threads, reading while a thread publishes,
    always see a prefix of the events folded in order, and at the end all of them."""
    from periphery_core.cluster.tracker import StateTracker

    bus = EventBus()
    tracker = StateTracker(bus, backlog=64)
    events: list[Event] = [joined("a", 0), deploy(0.5, "a")] + [
        done(i, 1 + i * 1e-3, 0.01 + (i % 7) * 1e-3, (0, 0.005, 0)) for i in range(3000)]
    seen: list[list[int]] = [[], []]
    stop = threading.Event()

    def read(mine: list[int]) -> None:
        while not stop.is_set():
            mine.append(tracker.state.requests_completed)

    readers = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for r in readers:
        r.start()
    for e in events:
        bus.publish(e)
    stop.set()
    for r in readers:
        r.join()
    assert tracker.state == fold(events)
    assert tracker.backlog == 0
    for mine in seen:  # each reader's reads never went back in time
        assert mine and mine == sorted(mine), mine[:20]


def test_a_tracker_nobody_reads_folds_as_events_come_past_its_backlog() -> None:
    from periphery_core.cluster.tracker import StateTracker

    bus = EventBus()
    tracker = StateTracker(bus, backlog=100)
    events: list[Event] = [joined("a", 0), deploy(0.5, "a")] + [
        done(i, 1 + i * 1e-3, 0.01, (0, 0.005, 0)) for i in range(1000)]
    for e in events:
        bus.publish(e)
        assert tracker.backlog <= 101  # memory stays bounded however long nobody looks
    assert tracker.backlog > 0  # (what came lately waits for a reader)
    assert tracker.state == fold(events) and tracker.backlog == 0
