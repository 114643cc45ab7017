"""CUDA against the CPU, on a machine with an NVIDIA GPU: plain ONNX Runtime and Periphery.

Run: `python benchmarks/gpu.py [--model PATH] [--batch 8] [--requests 400]`; about 90 s on
one H200 (16 cores). It needs `onnxruntime-gpu` installed in place of `onnxruntime` (never both:
they share one folder; see ../shared/FACTS.md) and the NVIDIA driver's `nvidia-smi`. Where no
GPU is usable it says so in one line and exits 2; CI has none and never runs it.
`--device cpu` runs every "GPU" row on the CPU instead: a rehearsal of the script itself.

1. Plain ONNX Runtime on the model at `--batch`: one session on the CPU with every core, one on
   CUDA; requests/s and median latency, one request at a time and `--inflight` at once.
2. Periphery with default flags on local nodes started with `--device cuda` (all on GPU 0, as
   on a one-GPU host): K = 1 with 1, 2, 8 workers and the default (`periphery-node
   --workers`: requests a node computes at once), and K = 2 (the planner's balanced cuts),
   `--inflight` requests in flight; requests/s, the GPU use and memory the nodes reported
   (the master's fold of their stats), and each result's error against the CPU session's
   (the CUDA provider computes convolutions and matmuls in TF32) and against plain ONNX
   Runtime on the same device (sharding's own error: 0 where the shards reproduce the
   unsharded model bit for bit).
3. A language model's decoder stage, KV caches kept in GPU memory against copied to and from
   the host each step (`StatefulStage(on_device=...)`), ms per decode step at a long context;
   then greedy generation over local nodes (`--device cuda`, K = 1 and 2, and CPU nodes):
   tokens/s, and each run's logits checked against the CPU's. The model is GPT-2's topology
   (../shared's tiny-random-gpt2-past.onnx, com.microsoft Attention with a stacked cache) grown
   to `--hidden` with seeded random weights, so that nothing large has to be carried to the
   GPU machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from rich.console import Console
from rich.table import Table

from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.node_data import default_workers
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.cluster.state import ClusterState
from periphery_core.cluster.tracker import StateTracker
from periphery_core.generate.decoder import recognize
from periphery_core.generate.engine import Sampling, generate, pipeline_step
from periphery_core.generate.stateful import StatefulStage, make_stateful, stage_state
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.chain import StageRunner
from periphery_core.runtime.feeds import random_feeds
from periphery_core.runtime.gpu import CPU, CUDA, gpu_usage, providers_for
from periphery_core.runtime.session import SessionConfig
from periphery_core.units import human_bytes

ROOT = Path(__file__).resolve().parents[1]


# Checks: sharded against unsharded on the same device, and the GPU against the CPU (TF32 moves
# a deep network's outputs by about 5e-4 relative here).
SHARDED_MAX, DEVICE_MAX = 1e-5, 1e-2
failures: list[str] = []


def error(got: np.ndarray, ref: np.ndarray) -> float:
    """Relative error, ||got - ref|| / ||ref||."""
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - ref64) / max(np.linalg.norm(ref64),
                                                                       1e-30))
GPT2 = ROOT.parent / "shared" / "data" / "models" / "tiny-random-gpt2-past.onnx"


def cuda_usable(device: str) -> str | None:
    """None when a session on `device` runs here, else why not (one line)."""
    if device == "cpu":
        return None
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider: install onnxruntime-gpu instead"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    probe = ROOT / "assets" / "demo-resnet.onnx"
    session = ort.InferenceSession(str(probe), opts, providers=list(providers_for(device)))
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


def plain_bound(path: Path, feeds: list[dict[str, np.ndarray]], device: str
                ) -> dict[str, float]:
    """One request at a time through an IOBinding whose outputs stay on the device: what a
    stage would gain if its outputs never had to leave it."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=list(providers_for(device)))
    kind = "cuda" if session.get_providers()[0] == CUDA else "cpu"
    outputs = [o.name for o in session.get_outputs()]

    def once(f: dict[str, np.ndarray]) -> None:
        binding = session.io_binding()
        for name, value in f.items():
            binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, kind)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    for f in feeds[:5]:
        once(f)
    lat = []
    t0 = time.perf_counter()
    for f in feeds:
        t = time.perf_counter()
        once(f)
        lat.append(time.perf_counter() - t)
    return {"rps_one": len(feeds) / (time.perf_counter() - t0), "p50_s": statistics.median(lat)}


def periphery(path: Path, shapes: dict, feeds: list[dict[str, np.ndarray]], k: int,
              inflight: int, references: dict[str, list[list[np.ndarray]]], device: str,
              workers: int | None = None) -> dict[str, float]:
    loaded = load_model(path)
    analysis = analyze(loaded, shapes)
    with LocalCluster(k, device=device, workers=workers) as local, \
            Master(keys=local.master_keys) as master:
        tracker = StateTracker(master.bus, ClusterState.empty())  # before the nodes join
        for address in local.addresses:
            master.connect(address)
        pipeline = Pipeline(master, loaded, analysis, k=k)
        pipeline.deploy()
        names = [o.name for o in loaded.proto.graph.output]
        list(pipeline.run_many(feeds[:50], inflight=inflight))  # warm-up
        t0 = time.perf_counter()
        results = list(pipeline.run_many(feeds, inflight=inflight))
        done = len(results)
        while time.perf_counter() - t0 < 3.0:  # long enough for the nodes' 1 s stats
            done += sum(1 for _ in pipeline.run_many(feeds, inflight=inflight))
        wall = time.perf_counter() - t0
        # what the nodes reported while serving (each sends its GPU's use once a second)
        peak_gpu = [n.gpu_percent for n in tracker.state.nodes.values()
                    if n.gpu_percent is not None]
        memory = max((n.gpu_memory_bytes or 0 for n in tracker.state.nodes.values()),
                     default=0)
        pipeline.close()
        tracker.close()
    errors = {}
    for label, reference in references.items():
        errors[label] = max(error(out[name], r) for out, ref in zip(results, reference,
                                                                    strict=True)
                            for name, r in zip(names, ref, strict=True))
        errors[label + "_abs"] = max(float(np.max(np.abs(out[name] - r))) for out, ref in
                                     zip(results, reference, strict=True)
                                     for name, r in zip(names, ref, strict=True))
    return {**errors, "rps": done / wall, "gpu_percent": max(peak_gpu, default=float("nan")),
            "gpu_memory_bytes": memory}


def grow_gpt2(hidden: int, positions: int, folder: Path) -> Path:
    """GPT-2's topology (../shared's tiny model) at `hidden` wide, 64 per head, with seeded
    random weights (layer norms' scales 1, shifts and biases 0), saved with external data."""
    model = onnx.load(str(GPT2))
    heads = hidden // 64
    dims = {32: hidden, 96: 3 * hidden, 128: 4 * hidden, 512: positions}
    rng = np.random.default_rng(0)
    grown = []
    for init in model.graph.initializer:
        shape = tuple(dims.get(d, d) for d in init.dims)
        if len(shape) == 1:
            value = (np.ones if init.name.endswith("weight") else np.zeros)(shape, np.float32)
        else:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        grown.append(numpy_helper.from_array(value, init.name))
    del model.graph.initializer[:]
    model.graph.initializer.extend(grown)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Attention" and attr.name == "num_heads":
                attr.i = heads
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name.startswith(("past_", "present_")):
            shape = vi.type.tensor_type.shape.dim
            shape[2].dim_value, shape[4].dim_value = heads, 64
    del model.graph.value_info[:]
    path = folder / f"gpt2-{hidden}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def decode_steps(path: Path, device: str, context: int, steps: int) -> dict[str, Any]:
    """One stateful stage holding the whole decoder on `device`: a `context`-token prompt,
    then `steps` greedy decode steps, with the caches kept on the device and with them copied
    to and from the host each step; ms per step (median), the caches' device, and the logits
    of both and of the CPU."""
    loaded = load_model(path)
    spec = recognize(loaded)
    assert spec is not None, "the grown model is not recognised as a decoder"
    analysis = analyze(loaded)
    (shard,) = make_stateful(extract_shards(loaded, analysis, make_plan(analysis, 1)), spec)
    state = stage_state(shard)
    assert state is not None
    prompt = np.random.default_rng(1).integers(3, 900, (1, context)).astype(spec.ids_dtype)
    out: dict[str, Any] = {}
    logits: dict[str, list[np.ndarray]] = {}
    runs = [("device", device, True), ("host", device, False)]
    runs += [("cpu", "cpu", False)] if device != "cpu" else []
    for label, where, on_device in runs:
        config = SessionConfig(exact=False, providers=providers_for(where))
        stage = StatefulStage(StageRunner(shard, config), state, 1 << 40, on_device=on_device)
        first = stage.run({spec.input_ids: prompt}, 1, 0, context)[spec.logits]
        got, times, token = [first], [], int(first[0, -1].argmax())
        for i in range(steps if label != "cpu" else 4):
            ids = np.asarray([[token]], dtype=spec.ids_dtype)
            t = time.perf_counter()
            step = stage.run({spec.input_ids: ids}, 1, context + i, 1)[spec.logits]
            times.append(time.perf_counter() - t)
            got.append(step)
            token = int(step[0, -1].argmax())
        logits[label] = got
        out[f"{label}_ms"] = statistics.median(times[1:]) * 1e3
        cache = next(iter(stage._seqs[1].cache.values()))
        out[f"{label}_where"] = cache.device_name() if isinstance(cache, ort.OrtValue) \
            else "host (numpy)"
        out["cache_bytes"] = stage.cache_bytes
    out["device_vs_host_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                                         zip(logits["device"], logits["host"], strict=True))
    if "cpu" in logits:
        out["cpu_error"] = max(error(a, b) for a, b in
                               zip(logits["device"], logits["cpu"], strict=False))
        out["cpu_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                                  zip(logits["device"], logits["cpu"], strict=False))
    return out


def decode_nodes(path: Path, device: str, k: int, prompt: list[int], tokens: int
                 ) -> dict[str, Any]:
    """Greedy generation over `k` local nodes started with `--device`: tokens/s of the decode
    steps, the tokens, and the GPU memory the nodes reported."""
    loaded = load_model(path)
    spec = recognize(loaded)
    assert spec is not None
    with LocalCluster(k, device=device) as local, Master(keys=local.master_keys) as master:
        tracker = StateTracker(master.bus, ClusterState.empty())  # before the nodes join
        for address in local.addresses:
            master.connect(address)
        pipeline = Pipeline(master, loaded, analyze(loaded), k=k, exact=False, decoder=spec,
                            recover=False)
        try:
            pipeline.deploy()
            step = pipeline_step(pipeline, spec)
            generate(step, spec, prompt, Sampling(max_new_tokens=4), release=step.release)
            g = generate(step, spec, prompt, Sampling(max_new_tokens=tokens),
                         release=step.release)
            time.sleep(1.5)  # a stats report from every node (each sends one a second)
            memory = max((n.gpu_memory_bytes or 0 for n in tracker.state.nodes.values()),
                         default=0)
            step.close()
        finally:
            pipeline.close()
            tracker.close()
    return {"tokens_per_s": g.tokens_per_s, "ids": list(g.ids), "memory": memory}


def decoder_tables(console: Console, device: str, hidden: int, context: int,
                   tokens: int) -> None:
    with tempfile.TemporaryDirectory(prefix="periphery-gpu-") as tmp:
        path = grow_gpt2(hidden, max(2048, context + tokens + 8), Path(tmp))
        r = decode_steps(path, device, context, tokens)
        if r["device_vs_host_max_diff"] != 0 or r.get("cpu_error", 0.0) > DEVICE_MAX:
            failures.append(f"decoder: caches kept on {device} differ from copied ones by "
                            f"{r['device_vs_host_max_diff']:.2g}, from the CPU by "
                            f"{r.get('cpu_error', 0.0):.2g}")
        t = Table(title=f"GPT-2 topology, hidden {hidden}, 5 layers: one decode step after "
                        f"{context} tokens ({human_bytes(int(r['cache_bytes']))} of KV cache)",
                  title_justify="left")
        for col in ("KV caches", "ms per step (median)", "cache lives in"):
            t.add_column(col, justify="left" if col == "KV caches" else "right")
        t.add_row(f"kept on {device} (IOBinding)", f"{r['device_ms']:.2f}",
                  str(r["device_where"]))
        t.add_row("copied to and from the host", f"{r['host_ms']:.2f}", str(r["host_where"]))
        if "cpu_ms" in r:
            t.add_row("CPU session", f"{r['cpu_ms']:.2f}", str(r["cpu_where"]))
        console.print(t)
        console.print(f"logits: kept against copied differ by at most "
                      f"{r['device_vs_host_max_diff']:.3g}"
                      + (f"; against the CPU's by {r['cpu_max_diff']:.3g} at most, relative "
                         f"error {r['cpu_error']:.2g}" if "cpu_max_diff" in r else ""))
        prompt = np.random.default_rng(2).integers(3, 900, 32).tolist()
        t = Table(title=f"greedy generation over local nodes: 32-token prompt, {tokens} new "
                        "tokens", title_justify="left")
        for col in ("nodes", "decode tokens/s", "tokens equal to the CPU node's", "GPU memory"):
            t.add_column(col, justify="left" if col == "nodes" else "right")
        reference = decode_nodes(path, "cpu", 1, prompt, tokens)
        t.add_row("K = 1, --device cpu", f"{reference['tokens_per_s']:.1f}", "-", "-")
        for k in (1, 2):
            g = decode_nodes(path, device, k, prompt, tokens)
            pairs = zip(g["ids"], reference["ids"], strict=True)
            same = next((i for i, (a, b) in enumerate(pairs) if a != b), tokens)
            t.add_row(f"K = {k}, --device {device}", f"{g['tokens_per_s']:.1f}",
                      f"first {same} of {tokens}",
                      human_bytes(int(g["memory"])) if g["memory"] else "-")
        console.print(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "demo-resnet.onnx")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cuda[:N], or cpu to rehearse")
    parser.add_argument("--hidden", type=int, default=1024, help="the decoder's width")
    parser.add_argument("--context", type=int, default=1024, help="tokens before decoding")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    args = parser.parse_args()
    why = cuda_usable(args.device)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    device = args.device
    console = Console(width=140)
    loaded = load_model(args.model)
    analysis = analyze(loaded)
    shapes = {i.name: (args.batch, *i.shape[1:]) for i in analysis.inputs}
    specs = analyze(loaded, shapes).inputs
    pool = [random_feeds(specs, seed=i) for i in range(8)]
    feeds = [pool[i % len(pool)] for i in range(args.requests)]
    cpu_session = ort.InferenceSession(str(args.model), providers=[CPU])
    references = {"cpu": [cpu_session.run(None, f) for f in feeds]}
    plain_error = 0.0
    if device != "cpu":
        on_device = ort.InferenceSession(str(args.model), providers=list(providers_for(device)))
        references["device"] = [on_device.run(None, f) for f in feeds]
        plain_error = max(error(a, b) for got, ref in zip(references["device"],
                                                           references["cpu"], strict=True)
                          for a, b in zip(got, ref, strict=True))

    t = Table(title=f"{args.model.name}, batch {args.batch}, {os.cpu_count()} cores: "
                    f"{device} against the CPU ({args.requests} requests)",
              title_justify="left")
    for col in ("run", "requests/s, 1 at a time", f"requests/s, {args.inflight} in flight",
                "p50 latency", "GPU use", "GPU memory", "error vs CPU", "error vs ORT there"):
        t.add_column(col, justify="left" if col == "run" else "right")
    cpu = plain(args.model, feeds, (CPU,), args.inflight)
    gpu = plain(args.model, feeds, providers_for(device), args.inflight)
    usage = gpu_usage(0)
    for name, r in (("ONNX Runtime, CPU", cpu), (f"ONNX Runtime, {device}", gpu)):
        t.add_row(name, f"{r['rps_one']:.1f}", f"{r['rps_many']:.1f}",
                  f"{r['p50_s'] * 1e3:.2f} ms", "-", "-",
                  f"{plain_error:.2g}" if device != "cpu" and "CPU" not in name else "-", "-")
    bound = plain_bound(args.model, feeds, device)
    t.add_row(f"ONNX Runtime, {device}, outputs left there", f"{bound['rps_one']:.1f}", "-",
              f"{bound['p50_s'] * 1e3:.2f} ms", "-", "-", "-", "-")
    # K = 1 over workers: how many requests at once a GPU node should compute by default
    for k, workers in ((1, 1), (1, 2), (1, None), (1, 8), (2, None)):
        r = periphery(args.model, shapes, feeds, k, args.inflight, references, device, workers)
        if r.get("device", r["cpu"]) > SHARDED_MAX or r["cpu"] > DEVICE_MAX:
            failures.append(f"K = {k}: error {r.get('device', r['cpu']):.2g} against unsharded "
                            f"ONNX Runtime on {device}, {r['cpu']:.2g} against the CPU")
        each = f"--workers {workers}" if workers else \
            f"{default_workers(device)} workers (the default)"
        t.add_row(f"Periphery K = {k}, --device {device}, {each}", "-", f"{r['rps']:.1f}", "-",
                  "-" if np.isnan(r["gpu_percent"]) else f"{r['gpu_percent']:.0f}%",
                  human_bytes(r["gpu_memory_bytes"]) if r["gpu_memory_bytes"] else "-",
                  f"{r['cpu']:.2g} ({r['cpu_abs']:.2g})",
                  f"{r['device']:.2g} ({r['device_abs']:.2g})" if "device" in r else "-")
    console.print(t)
    if usage is not None:
        console.print(f"GPU 0 after plain ONNX Runtime: {usage.percent:.0f}% use, "
                      f"{usage.memory_used_bytes / 2**20:.0f} of "
                      f"{usage.memory_total_bytes / 2**20:.0f} MiB")
    console.print("error: ||result - reference|| / ||reference||, the worst request (the "
                  "largest absolute difference in parentheses)")
    if GPT2.exists():
        decoder_tables(console, device, args.hidden, args.context, args.tokens)
    else:
        console.print(f"no decoder rows: {GPT2} is missing (../shared beside the project)")
    if failures:
        for line in failures:
            print(f"check failed: {line}", file=sys.stderr)
        return 1
    console.print(f"checks passed: sharded against unsharded on {device} within {SHARDED_MAX:g}, "
                  f"{device} against the CPU within {DEVICE_MAX:g} (relative error)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
