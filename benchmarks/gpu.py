"""CUDA against the CPU, on a machine with an NVIDIA GPU: plain ONNX Runtime and Periphery.

Run: `python benchmarks/gpu.py [--model PATH] [--batch 8] [--requests 400]`; about two minutes
on one GPU. It needs `onnxruntime-gpu` installed in place of `onnxruntime` (never both: they
share one folder; see ../shared/FACTS.md) and the NVIDIA driver's `nvidia-smi`. Where no GPU is
usable it says so in one line and exits 2; CI has none and never runs it.

1. Plain ONNX Runtime on the model at `--batch`: one session on the CPU with every core, one on
   CUDA; requests/s and median latency, one request at a time and `--inflight` at once.
2. Periphery with default flags on local nodes started with `--device cuda` (all on GPU 0, as
   on a one-GPU host): K = 1 and K = 2 (the planner's balanced cuts), `--inflight` requests in
   flight; requests/s, the GPU use and memory the nodes reported (the master's fold of their
   stats), and every result checked against the CPU session's within tolerance (the CUDA
   provider may compute in TF32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.cluster.state import ClusterState
from periphery_core.cluster.tracker import StateTracker
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.runtime.feeds import random_feeds
from periphery_core.runtime.gpu import CPU, CUDA, gpu_usage, providers_for

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-2, 1e-3  # TF32 convolutions and matmuls differ from fp32 in the 3rd digit


def cuda_usable() -> str | None:
    """None when a CUDA session runs here, else why not (one line)."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider: install onnxruntime-gpu instead"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    probe = ROOT / "assets" / "demo-resnet.onnx"
    session = ort.InferenceSession(str(probe), opts, providers=list(providers_for("cuda")))
    if session.get_providers()[0] != CUDA:
        return "the CUDA provider is built in but no GPU is usable here"
    return None


def plain(path: Path, feeds: list[dict[str, np.ndarray]], providers: tuple, inflight: int
          ) -> dict[str, float]:
    """A loop of session.run, then `inflight` threads sharing the session."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=list(providers))
    for f in feeds[:5]:
        session.run(None, f)
    lat = []
    t0 = time.perf_counter()
    for f in feeds:
        t = time.perf_counter()
        session.run(None, f)
        lat.append(time.perf_counter() - t)
    serial = len(feeds) / (time.perf_counter() - t0)
    with ThreadPoolExecutor(inflight) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda f: session.run(None, f), feeds))
        parallel = len(feeds) / (time.perf_counter() - t0)
    return {"rps_one": serial, "rps_many": parallel, "p50_s": statistics.median(lat)}


def periphery(path: Path, shapes: dict, feeds: list[dict[str, np.ndarray]], k: int,
              inflight: int, reference: list[list[np.ndarray]]) -> dict[str, float]:
    loaded = load_model(path)
    analysis = analyze(loaded, shapes)
    with LocalCluster(k, device="cuda") as local, local.master() as master:
        tracker = StateTracker(master.bus, ClusterState.empty())
        pipeline = Pipeline(master, loaded, analysis, k=k)
        pipeline.deploy()
        names = [o.name for o in loaded.proto.graph.output]
        list(pipeline.run_many(feeds[:50], inflight=inflight))  # warm-up
        peak_gpu: list[float] = []
        t0 = time.perf_counter()
        results = []
        for i, out in enumerate(pipeline.run_many(feeds, inflight=inflight)):
            results.append(out)
            if i % 50 == 0:
                peak_gpu += [n.gpu_percent for n in tracker.state.nodes.values()
                             if n.gpu_percent is not None]
        wall = time.perf_counter() - t0
        memory = max((n.gpu_memory_bytes or 0 for n in tracker.state.nodes.values()),
                     default=0)
        pipeline.close()
        tracker.close()
    for out, ref in zip(results, reference, strict=True):
        for name, r in zip(names, ref, strict=True):
            if not np.allclose(out[name], r, rtol=RTOL, atol=ATOL):
                diff = float(np.max(np.abs(out[name] - r)))
                raise SystemExit(f"K = {k}: output {name} differs from the CPU's by {diff:.3g}")
    return {"rps": len(feeds) / wall, "gpu_percent": max(peak_gpu, default=float("nan")),
            "gpu_memory_bytes": memory}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "demo-resnet.onnx")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--inflight", type=int, default=8)
    args = parser.parse_args()
    why = cuda_usable()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    console = Console(width=120)
    loaded = load_model(args.model)
    analysis = analyze(loaded)
    shapes = {i.name: (args.batch, *i.shape[1:]) for i in analysis.inputs}
    specs = analyze(loaded, shapes).inputs
    pool = [random_feeds(specs, seed=i) for i in range(8)]
    feeds = [pool[i % len(pool)] for i in range(args.requests)]
    cpu_session = ort.InferenceSession(str(args.model), providers=[CPU])
    reference = [cpu_session.run(None, f) for f in feeds]

    t = Table(title=f"{args.model.name}, batch {args.batch}, {os.cpu_count()} cores: "
                    f"CUDA against the CPU ({args.requests} requests)", title_justify="left")
    for col in ("run", "requests/s, 1 at a time", f"requests/s, {args.inflight} in flight",
                "p50 latency", "GPU use", "GPU memory"):
        t.add_column(col, justify="left" if col == "run" else "right")
    cpu = plain(args.model, feeds, (CPU,), args.inflight)
    gpu = plain(args.model, feeds, providers_for("cuda"), args.inflight)
    usage = gpu_usage(0)
    for name, r in (("ONNX Runtime, CPU", cpu), ("ONNX Runtime, CUDA", gpu)):
        t.add_row(name, f"{r['rps_one']:.1f}", f"{r['rps_many']:.1f}",
                  f"{r['p50_s'] * 1e3:.2f} ms", "-", "-")
    for k in (1, 2):
        r = periphery(args.model, shapes, feeds, k, args.inflight, reference)
        t.add_row(f"Periphery K = {k}, --device cuda", "-", f"{r['rps']:.1f}", "-",
                  f"{r['gpu_percent']:.0f}%", f"{r['gpu_memory_bytes'] / 2**20:.0f} MiB")
    console.print(t)
    if usage is not None:
        console.print(f"GPU 0 after plain ONNX Runtime: {usage.percent:.0f}% use, "
                      f"{usage.memory_used_bytes / 2**20:.0f} of "
                      f"{usage.memory_total_bytes / 2**20:.0f} MiB")
    console.print(f"every Periphery result within rtol {RTOL}, atol {ATOL} of the CPU's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
