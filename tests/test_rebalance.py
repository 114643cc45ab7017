"""Balance by measurement: a plan made on wrong estimates is moved toward balance on the nodes'
measured stage compute, while serving, losing no request.

The model (`tests.models.misleading_costs`) sorts a vector four times and then multiplies
matrices; the FLOP estimates call the sorts nearly free, so the plan on estimates gives one
stage the sorts and half the MatMuls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from periphery_core.cluster.rebalance import imbalance, measured_plan
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze, with_measurements
from periphery_core.partition.planner import make_plan, replan_with_cuts
from tests.models import misleading_costs
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def misleading(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rebalance") / "misleading.onnx"
    onnx.save_model(misleading_costs(), path)
    return path


def _sort_heavy_profile(analysis):
    """The model's nodes as they really cost: each sort 4 ms, each MatMul 0.3 ms."""
    return with_measurements(analysis, {
        n.key: 4e-3 if n.op_type == "TopK" else 3e-4 if n.op_type == "MatMul" else 1e-5
        for n in analysis.nodes})


def test_measured_compute_moves_the_cut_to_where_the_time_is(misleading: Path) -> None:
    analysis = analyze(load_model(misleading))
    plan = make_plan(analysis, 2)  # on estimates: the sorts and half the MatMuls in stage 0
    assert sum(n.startswith("sort") for n in plan.stages[0].nodes) == 4
    profile = _sort_heavy_profile(analysis)
    real = [sum(profile.nodes[analysis.nodes.index(n)].measured_s or 0.0
                for n in analysis.nodes if n.key in s.nodes) for s in plan.stages]
    assert imbalance(real) > 0.5
    moved = measured_plan(analysis, plan, real, profile)
    assert moved is not None and moved.strategy == "balanced"
    # Two sorts a side is the balance: 8 ms | 8 ms + the MatMuls.
    assert [sum(n.startswith("sort") for n in s.nodes) for s in moved.stages] == [2, 2]
    assert max(s.compute_s for s in moved.stages) < 0.6 * max(real)
    # Without a profile the estimates divide a stage's time: a move the right way all the same.
    blind = measured_plan(analysis, plan, real)
    assert blind is not None and len(blind.stages[0].nodes) < len(plan.stages[0].nodes)


def test_balanced_stages_and_plans_cut_by_hand_stay_as_they_are(misleading: Path) -> None:
    analysis = analyze(load_model(misleading))
    plan = make_plan(analysis, 2)
    profile = _sort_heavy_profile(analysis)
    assert measured_plan(analysis, plan, [0.0100, 0.0095], profile) is None  # within 10%
    # Uneven, but the stages cost less than a hop: moving would save microseconds.
    assert measured_plan(analysis, plan, [0.0004, 0.0001], profile) is None
    by_hand = replan_with_cuts(analysis, plan, [5])
    assert by_hand.strategy == "manual"
    assert measured_plan(analysis, by_hand, [0.016, 0.002], profile) is None


def test_periphery_run_rebalances_while_serving_and_loses_no_request(
        misleading: Path, tmp_path: Path) -> None:
    """The user's path: plan on estimates, `periphery run --local --check`; the run moves the
    cut on what the nodes measured, says so on stderr, and every request is answered right."""
    cli = [sys.executable, "-m", "periphery_core.cli.main"]
    plan = tmp_path / "plan.json"
    subprocess.run([*cli, "plan", str(misleading), "--shards", "2", "-o", str(plan)],
                   check=True, capture_output=True, timeout=120)
    out = subprocess.run([*cli, "run", str(misleading), "--plan", str(plan), "--local",
                          "--requests", "400", "--check", "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["completed"] == 400 and summary["check"]["passed"]
    first = summary["rebalances"][0]
    assert first["after"][0] < first["before"][0]  # stage 0 gave nodes to stage 1
    assert "rebalanced on measured compute" in out.stderr
    final = [s["compute_s"] for s in summary["stages"]]
    # Closer to balance (not a time: the two stages now share this machine's cores in earnest).
    assert imbalance(final) < 0.5 * imbalance(first["measured_s"])


def test_a_rebalance_due_when_a_redeploy_reset_the_measurements_waits_for_new_ones(
        misleading: Path) -> None:
    """A move falls due (48 requests measured) and a redeploy lands before the pipeline's
    thread looks: nothing is measured on the new stages yet, so it does nothing and the thread
    lives on (it died on an empty list, and with it the pipeline's recovery: seen in the app's
    demo, a node killed while a rebalance fell due)."""
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.pipeline import Pipeline

    loaded = load_model(misleading)
    analysis = analyze(loaded)
    plan = make_plan(analysis, 2)
    with LocalCluster(2) as local, local.master() as master:
        pipeline = Pipeline(master, loaded, analysis, plan=plan)
        try:
            pipeline.deploy([a.node_id for a in local.addresses])
            assert pipeline._meter.medians() == []  # (just deployed: nothing measured)
            pipeline._rebalance_due.set()
            pipeline._wake.set()
            wait_for(lambda: not pipeline._rebalance_due.is_set(), 10, "the thread to look")
            pipeline._recoverer.join(timeout=1.0)  # (it ends only with the pipeline)
            assert pipeline._recoverer.is_alive() and pipeline.plan is plan
        finally:
            pipeline.close()
