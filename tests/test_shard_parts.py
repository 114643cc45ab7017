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
from periphery_core.cluster.shard_parts import (
    PART_MIN,
    FilePart,
    chunked,
    parts_sha256,
    shard_parts,
)
from periphery_core.errors import ClusterError, PlanError
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.extract import iter_shards
from periphery_core.partition.planner import make_plan
from tests.models import mlp

WIDTH = 640  # each weight 1.6 MB: a part of its own


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def test_the_parts_parse_to_the_same_model_and_run_bit_for_bit_the_same() -> None:
    model = mlp(width=WIDTH, layers=3)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(4, np.float32), "tiny"))
    whole = model.SerializeToString()
    parts = shard_parts(model)
    assert len(parts) == 1 + 2 * 3  # the rest, then a header and a weight per big initializer
    assert max(len(p) for p in parts[1::2]) < 16 and min(len(p) for p in parts[2::2]) >= PART_MIN
    joined = b"".join(parts)
    assert len(joined) > len(whole)  # (each big weight wrapped in a graph of its own)
    back, original = onnx.ModelProto(), onnx.ModelProto()
    back.ParseFromString(joined)
    original.ParseFromString(whole)
    assert sorted(t.SerializeToString() for t in back.graph.initializer) == \
        sorted(t.SerializeToString() for t in original.graph.initializer)
    assert back.graph.node == original.graph.node and back.graph.input == original.graph.input
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    (want,) = _session(whole).run(None, {"x": x})
    (got,) = _session(joined).run(None, {"x": x})
    assert np.array_equal(got, want)


def test_a_shard_protobuf_cannot_carry_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parts_module, "PROTOBUF_LIMIT", 3 * WIDTH * WIDTH * 4)  # 3 of 4 weights
    with pytest.raises(PlanError, match=r"stage 2's shard is 0\.01 GiB, more than the 2 GiB one "
                                        r"ONNX model can hold: plan more stages"):
        shard_parts(mlp(width=WIDTH, layers=4), 2)


def _with_data_file(folder: Path, layers: int = 4, width: int = WIDTH) -> Path:
    """An MLP whose weights lie in one external data file, as big models' do."""
    path = folder / "mlp.onnx"
    onnx.save(mlp(width=width, layers=layers), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="mlp.onnx.data", size_threshold=1024)
    return path


def _joined(parts: list) -> bytes:
    return b"".join(p.read(0, len(p)) if isinstance(p, FilePart) else p for p in parts)


def test_weights_in_a_data_file_go_from_the_file_and_parse_to_the_same_shards(
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
        back = onnx.ModelProto()
        back.ParseFromString(joined)
        assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
                   for t in back.graph.initializer)  # nothing on the node points at a file
        x = np.random.default_rng(i).standard_normal((1, WIDTH)).astype(np.float32)
        (want,) = _session(kept.SerializeToString()).run(None, {kept.graph.input[0].name: x})
        (got,) = _session(joined).run(None, {back.graph.input[0].name: x})
        assert np.array_equal(got, want)


def test_a_data_file_changed_since_loading_is_not_read_and_one_cut_short_is_one_line(
        tmp_path: Path) -> None:
    loaded = load_model(_with_data_file(tmp_path))
    analysis = analyze(loaded)
    data = tmp_path / "mlp.onnx.data"
    os.utime(data, ns=(0, 0))  # another file now: the weights the master holds are sent
    shard = next(iter_shards(loaded, analysis, make_plan(analysis, 2), weights_on_disk=True))
    parts = shard_parts(shard, 0, tmp_path)
    assert not any(isinstance(p, FilePart) for p in parts) and len(parts) == 5
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


def test_a_node_builds_a_big_stage_through_a_file_and_it_runs_the_same(
        tmp_path: Path) -> None:
    """A shard of FILE_MIN bytes or more is made into its session through a temporary file
    (one copy of its weights at a time on the node), a small one from its bytes: both run
    bit for bit as ONNX Runtime runs the shard, and the temporary folder is gone after, with
    those of nodes killed while building (a folder names its node's pid)."""
    from periphery_core.cluster.shard_load import FILE_MIN, build_stage
    from periphery_core.runtime.session import SessionConfig

    width = 4160  # one weight of 69 MB: over FILE_MIN
    model = mlp(width=width, layers=1)
    data = model.SerializeToString()
    assert len(data) >= FILE_MIN
    scratch = Path(tempfile.gettempdir())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left = scratch / f"periphery-shard-{ended.pid}-x"  # a node killed mid-build left it
    left.mkdir()
    (left / "shard.onnx.data").write_bytes(b"0" * 100)
    live = Path(tempfile.mkdtemp(prefix=f"periphery-shard-{os.getpid()}-", dir=scratch))
    before = set(scratch.glob("periphery-shard-*")) - {left}
    received = [bytearray(data)]
    try:
        big, state = build_stage(received, SessionConfig(exact=True))
        assert received == [] and state is None
        assert set(scratch.glob("periphery-shard-*")) == before  # its own gone, a live one kept
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
    small, _ = build_stage([bytearray(mlp(width=WIDTH, layers=1).SerializeToString())],
                           SessionConfig(exact=True))
    x = np.random.default_rng(2).standard_normal((1, width)).astype(np.float32)
    (want,) = _session(data).run(None, {"x": x})
    assert np.array_equal(big.run({"x": x})["y"], want)
    (want_small,) = _session(mlp(width=WIDTH, layers=1).SerializeToString()).run(
        None, {"x": x[:, :WIDTH]})
    assert np.array_equal(small.run({"x": x[:, :WIDTH]})["y"], want_small)


@pytest.mark.asyncio
async def test_the_app_deploys_a_model_with_a_data_file_and_it_gives_the_model_s_results(
        tmp_path: Path) -> None:
    """In the app (Pilot, real node processes): open a model whose weights lie in a data file,
    add two nodes, plan K = 2 and deploy: the pipeline gives the whole model's results."""
    import asyncio

    from periphery_app.app import PeripheryApp
    from periphery_app.sample import until
    from periphery_core.cluster.local import LocalCluster
    from tests.test_app import SIZE, _add_nodes_by_address

    path = _with_data_file(tmp_path)
    assert (tmp_path / "mlp.onnx.data").stat().st_size > 4 * PART_MIN
    x = np.random.default_rng(2).standard_normal((1, WIDTH)).astype(np.float32)
    (want,) = _session(load_model(path).proto.SerializeToString()).run(None, {"x": x})
    cluster = LocalCluster(2, secure=False)
    cluster.start()
    app = PeripheryApp(path, browse_dir=tmp_path, insecure=True)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await _add_nodes_by_address(app, pilot, cluster)
            await pilot.press("3")
            await until(pilot, lambda: app.plan is not None and app.plan.k == 2)
            await pilot.press("d")
            await until(pilot, lambda: app.cluster_state.deploy_status == "deployed", timeout=60)
            pipeline = app.control.pipeline
            assert pipeline is not None and len(pipeline.assignment) == 2
            got = await asyncio.to_thread(lambda: pipeline.submit({"x": x}).result(timeout=60))
            np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-6)
            await pilot.press("q")
    finally:
        app.control.close()
        cluster.stop()
