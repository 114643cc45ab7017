"""Text generation over local node processes against onnxruntime-genai in one process.

On `../shared/data/models/smollm2-135m-instruct-int4` (SmolLM2-135M, int4), greedy, side by side
in one run on this machine:

1. Single stream: time to first token and decode tokens/s for onnxruntime-genai in one process
   (its default threads: every core), the unsplit model in this process through Periphery's own
   loop (`whole_model_step`, every core), and Periphery over K = 1, 2, 3 node processes with
   the cores split evenly between the nodes (the same total threads; with K > cores they
   share), and at K = 2, 3 with every node given every core, as nodes on machines of their own
   have (one stage computes at a time in a single stream; idle stages stop spinning). Medians
   over the prompts.
2. Concurrency: 1, 2, 4, 8 sequences generating at once at K = 2, cores split evenly, each
   sequence in its own thread; their decode steps batched into shared runs of each stage
   (generate.batching), and, for comparison, 4 and 8 sequences with every step on its own.
   Two rates: all new tokens over the wall time (the prefills included), and the decode rate
   while every sequence decodes (the steps that come back between the last sequence's first
   token and the first sequence's last), which compares with a single stream's decode rate.
3. Bytes that cross one stage boundary per decoded token against the context length, at K = 3.
4. The shape: the same cores as one pipeline of 2 stages or as 2 replicas of 1 stage (each
   sequence on one replica, its caches there), with 1 and 4 sequences at once, in turn
   `--shape-repeat` times; and the shape the planner picks for one node per core.

Run: `python benchmarks/generate.py [--tokens 32] [--prompts 5] [--concurrent-tokens 96]
[--shape-repeat 3]`.
Needs the dev extra (onnxruntime-genai) and ../shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.generate.decoder import DecoderSpec, recognize
from periphery_core.generate.engine import (
    Generation,
    Sampling,
    Step,
    TextCodec,
    generate,
    pipeline_step,
    whole_model_step,
)
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.model.loading import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "data" / "models" / "smollm2-135m-instruct-int4"
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Why is the sky blue?", "Explain what a pipeline is in one paragraph.",
    "Tell me a short story about a robot.", "List five fruits and their colours.",
    "What is 12 times 12?", "Describe a cat to someone who has never seen one.",
]


def _stats(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))


def genai_single(prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    model = og.Model(str(MODEL))
    runs = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + tokens,
                                  min_length=len(ids) + tokens)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        n = 1
        t1 = time.perf_counter()
        while not gen.is_done() and n < tokens:
            gen.generate_next_token()
            n += 1
        runs.append((ttft, (n - 1) / (time.perf_counter() - t1)))
    return _stats(runs)


def periphery_single(step: Step, spec: DecoderSpec, prompts: list[list[int]],
                     tokens: int) -> tuple[float, float]:
    runs = []
    for ids in prompts:
        g = generate(step, spec, ids, Sampling(max_new_tokens=tokens),
                     release=getattr(step, "release", None))
        runs.append((g.ttft_s, g.tokens_per_s))
    return _stats(runs)


class _Deployed:
    """A LocalCluster of K nodes with the model deployed as stateful stages."""

    def __init__(self, loaded: LoadedModel, spec: DecoderSpec, k: int,
                 every_core: bool = False, replicas: int = 1) -> None:
        cores, nodes = os.cpu_count() or 1, k * replicas
        self.cluster = LocalCluster(nodes, threads=cores if every_core else max(1, cores // nodes))
        self.cluster.start()
        self.master = Master(keys=self.cluster.master_keys)
        handles = [self.master.connect(a) for a in self.cluster.addresses]
        self.pipeline = Pipeline(self.master, loaded, analyze(loaded), k=k, replicas=replicas,
                                 exact=False, decoder=spec, recover=False)
        self.pipeline.deploy([h.node_id for h in handles])
        self.step = pipeline_step(self.pipeline, spec)
        self.single = pipeline_step(self.pipeline, spec, batch=False)

    def release(self, seq: int) -> None:
        self.step.release(seq)

    def close(self) -> None:
        self.step.close()
        self.pipeline.close()
        self.master.close()
        self.cluster.stop()


def concurrent(d: _Deployed, spec: DecoderSpec, prompts: list[list[int]], tokens: int,
               streams: int, batch: bool = True) -> tuple[float, float, float]:
    """(new tokens over the wall time, prefills included; decode tokens/s while every
    sequence decodes; sequences per decode step)."""
    done: list[Generation] = []
    stamps: list[list[float]] = []  # per sequence: when each of its steps came back
    lock = threading.Lock()
    step = d.step if batch else d.single

    def one(ids: list[int]) -> None:
        mine: list[float] = []

        def timed(x: Any, seq: int, pos: int) -> Any:
            out = step(x, seq, pos)
            mine.append(time.perf_counter())
            return out

        g = generate(timed, spec, ids, Sampling(max_new_tokens=tokens), release=step.release)
        with lock:
            done.append(g)
            stamps.append(mine)

    threads = [threading.Thread(target=one, args=(prompts[i % len(prompts)],))
               for i in range(streams)]
    batches, rows = step.batches, step.rows
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(g.new_tokens for g in done) / (time.perf_counter() - t0)
    # The window in which every sequence is past its prefill and not yet done.
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if start < t <= end)
    decode = inside / (end - start) if end > start else 0.0
    sent = step.batches - batches
    return rate, decode, (step.rows - rows) / sent if sent else 1.0


def shapes(loaded: LoadedModel, spec: DecoderSpec, prompts: list[list[int]], tokens: int,
           repeat: int) -> tuple[str, list[tuple[str, int, float, float]]]:
    """The planner's shape for one node per core, and K = 2 against 2 replicas x 1 stage on
    the same cores: tokens/s with 1 and 4 sequences at once, medians of `repeat` runs in
    turn."""
    from periphery_core.generate.planning import plan_shape
    from periphery_core.partition.plan import DeviceSpec

    cores = os.cpu_count() or 1
    picked = plan_shape(loaded, analyze(loaded), [DeviceSpec(f"n{i}") for i in range(cores)],
                        decoder=spec)
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(repeat):
        for name, k, r in (("1 x 2 stages", 2, 1), ("2 replicas x 1 stage", 1, 2)):
            d = _Deployed(loaded, spec, k, replicas=r)
            try:
                for streams in (1, 4):
                    rate, decode, _ = concurrent(d, spec, prompts, tokens, streams)
                    runs.setdefault((name, streams), []).append((rate, decode))
            finally:
                d.close()
    return picked.shape_reason, [
        (name, streams, statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
        for (name, streams), v in runs.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--shape-repeat", type=int, default=3,
                        help="runs of each shape in the pipeline-or-replicas table")
    parser.add_argument("--concurrent-tokens", type=int, default=96,
                        help="new tokens per sequence in the concurrency table")
    args = parser.parse_args()
    if not MODEL.is_dir():
        print(f"needs {MODEL}", file=sys.stderr)
        return 2
    console = Console(width=130)
    loaded = load_model(MODEL)
    spec = recognize(loaded)
    assert spec is not None
    codec = TextCodec(MODEL)
    prompts = [codec.encode(codec.prompt(p)) for p in PROMPTS[:args.prompts]]
    rows: list[tuple[str, float, float]] = []
    rows.append(("onnxruntime-genai, one process", *genai_single(prompts, args.tokens)))
    rows.append(("Periphery loop, unsplit, one process",
                 *periphery_single(whole_model_step(loaded, spec), spec, prompts, args.tokens)))
    base = rows[0][2]
    k2_single = 0.0
    k1_single = 0.0
    concurrency: list[tuple[str, int, float, float, float]] = []
    for k, every in ((1, False), (2, False), (3, False), (2, True), (3, True)):
        d = _Deployed(loaded, spec, k, every_core=every)
        try:
            ttft, tps = periphery_single(d.step, spec, prompts, args.tokens)
            cores = "every core per node" if every else "cores split"
            rows.append((f"Periphery, K = {k} node processes, {cores}", ttft, tps))
            k1_single = tps if k == 1 else k1_single
            k2_single = tps if (k, every) == (2, True) else k2_single
            if (k, every) == (2, False):
                n = args.concurrent_tokens
                concurrency = [("batched", c, *concurrent(d, spec, prompts, n, c))
                               for c in (1, 2, 4, 8)]
                concurrency += [("one at a time", c,
                                 *concurrent(d, spec, prompts, n, c, batch=False))
                                for c in (4, 8)]
            if (k, every) == (3, False):
                bytes_rows = []
                for context in (16, 128, 512, 1024):
                    ids = [100 + (i % 40000) for i in range(context)]
                    g = generate(d.step, spec, ids, Sampling(max_new_tokens=8),
                                 release=d.release)
                    bytes_rows.append((context, g.decode_bytes_per_token_per_hop))
        finally:
            d.close()
    table = Table(title=f"single stream, {args.tokens} new tokens, median of {len(prompts)} "
                        f"prompts, {os.cpu_count()} cores")
    for col in ("run", "time to first token", "decode tokens/s", "vs onnxruntime-genai"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for name, ttft, tps in rows:
        table.add_row(name, f"{ttft * 1000:.0f} ms", f"{tps:.1f}", f"{tps / base:.2f}x")
    console.print(table)
    conc = Table(title=f"K = 2, cores split: sequences generating at once, "
                       f"{args.concurrent_tokens} new tokens each")
    for col in ("decode steps", "sequences", "tokens/s, prefills included",
                "decode tokens/s, all decoding", "decode vs single stream K = 1",
                "sequences per step"):
        conc.add_column(col, justify="right")
    for how, c, rate, decode, per_step in concurrency:
        conc.add_row(how, str(c), f"{rate:.1f}", f"{decode:.1f}", f"{decode / k1_single:.2f}x",
                     f"{per_step:.1f}")
    console.print(conc)
    hops = Table(title="K = 3: bytes crossing one boundary per decoded token")
    for col in ("context tokens", "bytes per token per hop", "vs 16 tokens"):
        hops.add_column(col, justify="right")
    for context, b in bytes_rows:
        hops.add_row(str(context), f"{b:.0f}", f"{b / bytes_rows[0][1]:.2f}x")
    console.print(hops)
    reason, shaped = shapes(loaded, spec, prompts, args.concurrent_tokens, args.shape_repeat)
    shape_table = Table(title=f"the same {os.cpu_count()} cores as a pipeline or as replicas, "
                              f"{args.concurrent_tokens} new tokens each, median of "
                              f"{args.shape_repeat} runs in turn")
    for col in ("shape", "sequences", "tokens/s, prefills included", "vs 1 x 2 stages"):
        shape_table.add_column(col, justify="right" if col != "shape" else "left")
    pipe = {streams: rate for name, streams, rate, _ in shaped if name == "1 x 2 stages"}
    for name, streams, rate, _ in shaped:
        shape_table.add_row(name, str(streams), f"{rate:.1f}", f"{rate / pipe[streams]:.2f}x")
    console.print(shape_table)
    console.print(f"the planner's shape for {os.cpu_count()} nodes: {reason}")
    console.print(f"K = 2 single stream (every core per node) vs K = 1: "
                  f"{k2_single / k1_single:.2f}x; KV cache per token if it travelled: "
                  f"{spec.cache_bytes_per_token()} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
