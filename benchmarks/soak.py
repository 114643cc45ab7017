"""Soak: 20,000 requests through three local nodes with one deliberately slowed stage.

The model is an MLP whose middle third is 16x heavier, planned with the `even` strategy so that
stage 1 gets the heavy layers and is the bottleneck: upstream must be slowed by backpressure,
not buffer without bound. The resident memory of every process (three nodes and the master) is
sampled every 500 requests; after warm-up (the first 2,000) it must stay within 10% of its
warm-up level. Prints that, throughput and latency percentiles.

Run: `python benchmarks/soak.py [--requests 20000] [--inflight 16] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from periphery_core.cluster import events as ev
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.planner import make_plan


def slow_middle_mlp(path: Path, batch: int = 8) -> Path:
    rng = np.random.default_rng(0)
    widths = [128] * 4 + [512] * 4 + [128] * 4
    nodes, inits, x, width = [], [], "x", 128
    for i, w_out in enumerate(widths):
        w = (rng.standard_normal((width, w_out)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i}"], name=f"act{i}"))
        x, width = f"h{i}", w_out
    graph = helper.make_graph(
        nodes, "soak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 128])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, 128])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=8), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    latencies: list[float] = []
    samples: dict[str, list[tuple[int, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = slow_middle_mlp(Path(tmp) / "soak.onnx")
        loaded = load_model(path)
        analysis = analyze(loaded)
        plan = make_plan(analysis, 3, strategy="even")
        with LocalCluster(3, threads=1) as local, local.master(max_pending=256) as master:
            master.bus.subscribe(lambda e: latencies.append(e.latency_s)
                                 if isinstance(e, ev.RequestCompleted) else None)
            pipeline = Pipeline(master, loaded, analysis, plan=plan)
            pipeline.deploy([a.node_id for a in local.addresses])
            procs = {f"node {i} (stage {i})": psutil.Process(n.process.pid)
                     for i, n in enumerate(local.nodes)}
            procs["master"] = psutil.Process(os.getpid())
            rng = np.random.default_rng(1)
            pool = [{"x": rng.standard_normal((8, 128)).astype(np.float32)} for _ in range(16)]
            window = []
            t0 = time.perf_counter()
            t_warm = t0
            for i in range(args.requests):
                if len(window) >= args.inflight:
                    window.pop(0).result(timeout=120)
                window.append(pipeline.submit(pool[i % len(pool)]))
                if i == args.warmup:
                    t_warm = time.perf_counter()
                if i % 500 == 0:
                    for name, p in procs.items():
                        samples.setdefault(name, []).append((i, p.memory_info().rss))
            for f in window:
                f.result(timeout=120)
            wall = time.perf_counter() - t_warm
            pipeline.close()
    measured = latencies[args.warmup:]
    rows = []
    for name, points in samples.items():
        base = next(rss for i, rss in points if i >= args.warmup)
        peak = max(rss for i, rss in points if i >= args.warmup)
        rows.append({"process": name, "warm_mib": base / 2**20, "peak_mib": peak / 2**20,
                     "ratio": peak / base})
    summary = {
        "requests": args.requests, "inflight": args.inflight,
        "throughput_rps": (args.requests - args.warmup) / wall,
        "p50_ms": float(np.percentile(measured, 50)) * 1e3,
        "p99_ms": float(np.percentile(measured, 99)) * 1e3,
        "processes": rows,
        "within_10_percent": all(r["ratio"] <= 1.10 for r in rows),
    }
    console = Console(width=110)
    t = Table(title=f"soak: {args.requests} requests, {args.inflight} in flight, stage 1 slowed "
                    f"(the even plan gives it the heavy layers)", title_justify="left")
    for col in ("process", "RSS after warm-up", "peak RSS after warm-up", "peak / warm-up"):
        t.add_column(col, justify="left" if col == "process" else "right")
    for r in rows:
        t.add_row(r["process"], f"{r['warm_mib']:.1f} MiB", f"{r['peak_mib']:.1f} MiB",
                  f"{r['ratio']:.3f}")
    console.print(t)
    console.print(f"throughput {summary['throughput_rps']:.0f} req/s after warm-up; latency p50 "
                  f"{summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms; every process "
                  f"within 10% of its warm-up memory: {summary['within_10_percent']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
