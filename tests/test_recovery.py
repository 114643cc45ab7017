"""Recovery: a node killed mid-stream costs no request, duplicates none, changes no result."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster import master_control
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from tests.streaming import count_completions, mlp_workload, stream
from tests.waiting import wait_for


@pytest.mark.parametrize(("victim", "workers"), [(1, None), (0, None), (1, 3)],
                         ids=["middle-stage", "first-stage", "nodes-computing-3-at-once"])
def test_a_killed_node_costs_no_request(tmp_path: Path, victim: int, workers: int | None
                                        ) -> None:
    """With nodes computing several requests at once (`--workers`), the redeploy rewires every
    worker, and whatever a worker still holds for the old pipeline is dropped and replayed."""
    work = mlp_workload(tmp_path, seed=1, inputs=25)
    total = 500
    with LocalCluster(3, workers=workers) as local, local.master() as master:
        pipeline = Pipeline(master, work.loaded, work.analysis, k=3, exact=True)
        pipeline.deploy([a.node_id for a in local.addresses])
        victim_id = local.addresses[victim].node_id
        lost_at: list[float] = []
        master.bus.subscribe(lambda e: lost_at.append(e.t)
                             if isinstance(e, ev.NodeLost) else None)
        completions = count_completions(master.bus)
        killed_at: list[float] = []

        def kill(i: int) -> None:
            if i == 150:
                local.kill(victim)
                killed_at.append(time.time())

        results = stream(pipeline, work.pool, total, 16, kill)
        pipeline.close()
        assert pipeline.failed is None
        assert len(pipeline.recoveries) == 1
        rec = pipeline.recoveries[0]
        detect = lost_at[0] - killed_at[0]
        print(f"\nkilled stage {victim}: lost after {detect:.2f} s, serving again "
              f"{rec.recovered_s:.2f} s later on {rec.stages} stages, {rec.replayed} replayed")
        assert rec.lost_nodes == (f"local{victim}",) and rec.stages == 2
        assert victim_id not in pipeline.assignment
    assert len(results) == total
    assert len(completions) == total and set(completions.values()) == {1}
    work.assert_matches(results)


@contextlib.contextmanager
def restarting(local: LocalCluster, index: int, at: int,
               pause_s: float = 0.0) -> Iterator[Callable[[int], None]]:
    """A `stream` hook that, before request `at`, kills node `index` and, `pause_s` later on a
    thread of its own (the stream goes on meanwhile), starts it again at its address
    (`LocalCluster.restart`, which the cluster's stop then stops)."""
    started: list[threading.Thread] = []

    def again() -> None:
        time.sleep(pause_s)
        local.restart(index)

    def restart(i: int) -> None:
        if i == at:
            local.kill(index)
            started.append(threading.Thread(target=again, daemon=True))
            started[-1].start()

    try:
        yield restart
    finally:
        for t in started:
            t.join(60)


def test_a_pipeline_left_on_fewer_nodes_spreads_back_when_the_node_restarts(
        tmp_path: Path) -> None:
    """Two nodes, K = 2; one is killed mid-stream and started again at its address a second
    later (as systemd would). The pipeline recovers onto the survivor, the new process joins
    as a node of its own, and the pipeline spreads back over two nodes while serving: no
    request lost, every result the whole model's."""
    work = mlp_workload(tmp_path, seed=5, inputs=20)
    with LocalCluster(2) as local, local.master() as master, \
            restarting(local, 1, at=100, pause_s=1.0) as restart:
        pipeline = Pipeline(master, work.loaded, work.analysis, k=2, exact=True)
        before = [a.node_id for a in local.addresses]
        pipeline.deploy(before)
        back: list[ev.SpreadBack] = []
        master.bus.subscribe(lambda e: back.append(e) if isinstance(e, ev.SpreadBack) else None)
        results = stream(pipeline, work.pool, 300, 8, restart)
        assert len(pipeline.recoveries) == 1
        wait_for(lambda: len(pipeline.assignment) == 2 and pipeline.assignment[0] == before[0]
                 and pipeline.assignment[1] not in before, 30,
                 "the pipeline to spread back over the restarted node")
        assert pipeline.plan is not None and pipeline.plan.k == 2
        assert pipeline.assignment[1] == local.addresses[1].node_id  # the new process
        assert [(e.joined, e.assignment) for e in back] == [(("local1",), ("local0", "local1"))]
        results += stream(pipeline, work.pool, 100, 8)
        pipeline.close()
        assert pipeline.failed is None and len(pipeline.recoveries) == 1
    assert len(results) == 400
    work.assert_matches(results)


def test_a_node_restarted_at_its_address_costs_no_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node process killed and started again at the same address, quicker than its closed
    connection or its silence would lose it (both made to take half a minute here), answers
    the master's pings as another process: the master loses the old node on that answer, the
    pipeline recovers onto the others, and the new process joins as a node of its own. Before,
    those answers kept the old node alive, and every request waited for a stage no process
    ran."""
    monkeypatch.setattr(master_control, "GONE_S", 30.0)
    work = mlp_workload(tmp_path, seed=2, inputs=25)
    total = 300
    with LocalCluster(3) as local, local.master(lost_after_s=30.0) as master, \
            restarting(local, 0, at=100) as restart:
        pipeline = Pipeline(master, work.loaded, work.analysis, k=2, exact=True)
        before = [a.node_id for a in local.addresses]
        pipeline.deploy(before[:2])
        lost: list[ev.NodeLost] = []
        master.bus.subscribe(lambda e: lost.append(e) if isinstance(e, ev.NodeLost) else None)
        results = stream(pipeline, work.pool, total, 8, restart)
        pipeline.close()
        assert pipeline.failed is None and len(pipeline.recoveries) == 1
        assert [e.node_id for e in lost] == [before[0]]
        assert "another process answers at its address" in lost[0].reason
        assert before[0] not in pipeline.assignment
        # ... and the new process joins as a node of its own, ready for the next plan.
        wait_for(lambda: any(h.node_id not in before and h.address.port ==
                             local.addresses[0].port for h in master.alive_nodes()), 20,
                 "the restarted process to join as a new node")
        assert before[0] not in {h.node_id for h in master.alive_nodes()}
    assert len(results) == total
    work.assert_matches(results)
