"""A language model that fits a node runs as replicas, each sequence kept on one of them.

Real SmolLM2 from ../shared on real node processes: the planner weighs replicas against stages
on the measured decode step, the master keeps every step of a sequence on the replica whose
stage holds its caches (a step sent elsewhere would find no cache and rebuild it), the batcher
batches per replica, and `periphery generate --replicas` is the user's path.
"""

from __future__ import annotations

import json
import threading

import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.generate.engine import Generation, TextCodec, pipeline_step
from periphery_core.generate.planning import plan_shape
from periphery_core.model.analysis import analyze
from periphery_core.partition.plan import DeviceSpec
from tests.test_cli import assert_bad_input, cli, ok
from tests.test_generate import PROMPTS, SMOLLM, _decoder, _genai_greedy, at_once
from tests.waiting import wait_for


def test_the_planner_runs_a_decoder_that_fits_as_replicas_and_one_that_does_not_in_stages(
) -> None:
    loaded, spec = _decoder(SMOLLM)
    analysis = analyze(loaded)
    plan = plan_shape(loaded, analysis, [DeviceSpec(f"n{i}") for i in range(2)], decoder=spec)
    assert (plan.replicas, plan.k) == (2, 1), plan.shape_reason
    assert plan.cost_basis == "profile" and "1 x 2 stages" in plan.shape_reason
    whole = plan.stages[0].memory_bytes  # the model and its planned caches
    small = [DeviceSpec(f"n{i}", memory_bytes=int(whole * 0.7)) for i in range(2)]
    split = plan_shape(loaded, analysis, small, decoder=spec)
    assert (split.replicas, split.k) == (1, 2), split.shape_reason
    assert "2 replicas x 1 stage does not fit" in split.shape_reason


def test_sequences_stay_on_their_replica_and_match_onnxruntime_genai() -> None:
    """4 sequences at once over 2 replicas of 1 stage: both replicas serve, no step ever
    reaches a stage without its sequence's cache (none is rebuilt), the steps are batched per
    replica, and every sequence's greedy tokens are exactly onnxruntime-genai's."""
    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompts = [codec.encode(codec.prompt(p)) for p in PROMPTS[:4]]
    expected = _genai_greedy(SMOLLM, prompts, 24, spec.eos_ids)
    slots: set[int] = set()

    def on_event(e: ev.Event) -> None:
        if isinstance(e, ev.RequestCompleted):
            slots.update(t.stage for t in e.stages)

    with LocalCluster(2) as cluster, Master(keys=cluster.master_keys) as master:
        handles = [master.connect(a) for a in cluster.addresses]
        pipeline = Pipeline(master, loaded, analyze(loaded), k=1, replicas=2, exact=False,
                            decoder=spec)
        try:
            pipeline.deploy([h.node_id for h in handles])
            master.bus.subscribe(on_event)
            step = pipeline_step(pipeline, spec)
            got = at_once(step, spec, prompts, 24)
            assert step.batches > 0 and step.mean_batch > 1.0, step.mean_batch
            step.close()
        finally:
            pipeline.close()
    assert slots == {0, 1}, "both replicas served"
    results = [g for g in got if isinstance(g, Generation)]
    assert len(results) == len(prompts), got
    assert [g.rebuilt for g in results] == [0] * len(prompts)
    assert [g.ids for g in results] == expected


def test_generate_cli_runs_replicas() -> None:
    """The user's path: `periphery generate --replicas 2` starts two local nodes, one replica
    each, says so, and gives every prompt the tokens it gets alone."""
    _, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    asked = PROMPTS[:3]
    expected = _genai_greedy(SMOLLM, [codec.encode(codec.prompt(p)) for p in asked], 10,
                             spec.eos_ids)
    args = [a for p in asked for a in ("--prompt", p)]
    out = json.loads(ok("generate", SMOLLM, "--local", "--replicas", "2", *args,
                        "--max-new-tokens", "10", "--json").stdout)
    assert (out["replicas"], out["stages"]) == (2, 1)
    assert [r["ids"] for r in out["results"]] == expected
    text = ok("generate", SMOLLM, "--local", "--replicas", "2", "--prompt", asked[0],
              "--max-new-tokens", "4")
    assert "over 2 replicas of 1 stage" in text.stderr
    assert_bad_input(cli("generate", SMOLLM, "--local", "--replicas", "0", "--prompt", "hi"),
                     r"--replicas must be at least 1")


@pytest.mark.parametrize("flag", ["--shards", "--replicas"])
def test_a_plan_file_and_a_shape_are_refused_together(tmp_path, flag: str) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{}", encoding="utf-8")
    assert_bad_input(cli("generate", SMOLLM, "--plan", plan, flag, "2", "--local",
                         "--prompt", "hi"), r"give --plan or --nodes/--shards/--replicas")


def test_a_lost_replica_costs_no_sequence() -> None:
    """4 sequences at once over 2 replicas; one replica's node SIGKILLed mid-generation. The
    pipeline re-plans onto the survivor, each sequence's caches are rebuilt there, and every
    sequence ends exactly as onnxruntime-genai's."""
    loaded, spec = _decoder(SMOLLM)
    codec = TextCodec(spec.folder)
    prompts = [codec.encode(codec.prompt(p)) for p in PROMPTS[:4]]
    n = 40
    expected = _genai_greedy(SMOLLM, prompts, n, spec.eos_ids)
    with LocalCluster(2) as cluster, Master(keys=cluster.master_keys) as master:
        handles = [master.connect(a) for a in cluster.addresses]
        pipeline = Pipeline(master, loaded, analyze(loaded), k=1, replicas=2, exact=False,
                            decoder=spec, recover=True)
        try:
            pipeline.deploy([h.node_id for h in handles])
            step = pipeline_step(pipeline, spec)
            got: list[Generation | Exception] = []
            runner = threading.Thread(target=lambda: got.extend(at_once(step, spec, prompts, n)))
            runner.start()
            wait_for(lambda: step.batches >= 2, 120, "batched decode steps to start")
            cluster.kill(1)
            runner.join(timeout=240)
            assert not runner.is_alive()
            assert pipeline.failed is None and len(pipeline.recoveries) == 1
            assert pipeline.plan is not None and pipeline.plan.nodes_needed == 1
            step.close()
        finally:
            pipeline.close()
    results = [g for g in got if isinstance(g, Generation)]
    assert len(results) == len(prompts), got
    assert [g.ids for g in results] == expected
    assert sum(g.rebuilt for g in results) >= 1
