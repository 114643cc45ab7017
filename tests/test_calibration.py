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


def test_a_model_random_inputs_cannot_stand_in_for_is_planned_on_estimates(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence input: random data cannot stand in for it, so the model is not run here;
    it is planned on its estimates, and not tried again at the next plan (a recovery's)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("SequenceAt", ["s", "zero"], ["t"]),
         helper.make_node("Relu", ["t"], ["y"])], "seq",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    path = tmp_path / "seq.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=8), path)
    loaded = load_model(path)
    analysis = analyze(loaded)
    tries: list[int] = []
    measure = planning._measure_scale
    monkeypatch.setattr(planning, "_measure_scale",
                        lambda *a: tries.append(1) or measure(*a))
    assert plan_model(loaded, analysis, 1).cost_basis == "estimate"
    assert plan_model(loaded, analysis, 1).cost_basis == "estimate"
    assert calibrated(loaded, analysis).cost_scale is None and tries == [1]


def test_a_pipeline_deployed_from_a_plan_measures_the_model_before_it_serves(tmp_path) -> None:
    """A plan from a file needs no planning to deploy, but a recovery re-plans: the model's
    run is timed at the deploy, so that a recovery does not spend that time with requests
    held."""
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.pipeline import Pipeline
    from periphery_core.partition.planner import make_plan
    from periphery_core.runtime.feeds import random_feeds

    path = tmp_path / "mlp.onnx"
    onnx.save_model(models.mlp(width=40, layers=4), path)
    loaded = load_model(path)
    analysis = analyze(loaded)
    plan = make_plan(analysis, 1)  # on estimates, as a plan file made elsewhere may be
    with LocalCluster(1) as local, local.master() as master:
        pipeline = Pipeline(master, loaded, analysis, plan=plan)
        pipeline.deploy()
        assert pipeline.plan == plan  # the plan given, as it was
        assert pipeline.analysis.cost_scale is not None  # and the model measured
        assert pipeline.analysis.cost_scale == calibrated(loaded, analysis).cost_scale
        feeds = random_feeds(analysis.inputs)
        assert set(pipeline.submit(feeds).result(timeout=60)) == set(analysis.outputs)
        pipeline.close()
