"""Recovery: a node killed mid-stream costs no request, duplicates none, changes no result."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from tests.streaming import count_completions, mlp_workload, stream


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
