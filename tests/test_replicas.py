"""Replicas: the planner's choice of shape, the master's balance over replicas, a lost replica
recovered, and `periphery plan`/`run` with the shape the planner picked."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import zmq

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.keys import Guard
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master_data import DataPath
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.errors import PlanError
from periphery_core.generate.planning import plan_shape, replan_model
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.plan import STAGE_OVERHEAD_S, DeviceSpec, load_plan
from periphery_core.wire import Limits, decode, encode
from tests.models import mlp
from tests.streaming import count_completions, mlp_workload, save_mlp, stream

ENV_CLI = [sys.executable, "-m", "periphery_core.cli.main"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("replicas") / "mlp.onnx"
    onnx.save_model(mlp(width=64, layers=6), path)
    loaded = load_model(path)
    return loaded, analyze(loaded)


def test_a_model_that_fits_one_node_runs_as_replicas(model) -> None:
    loaded, analysis = model
    plan = plan_shape(loaded, analysis, [DeviceSpec(f"n{i}") for i in range(3)])
    assert (plan.replicas, plan.k) == (3, 1)
    assert plan.predicted_rps == pytest.approx(3 / (plan.bottleneck_s + STAGE_OVERHEAD_S))
    # the reason weighs the other shapes
    assert "1 x 3 stages" in plan.shape_reason and "3 replicas x 1 stage" in plan.shape_reason


def test_a_model_too_big_for_one_node_gets_stages_and_the_rest_replicas(model) -> None:
    loaded, analysis = model
    whole = plan_shape(loaded, analysis, [DeviceSpec("one")], k=1)
    cap = int(whole.stages[0].memory_bytes * 0.7)  # no node holds the whole model
    devices = [DeviceSpec(f"n{i}", memory_bytes=cap) for i in range(4)]
    plan = plan_shape(loaded, analysis, devices)
    assert (plan.replicas, plan.k) == (2, 2)
    assert all(s.memory_bytes <= cap for s in plan.stages)
    assert "4 replicas x 1 stage does not fit" in plan.shape_reason


def test_a_boundary_moved_by_hand_keeps_the_replicas(model) -> None:
    """Re-cutting a plan (the app's left/right, the pipeline's rebalancing) changes its cuts,
    not how many copies of it run."""
    loaded, analysis = model
    devices = [DeviceSpec(f"n{i}") for i in range(4)]
    plan = plan_shape(loaded, analysis, devices, k=2, replicas=2)
    moved = replan_model(loaded, analysis, plan, [plan.cuts[0] + 1], devices[:2])
    assert moved.cuts == [plan.cuts[0] + 1]
    assert (moved.replicas, moved.shape_reason) == (2, plan.shape_reason)


def test_forced_shapes_and_what_they_need(model) -> None:
    loaded, analysis = model
    devices = [DeviceSpec(f"n{i}") for i in range(4)]
    assert (plan_shape(loaded, analysis, devices, k=2).replicas) == 2
    assert (plan_shape(loaded, analysis, devices, replicas=2).k) == 2
    forced = plan_shape(loaded, analysis, devices, k=3, replicas=1)
    assert (forced.k, forced.replicas) == (3, 1) and "asked for" in forced.shape_reason
    with pytest.raises(PlanError, match="3 replicas x 2 stages needs 6 devices but 4"):
        plan_shape(loaded, analysis, devices, k=2, replicas=3)


def test_the_shape_survives_the_plan_file(model, tmp_path: Path) -> None:
    loaded, analysis = model
    plan = plan_shape(loaded, analysis, [DeviceSpec(f"n{i}") for i in range(2)])
    back = load_plan(plan.save(tmp_path / "plan.json"))
    assert (back.replicas, back.shape_reason) == (plan.replicas, plan.shape_reason)
    # Every replica's devices, in order: the nodes of a run are taken in that order.
    four = plan_shape(loaded, analysis, [DeviceSpec(n) for n in ("a", "b", "c", "d")], k=2,
                      replicas=2)
    assert four.device_order == ["a", "b", "c", "d"] and four.replica_devices == ("c", "d")
    for suffix in (".json", ".toml"):
        again = load_plan(four.save(tmp_path / f"four{suffix}"))
        assert again.device_order == ["a", "b", "c", "d"]
    moved = replan_model(loaded, analysis, four, [four.cuts[0] + 1])
    assert moved.device_order == ["a", "b", "c", "d"], "a moved cut keeps the devices"
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["replicas"]  # a plan written before replicas: one pipeline
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_plan(tmp_path / "old.json").replicas == 1
    data["replicas"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="replicas must be at least 1"):
        load_plan(tmp_path / "bad.json")


def test_the_master_sends_more_to_the_replica_that_answers_sooner() -> None:
    """Two first stages, real sockets: one answers at once, the other after 40 ms. The master
    keeps the fewest in flight on each, so the quick one takes most of the requests (ZeroMQ's
    round robin would split them evenly, and the slow one would set the pace)."""
    ctx, stop, bus = zmq.Context(), threading.Event(), EventBus()
    guard = Guard(ctx, None, "master")
    data = DataPath(ctx=ctx, guard=guard, bus=bus, limits=Limits(), host="127.0.0.1",
                    max_pending=64, stop=stop)
    served = [0, 0]

    def replica(index: int, pull: zmq.Socket, delay: float) -> None:
        push = ctx.socket(zmq.PUSH)
        push.connect(data.results_endpoint)
        while not stop.is_set():
            if not pull.poll(50):
                continue
            msg = decode(pull.recv_multipart(), Limits())
            time.sleep(delay)
            served[index] += 1
            push.send_multipart(encode("result", {"id": msg.fields["id"], "times": [],
                                                  "epoch": msg.fields["epoch"]}, msg.tensors))
        push.close(linger=0)

    pulls = [ctx.socket(zmq.PULL) for _ in range(2)]
    ports = [p.bind_to_random_port("tcp://127.0.0.1") for p in pulls]
    threads = [threading.Thread(target=replica, args=(i, pulls[i], delay), daemon=True)
               for i, delay in enumerate((0.0, 0.04))]
    results = threading.Thread(target=data.run, daemon=True)
    try:
        for t in (*threads, results):
            t.start()
        data.connect_first([(f"tcp://127.0.0.1:{port}", None) for port in ports])
        slots = threading.Semaphore(4)  # 4 in flight, a new one as soon as any completes
        futures = []
        for i in range(80):
            assert slots.acquire(timeout=10)
            futures.append(data.submit({"x": np.full((2,), i, np.float32)}))
            futures[-1].add_done_callback(lambda _: slots.release())
        assert [f.result(timeout=10)["x"][0] for f in futures] == list(range(80))
    finally:
        stop.set()
        for t in (*threads, results):
            t.join(timeout=5)
        guard.close()
        ctx.destroy(linger=0)  # closes every socket
    assert sum(served) == 80
    assert served[0] > 4 * served[1], served
    print(f"\nserved: quick replica {served[0]}, slow replica {served[1]}")


def test_a_decoder_sequence_stays_on_the_replica_that_holds_its_caches() -> None:
    """Real sockets, two first stages that only count what reaches them: a sequence's steps
    (its prefill, then batched steps naming it) all go where its first went, new sequences
    go to the replica holding fewer, and a released sequence or a new deploy starts afresh."""
    ctx, stop, bus = zmq.Context(), threading.Event(), EventBus()
    guard = Guard(ctx, None, "master")
    data = DataPath(ctx=ctx, guard=guard, bus=bus, limits=Limits(), host="127.0.0.1",
                    max_pending=64, stop=stop)
    pulls = [ctx.socket(zmq.PULL) for _ in range(2)]
    ports = [p.bind_to_random_port("tcp://127.0.0.1") for p in pulls]
    ids = {"x": np.zeros((1, 1), np.int64)}

    def landed(step: dict) -> int:
        """Submit one step; the replica whose first stage received it."""
        data.submit(ids, step)
        poller = zmq.Poller()
        for p in pulls:
            poller.register(p, zmq.POLLIN)
        ready = [pulls.index(p) for p, _ in poller.poll(5000)]
        assert len(ready) == 1, ready
        pulls[ready[0]].recv_multipart()
        return ready[0]

    try:
        data.connect_first([(f"tcp://127.0.0.1:{port}", None) for port in ports])
        first = {seq: landed({"seq": seq, "pos": 0, "new": 3}) for seq in (1, 2, 3, 4)}
        assert sorted(first.values()) == [0, 0, 1, 1], "new sequences spread over replicas"
        for seq in (1, 2, 3, 4):  # a sequence's steps in a row: the same replica each time
            for pos in range(3, 6):
                assert landed({"seq": seq, "pos": pos, "new": 1}) == first[seq]
        pair = [s for s in (1, 2, 3, 4) if first[s] == first[1]]
        assert landed({"seqs": pair, "poss": [6, 6]}) == first[1]
        assert data.replica_of(1) == first[1]
        data.forget([1])
        assert data.replica_of(1) is None and data.replica_of(2) == first[2]
        data.new_epoch()
        assert all(data.replica_of(s) is None for s in (1, 2, 3, 4)), "a deploy drops caches"
        one_by_one = []  # sequences one after another (a chat): they take turns
        for seq in (10, 11, 12, 13):
            one_by_one.append(landed({"seq": seq, "pos": 0, "new": 2}))
            data.forget([seq])
        assert sorted(one_by_one) == [0, 0, 1, 1], one_by_one
    finally:
        stop.set()
        guard.close()
        ctx.destroy(linger=0)


def test_replicas_serve_and_a_lost_one_costs_no_request(tmp_path: Path) -> None:
    work = mlp_workload(tmp_path, seed=3, inputs=20)
    total = 400
    with LocalCluster(2) as local, local.master() as master:
        pipeline = Pipeline(master, work.loaded, work.analysis, exact=True)  # shape: planner's
        plan = pipeline.deploy()
        assert (plan.replicas, plan.k) == (2, 1)
        slots: set[int] = set()
        master.bus.subscribe(lambda e: slots.update(t.stage for t in e.stages)
                             if isinstance(e, ev.RequestCompleted) else None)
        completions = count_completions(master.bus)

        def kill(i: int) -> None:
            if i == 150:
                assert slots == {0, 1}, "both replicas served before the loss"
                local.kill(1)

        results = stream(pipeline, work.pool, total, 16, kill)
        pipeline.close()
        assert pipeline.failed is None
        (rec,) = pipeline.recoveries
        assert rec.lost_nodes == ("local1",) and rec.stages == 1
        assert pipeline.assignment == (local.addresses[0].node_id,)
    assert len(completions) == total and set(completions.values()) == {1}
    work.assert_matches(results)


def test_periphery_plan_picks_replicas_and_run_serves_them(tmp_path: Path) -> None:
    model_path = save_mlp(tmp_path / "mlp.onnx")
    plan_path = tmp_path / "plan.json"
    done = subprocess.run([*ENV_CLI, "plan", model_path, "--nodes", "2", "-o", plan_path],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "shape 2 replicas x 1 stage" in done.stdout
    run = subprocess.run([*ENV_CLI, "run", model_path, "--plan", plan_path, "--local",
                          "--requests", "120", "--inflight", "8", "--check", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["shape"] == "2 replicas x 1 stage"
    assert summary["completed"] == 120 and summary["check"]["passed"]
    assert [(s["replica"], s["stage"]) for s in summary["stages"]] == [(0, 0), (1, 0)]
    assert all(s["compute_s"] is not None for s in summary["stages"]), "both replicas served"
    bad = subprocess.run([*ENV_CLI, "plan", model_path, "--nodes", "2", "--replicas", "3",
                          "-o", plan_path], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: 3 replicas x 1 stage needs")
