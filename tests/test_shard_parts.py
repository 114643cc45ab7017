"""A shard sent in parts (`shard_parts`) is the same model on the node, and a deploy through
them gives the unsharded model's results bit for bit, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from periphery_core.cluster import shard_parts as parts_module
from periphery_core.cluster.shard_parts import PART_MIN, shard_parts
from periphery_core.errors import PlanError
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


def test_run_local_deploys_big_weights_in_parts_bit_for_bit(tmp_path: Path) -> None:
    """`periphery run --local --check --exact` over two stages of an MLP whose every weight
    travels as a part of its own: every result equals the unsharded model's."""
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(width=WIDTH, layers=4), model)
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
