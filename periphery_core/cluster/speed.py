"""How fast a node is: a description of its device and a measured speed against the planner's
reference device (the figure a node reports in its hello and its stats)."""

from __future__ import annotations

import platform
import time

import numpy as np
import onnx

from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.session import SessionConfig


def device_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return cpu


def measure_speed(budget_s: float = 0.25, min_runs: int = 10, max_runs: int = 400) -> float:
    """This machine's speed relative to the planner's reference device (10 GFLOP/s).

    A small standard workload (a chain of 256x256 MatMuls in ONNX Runtime on one thread, about
    1-2 ms on a current core) run many times for about `budget_s`; the speed comes from the
    fastest run. Other processes on the same cores (sibling nodes calibrating at the same time,
    say) only ever make runs slower, so the fastest of many short runs is what the machine does
    uncontended, where a mean or median measures the contention.
    """
    from onnx import TensorProto, helper

    from periphery_core.partition.plan import REFERENCE_FLOPS

    n, depth = 256, 8
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(depth):
        w = onnx.numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32) * 0.05,
                                         f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    runner = StageRunner(model, SessionConfig(exact=False, threads=1))
    feed = {"x": rng.standard_normal((n, n)).astype(np.float32)}
    runner.run(feed)
    runner.run(feed)
    best = float("inf")
    t_end = time.perf_counter() + budget_s
    for i in range(max_runs):
        t0 = time.perf_counter()
        runner.run(feed)
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if i + 1 >= min_runs and t1 >= t_end:
            break
    flops = 2.0 * n * n * n * depth
    return float(flops / best / REFERENCE_FLOPS)
