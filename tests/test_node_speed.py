"""Node speed calibration: robust figures, unknown until measured, late figures reach the plan."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster import node as node_module
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.node import NodeConfig, NodeDaemon
from periphery_core.cluster.speeds import (
    EQUAL_SPEED,
    NodeSpeed,
    parse_speed,
    planning_speeds,
)
from periphery_core.cluster.state import ClusterState, fold
from periphery_core.discovery import NodeAddress
from tests.waiting import wait_for

# ------------------------------------------------------------------ the pure decision

CPU = "Intel Xeon"
ARM = "Cortex-A72"


@pytest.mark.parametrize(
    ("nodes", "speeds", "warns"),
    [
        ([], (), None),
        ([("a", CPU, 8, 2.0)], (2.0,), None),
        # identical hardware, figures agree: trusted
        ([("a", CPU, 8, 2.0), ("b", CPU, 8, 2.9)], (2.0, 2.9), None),
        ([("a", CPU, 8, 2.0), ("b", CPU, 8, 3.0)], (2.0, 3.0), None),  # exactly 1.5x
        # identical hardware, spread over 1.5x: noise, equal speeds
        ([("a", CPU, 8, 0.5), ("b", CPU, 8, 7.62), ("c", CPU, 8, 4.06)],
         (1.0, 1.0, 1.0), "15.24x apart"),
        ([("a", CPU, 8, 2.0), ("b", CPU, 8, 3.1)], (1.0, 1.0), "1.55x apart"),
        # different hardware may differ as much as it likes
        ([("a", CPU, 8, 1.0), ("b", ARM, 4, 8.0)], (1.0, 8.0), None),
        ([("a", CPU, 8, 1.0), ("b", CPU, 16, 8.0)], (1.0, 8.0), None),
        # one identical pair disagrees: nothing is trusted
        ([("a", CPU, 8, 1.0), ("b", CPU, 8, 4.0), ("c", ARM, 4, 0.3)],
         (1.0, 1.0, 1.0), "identical hardware (Intel Xeon, 8 cores)"),
        # unknown (None), zero or nonsense: equal speeds
        ([("a", CPU, 8, 2.0), ("b", CPU, 8, None)], (1.0, 1.0), "speed of b not measured"),
        ([("a", CPU, 8, 0.0), ("b", ARM, 4, 3.0)], (1.0, 1.0), "speed of a not measured"),
        ([("a", CPU, 8, float("nan")), ("b", ARM, 4, 3.0)], (1.0, 1.0), "speed of a"),
        ([("a", CPU, 8, None)], (1.0,), "speed of a not measured"),
    ],
)
def test_planning_speeds(nodes: list[tuple[str, str, int, float | None]],
                         speeds: tuple[float, ...], warns: str | None) -> None:
    got = planning_speeds([NodeSpeed(*n) for n in nodes])
    assert got.speeds == pytest.approx(speeds)
    if warns is None:
        assert got.warning is None
    else:
        assert got.warning is not None and warns in got.warning
        assert "equal speeds" in got.warning


@pytest.mark.parametrize(
    ("value", "speed"),
    [(2.5, 2.5), (3, 3.0), (0.0, None), (0, None), (-1.0, None), (None, None), ("2", None),
     (True, None), (float("inf"), None), (float("nan"), None)],
)
def test_parse_speed(value: Any, speed: float | None) -> None:
    assert parse_speed(value) == speed


def test_equal_speed_is_one() -> None:
    assert EQUAL_SPEED == 1.0


# ------------------------------------------------------------------ real nodes


def test_three_identical_local_nodes_report_consistent_speeds() -> None:
    t0 = time.monotonic()
    with LocalCluster(3, secure=False) as local:
        started_s = time.monotonic() - t0
        master = local.master()
        try:
            handles = list(master.nodes.values())
            assert len(handles) == 3
            # Measured before the node serves: known at hello already (a late one would come
            # with the stats, so wait with a deadline rather than insist).
            wait_for(lambda: all(h.speed is not None for h in handles), 20, "all speeds")
            speeds = [h.speed for h in handles]
            assert all(s is not None and s > 0 for s in speeds), speeds
            lo, hi = min(s for s in speeds if s), max(s for s in speeds if s)
            assert hi <= 1.5 * lo, f"identical nodes measured {speeds}"
            assert {(h.device, h.cores) for h in handles} == {(handles[0].device,
                                                               handles[0].cores)}
            # Trusted: the plan uses the figures themselves.
            assert [d.speed for d in master.devices()] == speeds
        finally:
            master.close()
    # Three nodes measuring at once on shared cores still start promptly.
    assert started_s < 20, started_s


@pytest.fixture
def late_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[NodeDaemon, threading.Event]]:
    """An in-process node whose first measurement fails, so its speed is unknown at hello; the
    next one (after `release` is set) measures 2.5x and reaches the master through `stats`."""
    release = threading.Event()

    def measure(**_: Any) -> float:
        if not release.is_set():
            raise RuntimeError("benchmark unavailable (test)")
        return 2.5

    monkeypatch.setattr(node_module, "measure_speed", measure)
    monkeypatch.setattr(node_module, "CALIBRATE_AT_S", (0.2,))
    monkeypatch.setattr(node_module, "CALIBRATE_RETRY_S", 0.2)
    daemon = NodeDaemon(NodeConfig(name="late", advertise=False, stats_interval_s=0.2))
    daemon.start()
    serving = threading.Thread(target=daemon.serve_forever, daemon=True)
    serving.start()
    try:
        yield daemon, release
    finally:
        daemon.halt()
        serving.join(5)
        daemon._stop.clear()  # let stop() close what serve_forever left
        daemon.stop()


def test_a_speed_that_arrives_after_join_updates_the_master_and_the_plan(
        late_node: tuple[NodeDaemon, threading.Event]) -> None:
    daemon, release = late_node
    assert daemon.speed is None
    events: list[ev.Event] = []
    with Master() as master:
        master.bus.subscribe(events.append)
        port = int(daemon.control_endpoint.rsplit(":", 1)[1])
        handle = master.connect(NodeAddress(node_id="x", name="late", host="127.0.0.1",
                                            port=port, properties={}, source="static"))
        # Unknown is not a number: no zero, and the plan does not use it.
        assert handle.speed is None
        joined = [e for e in events if isinstance(e, ev.NodeJoined)]
        assert joined and joined[0].speed is None
        assert [d.speed for d in master.devices()] == [1.0]

        release.set()
        wait_for(lambda: master.nodes[handle.node_id].speed == 2.5, 15, "the late speed")
        assert [d.speed for d in master.devices()] == [2.5]
        wait_for(lambda: any(isinstance(e, ev.NodeStats) and e.speed == 2.5
                             for e in list(events)), 5, "a NodeStats with the speed")
        state = fold(list(events), ClusterState.empty())
        assert state.nodes[handle.node_id].speed == 2.5


def test_a_node_started_no_recalibrate_measures_once_and_never_while_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(node_module, "measure_speed", lambda: calls.append(1.0) or 1.0)
    monkeypatch.setattr(node_module, "CALIBRATE_AT_S", (0.05, 0.1))
    # the host counts as idle however busy the suite's other worker keeps it: the flag, not
    # the host's load, is what decides here
    monkeypatch.setattr(node_module, "IDLE_CPU_PERCENT", 101.0)
    threads: dict[bool, list[str]] = {}
    for recalibrate in (True, False):
        calls.clear()
        daemon = NodeDaemon(NodeConfig(name="n", advertise=False, recalibrate=recalibrate))
        daemon.start()
        try:
            threads[recalibrate] = [t.name for t in daemon._threads]
            if recalibrate:
                wait_for(lambda: len(calls) >= 2, 10, "a measurement while idle")
            else:
                time.sleep(1.5)  # past every CALIBRATE_AT_S (and its jitter), idle
                assert calls == [1.0], "a node started --no-recalibrate measured again"
        finally:
            daemon.halt()
            daemon.stop()
    assert "node-calibrate" in threads[True] and "node-calibrate" not in threads[False]
    # ... and the flag reaches a node process: a local cluster starts with it
    with LocalCluster(1, recalibrate=False, secure=False) as local, local.master() as master:
        assert len(master.alive_nodes()) == 1
