"""Recovery: a node killed mid-stream costs no request, duplicates none, changes no result."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.verify import bit_identical
from periphery_core.runtime.chain import LocalChain
from periphery_core.runtime.session import SessionConfig

WIDTH, LAYERS = 256, 12


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"], name=f"act{i}"))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [8, WIDTH])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=8), path)
    return path


@pytest.mark.parametrize("victim", [1, 0], ids=["middle-stage", "first-stage"])
def test_a_killed_node_costs_no_request(tmp_path: Path, victim: int) -> None:
    path = _mlp(tmp_path / "mlp.onnx")
    loaded = load_model(path)
    analysis = analyze(loaded)
    rng = np.random.default_rng(1)
    pool = [{"x": rng.standard_normal((8, WIDTH)).astype(np.float32)} for _ in range(25)]
    whole = LocalChain([loaded.proto], SessionConfig(exact=True, threads=1))
    expected = [whole.run(f)[f"h{LAYERS - 1}"] for f in pool]
    total, window = 500, 16
    with LocalCluster(3) as local, local.master() as master:
        pipeline = Pipeline(master, loaded, analysis, k=3)
        pipeline.deploy([a.node_id for a in local.addresses])
        victim_id = local.addresses[victim].node_id
        lost_at: list[float] = []
        master.bus.subscribe(lambda e: lost_at.append(e.t)
                             if isinstance(e, ev.NodeLost) else None)
        completions: dict[str, int] = {}
        master.bus.subscribe(lambda e: completions.__setitem__(
            e.request_id, completions.get(e.request_id, 0) + 1)
            if isinstance(e, ev.RequestCompleted) else None)
        results: list[np.ndarray | None] = [None] * total
        resolved = [0] * total
        futures: list[Future] = []
        killed = threading.Event()
        t_kill = 0.0
        for i in range(total):
            if i == 150 and not killed.is_set():
                local.kill(victim)
                t_kill = time.time()
                killed.set()
            if len(futures) >= window:
                j = i - window
                results[j] = futures[j].result(timeout=60)[f"h{LAYERS - 1}"]
                resolved[j] += 1
            f = pipeline.submit(pool[i % len(pool)])
            futures.append(f)
        for j in range(total - window, total):
            results[j] = futures[j].result(timeout=60)[f"h{LAYERS - 1}"]
            resolved[j] += 1
        pipeline.close()
        assert pipeline.failed is None
        assert len(pipeline.recoveries) == 1
        rec = pipeline.recoveries[0]
        detect = lost_at[0] - t_kill
        print(f"\nkilled stage {victim}: lost after {detect:.2f} s, serving again "
              f"{rec.recovered_s:.2f} s later on {rec.stages} stages, {rec.replayed} replayed")
        assert rec.lost_nodes == (f"local{victim}",) and rec.stages == 2
        assert victim_id not in pipeline.assignment
    assert all(r == 1 for r in resolved)
    assert len(completions) == total and set(completions.values()) == {1}
    for i, got in enumerate(results):
        assert got is not None and bit_identical(expected[i % len(pool)], got), f"request {i}"
