"""Pipeline throughput and per-hop cost through real node processes on this machine.

1. Throughput: the demo model (assets/demo-resnet.onnx) planned into K = 1, 2, 3 stages, each
   on its own local node process (one ONNX Runtime thread each), 8 requests in flight. Ratios
   are against K = 1 measured in the same run. On a machine with C cores, K > C stages share
   cores, so the ideal is min(K, C) x.
2. Per-hop cost: a cheap model (16 Relu over a 1 MiB tensor) run in-process, then through
   1, 2, 4 stages: (latency(K) - latency(1)) / (K - 1) is what one extra hop adds, one request
   at a time, with CurveZMQ keys (the default) and with --insecure, side by side.

Run: `python benchmarks/pipeline.py [--requests 120] [--json out.json]`. Medians throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.partition.planner import make_plan
from periphery_core.runtime.chain import LocalChain
from periphery_core.runtime.feeds import random_feeds
from periphery_core.runtime.session import SessionConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo-resnet.onnx"


def relu_chain(path: Path, n: int = 16, width: int = 256 * 1024) -> Path:
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"], name=f"relu{i}")
             for i in range(n)]
    graph = helper.make_graph(nodes, "hops",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT,
                                                             [1, width])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=8), path)
    return path


def deployed(master: Master, path: Path, k: int) -> Pipeline:
    """The model planned into k stages (reference devices) on the first k nodes."""
    loaded = load_model(path)
    analysis = analyze(loaded)
    pipeline = Pipeline(master, loaded, analysis, plan=make_plan(analysis, k))
    pipeline.deploy([h.node_id for h in master.alive_nodes()][:k])
    return pipeline


def throughput(requests: int, inflight: int) -> list[dict]:
    rows = []
    with LocalCluster(3, threads=1) as local, local.master() as master:
        for k in (1, 2, 3):
            pipeline = deployed(master, DEMO, k)
            feeds = [random_feeds(pipeline.analysis.inputs, i) for i in range(8)]
            list(pipeline.run_many(feeds, inflight=inflight))  # warm-up
            t0 = time.perf_counter()
            list(pipeline.run_many((feeds[i % 8] for i in range(requests)), inflight=inflight))
            wall = time.perf_counter() - t0
            pipeline.close()
            rows.append({"k": k, "rps": requests / wall})
    base = rows[0]["rps"]
    for r in rows:
        r["speedup"] = r["rps"] / base
    return rows


def hops(repeat: int) -> list[dict]:
    """Per-hop latency with keys and with --insecure, requests interleaved between the two."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = relu_chain(Path(tmp) / "hops.onnx")
        loaded = load_model(path)
        analysis = analyze(loaded)
        feeds = random_feeds(analysis.inputs, 0)
        chain = LocalChain([loaded.proto], SessionConfig(exact=True, threads=1))
        local_times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            chain.run(feeds)
            local_times.append(time.perf_counter() - t0)
        rows.append({"where": "in process", "k": 0,
                     "keys_s": statistics.median(local_times),
                     "insecure_s": statistics.median(local_times)})
        with LocalCluster(4, threads=1) as safe, safe.master() as m_safe, \
                LocalCluster(4, threads=1, secure=False) as open_, open_.master() as m_open:
            for k in (1, 2, 4):
                pipelines = {"keys_s": deployed(m_safe, path, k),
                             "insecure_s": deployed(m_open, path, k)}
                for pipeline in pipelines.values():
                    for _ in range(5):
                        pipeline.submit(feeds).result()
                times: dict[str, list[float]] = {name: [] for name in pipelines}
                for _ in range(repeat):
                    for name, pipeline in pipelines.items():
                        t0 = time.perf_counter()
                        pipeline.submit(feeds).result()
                        times[name].append(time.perf_counter() - t0)
                for pipeline in pipelines.values():
                    pipeline.close()
                rows.append({"where": f"{k} node{'s' if k > 1 else ''}", "k": k,
                             **{name: statistics.median(v) for name, v in times.items()}})
    one = next(r for r in rows if r["k"] == 1)
    for r in rows:
        for name in ("keys_s", "insecure_s"):
            r[f"hop_{name}"] = (r[name] - one[name]) / (r["k"] - 1) if r["k"] > 1 else None
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=120)
    tput = throughput(args.requests, args.inflight)
    t = Table(title=f"demo-resnet throughput ({os.cpu_count()} cores, {args.inflight} in flight)",
              title_justify="left")
    for col in ("stages (nodes)", "requests/s", "vs 1 stage"):
        t.add_column(col, justify="right")
    for r in tput:
        t.add_row(str(r["k"]), f"{r['rps']:.1f}", f"{r['speedup']:.2f}x")
    console.print(t)
    hop = hops(args.repeat)
    t = Table(title="per-hop cost, 1 MiB activation, one request at a time (interleaved)",
              title_justify="left")
    for col in ("path", "latency, keys", "per extra hop, keys", "latency, --insecure",
                "per extra hop, --insecure"):
        t.add_column(col, justify="right")

    def ms(v: float | None) -> str:
        return f"{v * 1e3:.2f} ms" if v is not None else "-"

    for r in hop:
        t.add_row(r["where"], ms(r["keys_s"]), ms(r["hop_keys_s"]), ms(r["insecure_s"]),
                  ms(r["hop_insecure_s"]))
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps({"throughput": tput, "hops": hop}, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
