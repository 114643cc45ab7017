"""A shard sent in parts (`shard_parts`) is the same model on the node, and a deploy through
them gives the unsharded model's results bit for bit, as a user runs it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from periphery_core.cluster import shard_parts as parts_module
from periphery_core.cluster.shard_load import FILE_MIN, Received, build_stage
from periphery_core.cluster.shard_parts import (
    ALIGN,
    PART_MIN,
    FilePart,
    HeldPart,
    chunked,
    parts_sha256,
    shard_parts,
)
from periphery_core.cluster.shard_policy import ShardRefused
from periphery_core.errors import ClusterError, PlanError
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.extract import iter_shards
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.session import SessionConfig
from tests.models import mlp

WIDTH = 640  # each weight 1.6 MB: a part of its own


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _received(parts: list, stage: int = 0) -> Received:
    """The parts as a node takes them, chunk by chunk."""
    received = Received(sum(map(len, parts)), len(parts[0]), stage)
    for _, read in chunked(parts, 1 << 20):
        received.add(read())
    return received


def _marks(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_the_parts_are_the_model_then_its_weights_and_build_the_same_session() -> None:
    model = mlp(width=WIDTH, layers=3)
    odd = onnx.numpy_helper.from_array(np.ones(300_001, np.float32), "odd")  # not page-sized
    model.graph.initializer.insert(0, odd)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(4, np.float32), "tiny"))
    whole = model.SerializeToString()
    parts = shard_parts(model)
    head = onnx.ModelProto()
    head.ParseFromString(parts[0])  # the model alone parses: small, its big weights marked
    assert len(parts[0]) < 4096 and len(head.graph.initializer) == 5
    marks = _marks(head)
    assert set(marks) == {"odd", *(t.name for t in head.graph.initializer[1:4])}
    assert all(set(m) == {"offset", "length"} and int(m["offset"]) % ALIGN == 0
               for m in marks.values())  # no file named; each weight on a page of its own
    weights = b"".join(p for p in parts[1:])
    for t in onnx.load_from_string(whole).graph.initializer:
        if t.name in marks:
            at, n = int(marks[t.name]["offset"]), int(marks[t.name]["length"])
            assert weights[at:at + n] == t.raw_data
    runner, state = build_stage(_received(parts), SessionConfig(exact=True))
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    (want,) = _session(whole).run(None, {"x": x})
    assert state is None and np.array_equal(runner.run({"x": x})["y"], want)


def test_a_shard_protobuf_cannot_carry_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts_module, "PROTOBUF_LIMIT", 200)  # (the model without its weights)
    with pytest.raises(PlanError, match=r"stage 2's model is 0\.00 GiB without its big weights, "
                                        r"more than the 2 GiB one ONNX model can hold: plan"):
        shard_parts(mlp(width=WIDTH, layers=4), 2)


def _with_data_file(folder: Path, layers: int = 4, width: int = WIDTH) -> Path:
    """An MLP whose weights lie in one external data file, as big models' do."""
    path = folder / "mlp.onnx"
    onnx.save(mlp(width=width, layers=layers), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=1024)
    return path


def _joined(parts: list) -> bytes:
    return b"".join(p if isinstance(p, bytes) else bytes(p.read(0, len(p))) for p in parts)


def test_weights_in_a_data_file_go_from_the_file_and_build_the_same_shards(
        tmp_path: Path) -> None:
    loaded = load_model(_with_data_file(tmp_path))
    analysis = analyze(loaded)
    plan = make_plan(analysis, 2)
    for i, (kept, on_disk) in enumerate(zip(
            iter_shards(loaded, analysis, plan),
            iter_shards(loaded, analysis, plan, weights_on_disk=True), strict=True)):
        assert all(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in on_disk.graph.initializer)  # declared, not copied
        parts = shard_parts(on_disk, i, tmp_path)
        files = [p for p in parts if isinstance(p, FilePart)]
        assert len(files) == 2 and {p.path.name for p in files} == {"mlp.onnx.data"}
        joined = _joined(parts)
        assert parts_sha256(parts) == hashlib.sha256(joined).hexdigest()
        assert b"".join(bytes(read()) for _, read in chunked(parts, 100_003)) == joined
        head = onnx.load_from_string(parts[0])
        assert all(set(m) == {"offset", "length"} for m in _marks(head).values())  # no file
        runner, _ = build_stage(_received(parts, i), SessionConfig(exact=True))
        x = np.random.default_rng(i).standard_normal((1, WIDTH)).astype(np.float32)
        (want,) = _session(kept.SerializeToString()).run(None, {kept.graph.input[0].name: x})
        got = runner.run({head.graph.input[0].name: x})
        assert np.array_equal(next(iter(got.values())), want)


def test_a_data_file_changed_since_loading_is_not_read_and_one_cut_short_is_one_line(
        tmp_path: Path) -> None:
    loaded = load_model(_with_data_file(tmp_path))
    analysis = analyze(loaded)
    data = tmp_path / "mlp.onnx.data"
    os.utime(data, ns=(0, 0))  # another file now: the weights the master holds are sent
    shard = next(iter_shards(loaded, analysis, make_plan(analysis, 2), weights_on_disk=True))
    held = {t.name: t for t in loaded.proto.graph.initializer}
    parts = shard_parts(shard, 0, tmp_path, held)  # the weights the master holds, not copied
    assert [type(p) for p in parts] == [bytes, HeldPart, HeldPart]
    want = _joined(shard_parts(next(iter_shards(loaded, analysis, make_plan(analysis, 2))), 0))
    assert _joined(parts) == want and parts_sha256(parts) == hashlib.sha256(want).hexdigest()
    cut = FilePart(data, 0, data.stat().st_size + 10)
    with pytest.raises(ClusterError, match="ended early while its weights were sent"):
        cut.read(data.stat().st_size - 4, 14)


def test_a_deploy_sends_what_the_master_holds_whatever_became_of_the_data_file(
        tmp_path: Path) -> None:
    """Weights go from the data file only while it is the file the model was loaded from: one
    rewritten since (zeros), or deleted, leaves the results the loaded model's."""
    from periphery_core.cluster import events as ev
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.pipeline import Pipeline

    path = _with_data_file(tmp_path)
    loaded = load_model(path)
    analysis = analyze(loaded)
    x = np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)
    (want,) = _session(loaded.proto.SerializeToString()).run(None, {"x": x})
    data = tmp_path / "mlp.onnx.data"
    size = data.stat().st_size
    data.write_bytes(bytes(size))  # the same size, all zeros, a new modification time
    failed: list[str] = []
    with LocalCluster(2) as local, local.master() as master:
        master.bus.subscribe(lambda e: failed.append(e.reason)
                             if isinstance(e, ev.DeployFailed) else None)
        pipeline = Pipeline(master, loaded, analysis, k=2, exact=True, recover=False)
        try:
            pipeline.deploy([a.node_id for a in local.addresses])
            got = pipeline.submit({"x": x}).result(timeout=60)["y"]
            assert np.array_equal(got, want) and np.any(got)
            data.unlink()  # gone: the same
            pipeline.deploy([a.node_id for a in local.addresses])
            got = pipeline.submit({"x": x}).result(timeout=60)["y"]
            assert np.array_equal(got, want)
        finally:
            pipeline.close()
    assert not failed


@pytest.mark.parametrize("how", ["inline", "data-file", "big-stages"])
def test_run_local_deploys_big_weights_in_parts_bit_for_bit(tmp_path: Path, how: str) -> None:
    """`periphery run --local --check --exact` over two stages of an MLP whose every weight
    travels as a part of its own (from the model's data file, where it has one; big stages,
    69 MB each, built on their nodes through a file): every result equals the unsharded
    model's."""
    from periphery_core.cluster.shard_load import FILE_MIN

    if how == "inline":
        model = tmp_path / "mlp.onnx"
        onnx.save(mlp(width=WIDTH, layers=4), model)
    else:
        width = 4160 if how == "big-stages" else WIDTH
        model = _with_data_file(tmp_path, 2 if how == "big-stages" else 4, width)
        assert (how == "big-stages") == (width * width * 4 >= FILE_MIN)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cli(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "periphery_core.cli.main", *map(str, args)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)

    plan = cli("plan", model, "--shards", 2, "-o", tmp_path / "plan.json")
    assert plan.returncode == 0, plan.stderr
    run = cli("run", model, "--plan", tmp_path / "plan.json", "--local", "--requests", 50,
              "--check", "--exact", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["completed"] == 50 and summary["check"]["bit_identical_outputs"] == 50


def test_a_node_writes_big_weights_to_a_file_as_they_come_and_builds_the_same_session(
        tmp_path: Path) -> None:
    """Weights of FILE_MIN bytes or more go to a file of a private folder as they arrive (the
    node holds them once, in ONNX Runtime), smaller ones stay in memory: both build sessions
    that run bit for bit as ONNX Runtime runs the shard, and the folder is gone after, with
    those of nodes killed mid-upload (a folder names its node's pid)."""
    width = 4160  # one weight of 69 MB: over FILE_MIN
    data = mlp(width=width, layers=1).SerializeToString()
    scratch = Path(tempfile.gettempdir())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left = scratch / f"periphery-shard-{ended.pid}-x"  # a node killed mid-upload left it
    left.mkdir()
    (left / "weights.bin").write_bytes(b"0" * 100)
    live = Path(tempfile.mkdtemp(prefix=f"periphery-shard-{os.getpid()}-", dir=scratch))
    before = set(scratch.glob("periphery-shard-*")) - {left}
    try:
        received = _received(shard_parts(onnx.load_from_string(data)))
        assert received.folder is not None and not left.exists()  # swept as it began
        assert (received.folder / "weights.bin").stat().st_size >= FILE_MIN
        assert len(received.model) < 4096 and not received.weights  # (in memory: the model)
        big, state = build_stage(received, SessionConfig(exact=True))
        assert state is None and not received.folder.exists()
        assert set(scratch.glob("periphery-shard-*")) == before  # its own gone, a live one kept
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
    small_data = mlp(width=WIDTH, layers=1).SerializeToString()
    received = _received(shard_parts(onnx.load_from_string(small_data)))
    assert received.folder is None and len(received.weights) >= PART_MIN
    small, _ = build_stage(received, SessionConfig(exact=True))
    x = np.random.default_rng(2).standard_normal((1, width)).astype(np.float32)
    (want,) = _session(data).run(None, {"x": x})
    assert np.array_equal(big.run({"x": x})["y"], want)
    (want_small,) = _session(small_data).run(None, {"x": x[:, :WIDTH]})
    assert np.array_equal(small.run({"x": x[:, :WIDTH]})["y"], want_small)


@pytest.mark.parametrize("marks", [
    {"location": "secret.bin", "offset": "0", "length": "16"},
    {"location": "weights.bin", "offset": "0", "length": "16"},  # (its own file's name too)
    {"offset": "4096", "length": "16"},  # beyond the bytes that came
    {"offset": "-1", "length": "16"},
    {"offset": "0"},
])
def test_weights_a_shard_marks_other_than_within_its_own_bytes_are_refused(
        marks: dict[str, str]) -> None:
    """A shard's weights may name nothing but a range of the bytes its upload carried."""
    weight = onnx.TensorProto(name="W", data_type=onnx.TensorProto.UINT8, dims=[16])
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in marks.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["W"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [16])], [weight])
    model = onnx.helper.make_model(graph).SerializeToString()
    received = _received([model, bytes(range(16))])
    with pytest.raises(ShardRefused, match=r"external data|beyond the 16 bytes that came"):
        build_stage(received, SessionConfig(exact=True))
    ok = {"offset": "0", "length": "16"}
    del weight.external_data[:]
    for key, value in ok.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    del graph.initializer[:]
    graph.initializer.append(weight)
    runner, _ = build_stage(_received([onnx.helper.make_model(graph).SerializeToString(),
                                       bytes(range(16))]), SessionConfig(exact=True))
    assert list(runner.run({})["y"]) == list(range(16))


@pytest.mark.asyncio
async def test_the_app_deploys_a_model_with_a_data_file_and_it_gives_the_model_s_results(
        tmp_path: Path) -> None:
    """In the app (Pilot, real node processes): open a model whose weights lie in a data file,
    add two nodes, plan K = 2 and deploy: the pipeline gives the whole model's results."""
    import asyncio

    from periphery_app.sample import until
    from tests.test_app import app_on_local_nodes

    path = _with_data_file(tmp_path)
    assert (tmp_path / "mlp.onnx.data").stat().st_size > 4 * PART_MIN
    x = np.random.default_rng(2).standard_normal((1, WIDTH)).astype(np.float32)
    (want,) = _session(load_model(path).proto.SerializeToString()).run(None, {"x": x})
    async with app_on_local_nodes(path, tmp_path) as (app, pilot):
        await pilot.press("3")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 2)
        await pilot.press("d")
        await until(pilot, lambda: app.cluster_state.deploy_status == "deployed", timeout=60)
        pipeline = app.control.pipeline
        assert pipeline is not None and len(pipeline.assignment) == 2
        got = await asyncio.to_thread(lambda: pipeline.submit({"x": x}).result(timeout=60))
        np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-6)
        await pilot.press("q")


def test_a_data_file_cut_short_while_a_deploy_sends_it_fails_the_deploy_in_one_line(
        tmp_path: Path) -> None:
    """The model's data file is cut short after the deploy hashed it, as its weights go out
    (on the first chunk sent): the deploy fails naming the file and what to do, and the next
    deploy, the file no longer the one loaded, sends what the master holds and runs."""
    from periphery_core.cluster import events as ev
    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.pipeline import Pipeline

    width = 2048  # 16 MiB a weight: 16 chunks each, most still to go when the file is cut
    path = _with_data_file(tmp_path, 4, width)
    loaded = load_model(path)
    analysis = analyze(loaded)
    data = tmp_path / "mlp.onnx.data"
    x = np.random.default_rng(3).standard_normal((1, width)).astype(np.float32)
    (want,) = _session(loaded.proto.SerializeToString()).run(None, {"x": x})
    cut = []

    def on_event(e: ev.Event) -> None:
        if isinstance(e, ev.ShardProgress) and not cut:
            cut.append(e)
            os.truncate(data, 1 << 20)

    failed: list[str] = []
    with LocalCluster(2) as local, local.master() as master:
        master.bus.subscribe(on_event)
        master.bus.subscribe(lambda e: failed.append(e.reason)
                             if isinstance(e, ev.DeployFailed) else None)
        pipeline = Pipeline(master, loaded, analysis, k=2, exact=True, recover=False)
        nodes = [a.node_id for a in local.addresses]
        try:
            with pytest.raises(ClusterError) as info:
                pipeline.deploy(nodes)
            assert info.value.message == (f"{data} ended early while its weights were sent "
                                          "(was it changed?): load the model again")
            assert failed == [info.value.message]
            pipeline.deploy(nodes)
            got = pipeline.submit({"x": x}).result(timeout=60)["y"]
            assert np.array_equal(got, want)
        finally:
            pipeline.close()


def test_a_deploy_lets_a_stage_s_bytes_go_once_they_are_sent(tmp_path: Path) -> None:
    """A stage of a model without a data file is sent from bytes the master made for it; once
    they are sent they go, without waiting for Python's cycle collector (the upload's closures
    form a cycle, which held a 1.45 GiB model's stages after its deploy, 3.10 GiB against 1.53
    before it, until a collection)."""
    import gc

    import psutil

    from periphery_core.cluster.local import LocalCluster
    from periphery_core.cluster.pipeline import Pipeline

    width = 8192  # one weight of 256 MiB
    path = tmp_path / "wide.onnx"
    onnx.save(mlp(width=width, layers=1), path)
    loaded = load_model(path)
    analysis = analyze(loaded)
    me = psutil.Process()
    with LocalCluster(1) as local, local.master() as master:
        pipeline = Pipeline(master, loaded, analysis, k=1, exact=True, recover=False)
        gc.collect()
        gc.disable()
        try:
            before = me.memory_info().rss
            pipeline.deploy([local.addresses[0].node_id])
            held = me.memory_info().rss - before
        finally:
            gc.enable()
            pipeline.close()
    assert held < (width * width * 4) // 2, f"the master still holds {held >> 20} MiB"
