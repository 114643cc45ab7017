"""A node that computes several requests at once (`periphery-node --workers N`).

Real node processes: the stage's compute intervals, as the nodes stamp them, overlap with two
workers and never with one, and never more than the workers; results stay those of the
unsharded model; a decoder's stage keeps its steps in order whatever the workers; `run
--local --workers` and `periphery-node --workers` as a user types them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.node_data import default_workers, run_threads
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.cluster.rebalance import per_worker
from periphery_core.generate.engine import pipeline_step, whole_model_step
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.feeds import random_feeds
from periphery_core.units import device_text
from tests.test_cli import assert_bad_input, cli, ok
from tests.test_generate import GPT2, _decoder, _greedy, at_once

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-resnet.onnx"


def test_workers_share_out_a_cpu_s_threads_and_default_by_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_workers("cpu") == 1
    assert run_threads(8, 2, "cpu") == 4 and run_threads(3, 2, "cpu") == 1
    assert run_threads(2, 1, "cpu") == 2 and run_threads(0, 1, "cpu") == 0  # ORT's default
    assert run_threads(0, 64, "cpu") == 1  # every core, shared out, at least one each
    # `--device cuda` with an ONNX Runtime that has no CUDA runs on the CPU: as a CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_workers("cuda:1") == 1 and run_threads(8, 2, "cuda") == 4
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_workers("cuda:1") == 4 and default_workers("cpu") == 1
    assert run_threads(8, 4, "cuda") == 8  # on a GPU the threads run what CUDA lacks


def test_a_stage_computing_two_at_once_balances_as_half_its_compute() -> None:
    assert per_worker([0.010, 0.006], [2, 1]) == [0.005, 0.006]


def _intervals(events: list[ev.RequestCompleted]) -> list[tuple[float, float]]:
    """Each request's compute on its one stage, in the master's clock (the node's end stamp
    is its send, less the encoding: within a few microseconds)."""
    out = []
    for e in events:
        (stage,) = e.stages
        end = e.t - stage.transfer_s
        out.append((end - stage.compute_s, end))
    return out


def _most_at_once(intervals: list[tuple[float, float]], slack: float) -> int:
    """The most intervals that overlap at one instant (touching within `slack` is not)."""
    marks = sorted([(a + slack, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                   key=lambda m: (m[0], m[1]))
    most = now = 0
    for _, step in marks:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize("workers", [1, 2])
def test_a_node_computes_as_many_requests_at_once_as_it_has_workers(workers: int) -> None:
    loaded = load_model(DEMO)
    analysis = analyze(loaded)
    feeds = [random_feeds(analysis.inputs, seed=i) for i in range(4)]
    reference = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    expected = [reference.run(None, f)[0] for f in feeds]
    done: list[ev.RequestCompleted] = []
    joined: list[ev.NodeJoined] = []
    with LocalCluster(1, threads=2, workers=workers) as local, \
            Master(keys=local.master_keys) as master:
        master.bus.subscribe(lambda e: joined.append(e) if isinstance(e, ev.NodeJoined) else None)
        handles = [master.connect(a) for a in local.addresses]
        assert [h.workers for h in handles] == [workers]  # as the node said in its hello
        # the event the app's Cluster screen logs says so too
        (said,) = [ev.describe(e) for e in joined]
        assert (f", {workers} at once)" in said) == (workers > 1), said
        pipeline = Pipeline(master, loaded, analysis, plan=make_plan(analysis, 1),
                            rebalance=False)
        pipeline.deploy([handles[0].node_id])
        master.bus.subscribe(lambda e: done.append(e) if isinstance(
            e, ev.RequestCompleted) else None)
        got = list(pipeline.run_many((feeds[i % 4] for i in range(24)), inflight=8))
        pipeline.close()
    for i, out in enumerate(got):
        np.testing.assert_allclose(next(iter(out.values())), expected[i % 4], rtol=1e-4,
                                   atol=1e-4)
    assert len(done) == 24
    # A run takes milliseconds; what is not computed at once is apart by far more than the
    # half millisecond allowed for the clocks read between the stamps.
    assert _most_at_once(_intervals(done), slack=5e-4) == workers


def test_a_decoder_stage_takes_its_steps_in_order_whatever_the_workers() -> None:
    loaded, spec = _decoder(GPT2)
    prompts = [[5, 9, 2, 7], [11, 3, 8, 1, 6], [4, 4, 12]]
    reference = whole_model_step(loaded, spec, exact=False)
    expected = [_greedy(reference, spec, ids, 8) for ids in prompts]
    with LocalCluster(1, workers=3) as local, Master(keys=local.master_keys) as master:
        handles = [master.connect(a) for a in local.addresses]
        pipeline = Pipeline(master, loaded, analyze(loaded), k=1, exact=False, decoder=spec)
        pipeline.deploy([handles[0].node_id])
        step = pipeline_step(pipeline, spec)
        got = at_once(step, spec, prompts, 8)  # several steps in flight to the one stage
        pipeline.close()
    assert [g.ids if not isinstance(g, Exception) else g for g in got] == expected


def test_run_local_workers_as_a_user_types_it(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    ok("plan", DEMO, "--shards", "1", "-o", plan)
    out = json.loads(ok("run", DEMO, "--plan", plan, "--local", "--workers", "2", "-n", "16",
                        "-m", "8", "--check", "--json").stdout)
    assert out["check"]["passed"] and out["check"]["mismatches"] == 0
    assert [s["workers"] for s in out["stages"]] == [2]
    table = ok("run", DEMO, "--plan", plan, "--local", "--workers", "2", "-n", "4").stdout
    assert "CPU, 2 at once" in table
    assert_bad_input(cli("run", DEMO, "--plan", plan, "--workers", "2"),
                     r"--workers sets the --local nodes' workers: give it with --local")
    assert_bad_input(cli("run", DEMO, "--plan", plan, "--local", "--workers", "0"),
                     r"--workers")


def test_cluster_ls_says_how_many_requests_each_node_computes_at_once(tmp_path: Path) -> None:
    devices = tmp_path / "devices.toml"
    with LocalCluster(1, workers=3) as local:
        (a,) = local.addresses
        rows = json.loads(ok("cluster", "ls", "--no-mdns", "--json", "--keys",
                             local.keys_dir / "master", "--peer", f"{a.host}:{a.port}").stdout)
        table = ok("cluster", "ls", "--no-mdns", "--keys", local.keys_dir / "master", "--peer",
                   f"{a.host}:{a.port}", "--write-devices", devices).stdout
        # In a terminal of 80 columns: the address whole, a node that does not answer said
        # in one line below the table.
        narrow = cli("cluster", "ls", "--no-mdns", "--keys", local.keys_dir / "master",
                     "--peer", f"{a.host}:{a.port}", "--peer", "127.0.0.1:9", "--timeout", "1",
                     columns=80)
    assert [r["workers"] for r in rows] == [3]
    assert "workers" in table
    lines = narrow.stdout.splitlines()
    assert narrow.returncode == 0 and all(len(ln.rstrip()) <= 80 for ln in lines[:-1])
    assert any(f" {a.host}:{a.port} " in ln for ln in lines)  # whole, to copy into --peer
    assert any("workers" in ln and "address" in ln for ln in lines)
    assert lines[-1].startswith("node 127.0.0.1:9 did not answer")
    # The devices file says it, and a plan made on it counts three requests' activations.
    plan = json.loads(ok("plan", DEMO, "--shards", "1", "--devices", devices, "-o",
                         tmp_path / "plan.json", "--json").stdout)
    (stage,) = plan["stages"]
    assert plan["devices"][0]["workers"] == stage["workers"] == 3



@pytest.mark.parametrize("name,text", [
    ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "Intel Xeon Gold 6248"),
    ("Intel(R) Core(TM) i7-8700K CPU @ 3.70GHz", "Intel Core i7-8700K"),
    ("AMD Ryzen 9 5950X 16-Core Processor", "AMD Ryzen 9 5950X 16-Core"),
    ("NVIDIA H200", "NVIDIA H200"),
    ("cpu", "cpu"),
])
def test_a_device_reads_without_its_brand_marks_and_clock(name: str, text: str) -> None:
    assert device_text(name) == text
