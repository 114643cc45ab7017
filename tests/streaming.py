"""A stream of requests through a `Pipeline` of a small deep MLP, for the tests that disturb a
cluster mid-stream (a node killed, a link cut, a redeploy) and then check that every request
came back, in order, bit-identical to the whole model run in one process.

The MLP is 12 layers of 256x256 MatMul + Tanh: deep enough to cut into 3 stages, light enough
to stream hundreds of requests in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from periphery_core.cluster import events as ev
from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.model import load_model
from periphery_core.model.analysis import ModelAnalysis, analyze
from periphery_core.model.loading import LoadedModel
from periphery_core.partition.verify import bit_identical
from periphery_core.runtime.chain import LocalChain
from periphery_core.runtime.session import SessionConfig

WIDTH, LAYERS = 256, 12
OUT = f"h{LAYERS - 1}"  # the MLP's output


def save_mlp(path: Path) -> Path:
    """Write the MLP (x[8, WIDTH] -> OUT[8, WIDTH], seeded weights) to `path`."""
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


@dataclass(frozen=True)
class Workload:
    """The MLP loaded, a pool of inputs, and the whole model's output for each of them."""

    loaded: LoadedModel
    analysis: ModelAnalysis
    pool: list[dict[str, np.ndarray]]
    expected: list[np.ndarray]

    def assert_matches(self, results: list[np.ndarray]) -> None:
        """Result i (of input i modulo the pool) is bit-identical to the whole model's."""
        for i, got in enumerate(results):
            assert bit_identical(self.expected[i % len(self.pool)], got), f"request {i}"


def mlp_workload(folder: Path, seed: int, inputs: int) -> Workload:
    """The MLP saved in `folder`, with `inputs` random inputs drawn from `seed`."""
    loaded = load_model(save_mlp(folder / "mlp.onnx"))
    rng = np.random.default_rng(seed)
    pool = [{"x": rng.standard_normal((8, WIDTH)).astype(np.float32)} for _ in range(inputs)]
    whole = LocalChain([loaded.proto], SessionConfig(exact=True, threads=1))
    return Workload(loaded, analyze(loaded), pool, [whole.run(f)[OUT] for f in pool])


def stream(pipeline: Pipeline, pool: list[dict[str, np.ndarray]], total: int, window: int,
           during: Callable[[int], None] = lambda i: None) -> list[np.ndarray]:
    """Submit `total` requests, going round `pool`, with at most `window` in flight, and
    return their outputs in the order they were submitted.

    `during(i)` runs just before request i is submitted: the place to kill a node or cut a
    link with a full window of requests on their way.
    """
    futures: list[Future] = []
    results: list[np.ndarray] = []
    for i in range(total):
        during(i)
        if len(futures) >= window:
            results.append(futures.pop(0).result(timeout=60)[OUT])
        futures.append(pipeline.submit(pool[i % len(pool)]))
    results += [f.result(timeout=60)[OUT] for f in futures]
    return results


def count_completions(bus: EventBus) -> dict[str, int]:
    """How many times each request completes from now on (1 each: none lost, none twice)."""
    counts: dict[str, int] = {}
    bus.subscribe(lambda e: counts.__setitem__(e.request_id, counts.get(e.request_id, 0) + 1)
                  if isinstance(e, ev.RequestCompleted) else None)
    return counts
