"""Text generation over local node processes against onnxruntime-genai in one process.

On `../shared/data/models/smollm2-135m-instruct-int4` (SmolLM2-135M, int4), greedy, side by side
in one run on this machine:

1. Single stream: time to first token and decode tokens/s for onnxruntime-genai in one process
   (its default threads: every core), the unsplit model in this process through Periphery's own
   loop (`whole_model_step`, every core), and Periphery over K = 1, 2, 3 node processes
   (cores split evenly between the nodes; with K > cores they share). Medians over the prompts.
2. Concurrency: aggregate tokens/s with 1, 2, 4, 8 sequences generating at once at K = 2 (each
   sequence in its own thread; the stages' caches hold them all).
3. Bytes that cross one stage boundary per decoded token against the context length, at K = 3.

Run: `python benchmarks/generate.py [--tokens 32] [--prompts 5]`. Needs the dev extra
(onnxruntime-genai) and ../shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

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
from periphery_core.model import analyze, load_model
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
        g = generate(step, spec, ids, Sampling(max_new_tokens=tokens))
        runs.append((g.ttft_s, g.tokens_per_s))
    return _stats(runs)


class _Deployed:
    """A LocalCluster of K nodes with the model deployed as stateful stages."""

    def __init__(self, loaded: LoadedModel, spec: DecoderSpec, k: int) -> None:
        threads = max(1, (os.cpu_count() or 1) // k)
        self.cluster = LocalCluster(k, threads=threads)
        self.cluster.start()
        self.master = Master(keys=self.cluster.master_keys)
        handles = [self.master.connect(a) for a in self.cluster.addresses]
        self.pipeline = Pipeline(self.master, loaded, analyze(loaded), k=k, exact=False,
                                 decoder=spec, recover=False)
        self.pipeline.deploy([h.node_id for h in handles])
        self.step = pipeline_step(self.pipeline, spec)

    def release(self, seq: int) -> None:
        self.master.release_sequences([seq])

    def close(self) -> None:
        self.pipeline.close()
        self.master.close()
        self.cluster.stop()


def concurrent(d: _Deployed, spec: DecoderSpec, prompts: list[list[int]], tokens: int,
               streams: int) -> float:
    done: list[Generation] = []
    lock = threading.Lock()

    def one(ids: list[int]) -> None:
        g = generate(d.step, spec, ids, Sampling(max_new_tokens=tokens), release=d.release)
        with lock:
            done.append(g)

    threads = [threading.Thread(target=one, args=(prompts[i % len(prompts)],))
               for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(g.new_tokens for g in done) / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=5)
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
    concurrency: list[tuple[int, float]] = []
    for k in (1, 2, 3):
        d = _Deployed(loaded, spec, k)
        try:
            ttft, tps = periphery_single(d.step, spec, prompts, args.tokens)
            rows.append((f"Periphery, K = {k} node processes", ttft, tps))
            k1_single = tps if k == 1 else k1_single
            k2_single = tps if k == 2 else k2_single
            if k == 2:
                concurrency = [(c, concurrent(d, spec, prompts, args.tokens, c))
                               for c in (1, 2, 4, 8)]
            if k == 3:
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
    conc = Table(title="K = 2: sequences generating at once")
    for col in ("sequences", "aggregate tokens/s", "vs single stream K = 1"):
        conc.add_column(col, justify="right")
    for c, rate in concurrency:
        conc.add_row(str(c), f"{rate:.1f}", f"{rate / k1_single:.2f}x")
    console.print(conc)
    hops = Table(title="K = 3: bytes crossing one boundary per decoded token")
    for col in ("context tokens", "bytes per token per hop", "vs 16 tokens"):
        hops.add_column(col, justify="right")
    for context, b in bytes_rows:
        hops.add_row(str(context), f"{b:.0f}", f"{b / bytes_rows[0][1]:.2f}x")
    console.print(hops)
    console.print(f"K = 2 single stream vs K = 1: {k2_single / k1_single:.2f}x; KV cache per "
                  f"token if it travelled: {spec.cache_bytes_per_token()} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
