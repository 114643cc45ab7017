"""A model is planned on its FLOP estimates scaled to its own timed run (`generate.planning`):
real ONNX Runtime runs of real models, no timing asserted (what the predictions come to
against a served rate is `benchmarks/predictions.py`'s table)."""

from __future__ import annotations

import onnx
import pytest

from periphery_core.generate import planning
from periphery_core.generate.planning import calibrated, plan_model, plan_shape
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.plan import STAGE_OVERHEAD_S, DeviceSpec
from periphery_core.partition.planning_graph import node_cost_s
from tests import models


def _estimate_s(analysis) -> float:
    """The model's estimated seconds on the reference device (constants cost nothing)."""
    return sum(node_cost_s(n) for n in analysis.nodes if n.key not in analysis.constant_nodes)


@pytest.fixture
def misleading(tmp_path):
    """Sorts whose FLOPs say little of their time, then MatMuls."""
    path = tmp_path / "misleading.onnx"
    onnx.save_model(models.misleading_costs(n=4096), path)
    loaded = load_model(path)
    return loaded, analyze(loaded)


def test_every_plan_of_a_model_is_costed_on_its_measured_scale(misleading) -> None:
    loaded, analysis = misleading
    assert analysis.cost_scale is None  # the analysis alone measures nothing
    scaled = calibrated(loaded, analysis)
    assert scaled.cost_scale is not None and scaled.cost_scale > 0
    assert calibrated(loaded, analysis).cost_scale == scaled.cost_scale  # measured once, kept
    device = DeviceSpec("d", speed=4.0)
    plan = plan_model(loaded, analysis, 1, devices=[device])
    assert plan.cost_basis == "calibrated"
    assert plan.stages[0].compute_s == pytest.approx(
        _estimate_s(analysis) * scaled.cost_scale / device.speed)
    # the shape the planner weighs predicts from the same costs, with each stage's fixed cost
    shaped = plan_shape(loaded, analysis, [device, DeviceSpec("e", speed=4.0)])
    assert shaped.shape == "2 replicas x 1 stage"
    assert shaped.predicted_rps == pytest.approx(2 / (plan.bottleneck_s + STAGE_OVERHEAD_S))
    # cuts moved by hand are costed the same way
    two = plan_model(loaded, analysis, 2, devices=[device, device])
    moved = planning.replan_model(loaded, analysis, two, [two.cuts[0] + 1], [device, device])
    assert moved.cost_basis == "calibrated"
    assert sum(s.compute_s for s in moved.stages) == pytest.approx(plan.stages[0].compute_s)


def test_a_profiled_plan_keeps_its_measured_costs(misleading) -> None:
    from periphery_core.model.profile import profile_model

    loaded, analysis = misleading
    profiled = profile_model(loaded, analysis, runs=2)
    plan = plan_model(loaded, profiled, 1, use_profile=True)
    assert plan.cost_basis == "profile"
    assert plan.stages[0].compute_s == pytest.approx(
        sum(n.measured_s or 0.0 for n in profiled.nodes))


def test_a_model_too_big_to_run_on_the_master_keeps_its_estimates(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "CALIBRATE_MAX_BYTES", 0)
    path = tmp_path / "mlp.onnx"
    onnx.save_model(models.mlp(width=48, layers=3), path)
    loaded = load_model(path)
    analysis = analyze(loaded)
    assert calibrated(loaded, analysis).cost_scale is None
    plan = plan_model(loaded, analysis, 1)
    assert plan.cost_basis == "estimate"
    assert plan.stages[0].compute_s == pytest.approx(_estimate_s(analysis))
    assert "times are FLOP estimates, on reference machines" in plan.cost_note
