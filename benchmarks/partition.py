"""Planner quality and speed on the real-model corpus.

For each model in ../shared/data/models and K in 2, 4, 8 it prints:

- `max node`: the costliest single node / (total / K). Where it exceeds 1, no plan can reach
  total / K and the balance target does not apply.
- `balanced`, `even`: compute bottleneck / (total / K) on K equal devices with links so fast
  that transfers cost nothing (pure compute balance; target: balanced <= 1.10 where max node <= 1).
- `LAN`: the balanced plan's bottleneck / (total / K) when links are 1 Gbit/s, so the boundary
  transfers count too.
- `boundary`: bytes crossing the K-1 cuts of the balanced plan.
- `analyze`, `plan`, `extract`: seconds (median of --repeat runs) to load and analyse the model,
  to plan K balanced stages, and to extract the shards (target: analyze + plan + extract < 5 s
  for stories260K at K = 8).

Run: `python benchmarks/partition.py [--repeat 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.extract import extract_shards
from periphery_core.partition.plan import DeviceSpec
from periphery_core.partition.planner import make_plan
from periphery_core.partition.planning_graph import planning_graph

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "data" / "models"
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "stories260K.onnx": {"tokens": (1, 256)},
    "all-MiniLM-L6-v2/model.onnx": {
        "input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)},
    "tiny-random-gpt2-past.onnx": {
        "input_ids": (1, 16), "position_ids": (1, 16), "attention_mask": (1, 48),
        **{f"past_{i}": (2, 1, 4, 32, 8) for i in range(5)},
    },
}
FAST_LINK = 1e18  # bytes/s: transfers cost nothing


def timed(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--models", nargs="*", default=None, help="file names to include")
    args = parser.parse_args()
    if not MODELS.is_dir():
        print(f"shared data not found at {MODELS}", file=sys.stderr)
        return 2
    paths = sorted(MODELS.glob("*.onnx")) + sorted(MODELS.glob("*/model.onnx"))
    if args.models:
        paths = [p for p in paths if p.name in args.models or p.parent.name in args.models]
    table = Table(title="periphery partition benchmark (medians)", title_justify="left")
    cols = ("model", "nodes", "K", "max node", "balanced", "even", "LAN", "boundary",
            "analyze s", "plan s", "extract s")
    for c in cols:
        table.add_column(c, justify="left" if c == "model" else "right")
    rows = []
    for path in paths:
        name = path.parent.name if path.name == "model.onnx" else path.stem
        shapes = SHAPES.get(f"{path.parent.name}/{path.name}" if path.name == "model.onnx"
                            else path.name)  # a folder's model.onnx by its folder

        def load_and_analyze(path=path, shapes=shapes):
            loaded = load_model(path)
            return loaded, analyze(loaded, shapes)

        (loaded, analysis), t_analyze = timed(load_and_analyze, args.repeat)
        graph = planning_graph(analysis)
        total = sum(n.cost_s for n in graph.nodes)
        biggest = max(n.cost_s for n in graph.nodes)
        for k in (2, 4, 8):
            if k > len(analysis.nodes):
                continue
            fast = [DeviceSpec(f"d{i}", bandwidth=FAST_LINK) for i in range(k)]
            bal = make_plan(analysis, k, devices=fast, slack=0.0)  # the exact optimum
            even = make_plan(analysis, k, strategy="even", devices=fast)
            lan, t_plan = timed(lambda a=analysis, k=k: make_plan(a, k), args.repeat)
            _, t_extract = timed(
                lambda m=loaded, a=analysis, p=lan: extract_shards(m, a, p), args.repeat
            )
            ideal = total / k
            row = {
                "model": name, "nodes": len(analysis.nodes), "k": k,
                "max_node": biggest / ideal,
                "balanced": bal.bottleneck_s / ideal, "even": even.bottleneck_s / ideal,
                "lan": lan.bottleneck_s / ideal, "boundary_bytes": lan.boundary_bytes,
                "analyze_s": t_analyze, "plan_s": t_plan, "extract_s": t_extract,
            }
            rows.append(row)
            table.add_row(
                name, str(row["nodes"]), str(k), f"{row['max_node']:.2f}",
                f"{row['balanced']:.3f}", f"{row['even']:.3f}", f"{row['lan']:.2f}",
                f"{row['boundary_bytes'] / 1024:.1f} KiB", f"{t_analyze:.2f}", f"{t_plan:.3f}",
                f"{t_extract:.3f}",
            )
    Console(width=140).print(table)
    ok = [r for r in rows if r["max_node"] <= 1.0]
    worst = max((r["balanced"] for r in ok), default=float("nan"))
    print(f"worst balanced ratio where no node exceeds total/K: {worst:.3f} (target <= 1.10)")
    for r in rows:
        if r["model"] == "stories260K" and r["k"] == 8:
            total_s = r["analyze_s"] + r["plan_s"] + r["extract_s"]
            print(f"stories260K K=8 analyze + plan + extract: {total_s:.2f} s (target < 5 s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
