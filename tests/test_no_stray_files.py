"""The CLI writes what it was asked to write, and nothing else, into the working directory.

ONNX Runtime's symbolic shape inference, when it cannot finish, dumps the partial model as
`sym_shape_infer_temp.onnx` (and uuid-named weight files) into the current directory. Each
command here runs as a subprocess in an empty working directory, with the model elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from tests.conftest import MODELS, ROOT


def ragged(path: Path) -> Path:
    """A model ORT's symbolic shape inference gives up on: a sequence of two tensors of
    different shapes, one read back by SequenceAt. Its 1 KiB weight stays in the skeleton the
    analysis infers on, so a dump would include a uuid-named weights file too."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0, np.int64), "p"),
        numpy_helper.from_array(np.array([0], np.int64), "st"),
        numpy_helper.from_array(np.array([3], np.int64), "en"),
        numpy_helper.from_array(np.array([0], np.int64), "ax"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["b"], name="slice"),
        helper.make_node("SequenceConstruct", ["a", "b"], ["s"], name="seq"),
        helper.make_node("SequenceAt", ["s", "p"], ["c"], name="at"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "ragged", [helper.make_tensor_value_info("x", f, [4, 16])],
                              [helper.make_tensor_value_info("y", f, [None, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def built(name: str, tmp: Path) -> Path:
    if name == "ragged":
        return ragged(tmp / "ragged.onnx")
    path = tmp / "mlp.onnx"
    onnx.save(models.mlp(width=64), path)
    return path


CORPUS = ["tiny-random-gpt2-past.onnx", "all-MiniLM-L6-v2/model.onnx"]


@pytest.fixture(params=["ragged", "mlp", *CORPUS])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    name = request.param
    if name in CORPUS:
        path = MODELS / name
        if not path.is_file():
            pytest.skip(f"{path} not found (shared test data)")
        return path
    (tmp_path / "models").mkdir()
    return built(name, tmp_path / "models")


def run_in(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PERIPHERY_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "periphery_core.cli.main", *map(str, args)],
                            capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, f"{args}: exit {result.returncode}: {result.stderr}"
    return result


@pytest.mark.parametrize(
    ("command", "writes"),
    [
        (["analyze", "{model}", "--json"], set()),
        (["analyze", "{model}", "--profile", "--top", "3"], set()),
        (["plan", "{model}", "-k", "2", "-o", "plan.json"], {"plan.json"}),
        (["shard", "{model}", "-k", "2", "-o", "shards"], {"shards"}),
    ],
    ids=["analyze", "analyze-profile", "plan", "shard"],
)
def test_commands_leave_only_what_they_were_asked_to_write(
        model: Path, command: list[str], writes: set[str], tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_in(cwd, *(c.format(model=model) for c in command))
    assert {p.name for p in cwd.iterdir()} == writes


def test_quantize_leaves_only_its_output(tmp_path: Path) -> None:
    src = built("mlp", tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_in(cwd, "quantize", src, "--method", "dynamic", "-o", "q.onnx")
    assert {p.name for p in cwd.iterdir()} == {"q.onnx"}
