"""What the planner predicts against what the pipeline then serves, model by model.

For the demo model and the real models of ../shared/data (where present), on 2 local node
processes: the requests per second the planner predicts for the shape it picks, planned on FLOP
estimates alone and on the estimates scaled to the model's timed run on this host (the default,
`generate.planning.calibrated`), against the requests per second the deployed pipeline serves
(`Pipeline.run_many`, 8 in flight, after a warm-up). A prediction of 1.00x is exact; above 1
promises more than is served. The nodes share this host's cores with each other and with the
master, which the cost model does not know (each node is costed as a machine of its own), so
small models, whose requests cost the master and the nodes' Python more than their compute,
are predicted high.

Run: `python benchmarks/predictions.py [--seconds 3] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.pipeline import Pipeline
from periphery_core.generate.planning import calibrated, plan_shape
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.runtime.feeds import random_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "data" / "models"
NAMES = ("mnist-8.onnx", "fastestdet.onnx", "ultraface-rfb-320.onnx", "super-resolution.onnx",
         "light_squeezenet_randw.onnx", "all-MiniLM-L6-v2/model.onnx", "stories260K.onnx")


def measure(path: Path, seconds: float) -> dict:
    loaded = load_model(path)
    analysis = analyze(loaded)
    with LocalCluster(2) as local, local.master() as master:
        devices = master.devices([h.node_id for h in master.alive_nodes()])
        # estimates alone: a measured scale of 1 leaves them as they are
        plain = plan_shape(loaded, dataclasses.replace(analysis, cost_scale=1.0), devices)
        scaled = plan_shape(loaded, analysis, devices)
        pipeline = Pipeline(master, loaded, analysis)
        pipeline.deploy()
        assert pipeline.plan is not None
        feeds = [random_feeds(analysis.inputs, i) for i in range(8)]
        list(pipeline.run_many((feeds[i % 8] for i in range(100)), inflight=8))  # warm-up
        # about `seconds` of requests at the rate the warm-up's second half showed
        t0 = time.perf_counter()
        list(pipeline.run_many((feeds[i % 8] for i in range(100)), inflight=8))
        count = max(200, int(100 * seconds / (time.perf_counter() - t0)))
        t0 = time.perf_counter()
        list(pipeline.run_many((feeds[i % 8] for i in range(count)), inflight=8))
        served = count / (time.perf_counter() - t0)
        shape = pipeline.plan.shape
        pipeline.close()
    return {"model": str(path.relative_to(path.parents[1] if path.parent != MODELS else MODELS)),
            "shape": shape, "scale": calibrated(loaded, analysis).cost_scale,
            "estimated_rps": plain.predicted_rps, "calibrated_rps": scaled.predicted_rps,
            "served_rps": served}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed serving per model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    paths = [ROOT / "assets" / "demo-resnet.onnx"]
    if MODELS.is_dir():
        paths += [MODELS / n for n in NAMES if (MODELS / n).is_file()]
    else:
        print(f"{MODELS} is absent: the demo model only", file=sys.stderr)
    rows = []
    for path in paths:
        rows.append(measure(path, args.seconds))
        print(f"{rows[-1]['model']}: done", file=sys.stderr, flush=True)
    t = Table(title="predicted against served, 2 local nodes, 8 in flight",
              title_justify="left")
    for col in ("model", "shape", "scale", "estimates only", "calibrated (default)", "served"):
        t.add_column(col, justify="left" if col in ("model", "shape") else "right")
    for r in rows:
        t.add_row(r["model"], r["shape"], f"{r['scale']:.2f}" if r["scale"] else "-",
                  f"{r['estimated_rps']:,.0f} ({r['estimated_rps'] / r['served_rps']:.2f}x)",
                  f"{r['calibrated_rps']:,.0f} ({r['calibrated_rps'] / r['served_rps']:.2f}x)",
                  f"{r['served_rps']:,.0f}")
    Console(width=130).print(t)
    ratios = {k: statistics.median(r[f"{k}_rps"] / r["served_rps"] for r in rows)
              for k in ("estimated", "calibrated")}
    print(f"median predicted / served: estimates only {ratios['estimated']:.2f}x, calibrated "
          f"{ratios['calibrated']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "median": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
