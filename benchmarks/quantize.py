"""Quantization method by method: task metric, size and latency against fp32, one run.

- mnist-8: accuracy on MNIST test images 200..9999, calibrated on images 0..199.
- all-MiniLM-L6-v2: STS-B test Spearman x100 (mean pooling, L2-normalised, max_length 128),
  calibrated on 64 STS-B sentences.
- demo-resnet (assets/): a conv model heavy enough to time; calibrated on the shared photos,
  judged by top-1 agreement with fp32 on them. Target: static INT8 latency <= 0.7x fp32.

Latency is the median of single-batch runs with graph optimizations on, fp32 and quantized
interleaved. Methods that need an optional extra (Intel Neural Compressor: awq, smoothquant)
say so instead of a figure. Run: `python benchmarks/quantize.py [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from periphery_core.errors import PeripheryError
from periphery_core.model import load_model
from periphery_core.model.analysis import analyze
from periphery_core.model.loading import save_model
from periphery_core.quantize.config import method_config
from periphery_core.quantize.evaluate import evaluate
from periphery_core.quantize.methods import quantize
from periphery_core.quantize.sizes import matmul_weight_ratio
from periphery_core.quantize.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MNIST = DATA / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz"
MINILM = DATA / "models" / "all-MiniLM-L6-v2"
STSB = DATA / "datasets" / "stsb" / "sts-test.tsv"

CASES = [
    ("mnist-8", DATA / "models" / "mnist-8.onnx", None,
     f"mnist:{MNIST}?range=0:200", f"mnist:{MNIST}?range=200:10000",
     [("static", None), ("dynamic", None)]),
    ("all-MiniLM-L6-v2", MINILM / "model.onnx",
     {"input_ids": (1, 128), "attention_mask": (1, 128), "token_type_ids": (1, 128)},
     # calibration batches padded to one length: INC concatenates them
     f"stsb:{STSB}?tokenizer={MINILM / 'tokenizer.json'}&max_length=128&padding=max_length",
     f"stsb:{STSB}?tokenizer={MINILM / 'tokenizer.json'}&max_length=128",
     [("dynamic", None), ("rtn", 4), ("smoothquant", None), ("awq", 4)]),
    ("demo-resnet", ROOT / "assets" / "demo-resnet.onnx", None,
     f"images:{DATA / 'datasets' / 'images'}?mean=0.485,0.456,0.406&std=0.229,0.224,0.225",
     f"images:{DATA / 'datasets' / 'images'}?mean=0.485,0.456,0.406&std=0.229,0.224,0.225",
     [("static", None), ("dynamic", None)]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 2
    rows = []
    table = Table(title="quantization vs fp32 (medians, one run)", title_justify="left")
    for col in ("model", "method", "metric", "fp32", "quantized", "size", "MatMul weights",
                "latency", "time s"):
        table.add_column(col, justify="left" if col in ("model", "method", "metric") else "right")
    for name, path, shapes, calib_spec, eval_spec, methods in CASES:
        if args.models and name not in args.models:
            continue
        loaded = load_model(path)
        analysis = analyze(loaded, shapes)
        for method, bits in methods:
            if args.methods and method not in args.methods:
                continue
            t0 = time.perf_counter()
            try:
                config = method_config(method, bits)
                calib = open_source(calib_spec, analysis.inputs, samples=200 if name == "mnist-8"
                                    else 64) if config.calibrated else None
                result = quantize(loaded, config, calib)
                with tempfile.TemporaryDirectory() as tmp:
                    qpath = Path(tmp) / "q.onnx"
                    save_model(result.model, qpath)
                    source = open_source(eval_spec, analysis.inputs)
                    report = evaluate(path, qpath, source, per_node=0, latency_runs=30)
            except PeripheryError as exc:
                rows.append({"model": name, "method": method, "error": exc.message})
                table.add_row(name, method, f"[yellow]{exc.message[:60]}[/]", *[""] * 6)
                continue
            spent = time.perf_counter() - t0
            metric = report.task_metric
            if metric is None and report.top1_agreement is not None:
                metric = ("top-1 agreement %", 100.0, 100 * report.top1_agreement)
            mm = matmul_weight_ratio(loaded.proto, result.model) if bits == 4 else None
            row = {"model": name, "method": method, "metric": metric[0] if metric else None,
                   "fp32": metric[1] if metric else None,
                   "quantized": metric[2] if metric else None,
                   "size_ratio": report.size_ratio, "matmul_weight_ratio": mm,
                   "latency_ratio": report.latency_ratio, "seconds": spent}
            rows.append(row)
            table.add_row(name, method, row["metric"] or "-",
                          f"{row['fp32']:.2f}" if metric else "-",
                          f"{row['quantized']:.2f}" if metric else "-",
                          f"{report.size_ratio:.2f}x", f"{mm:.2f}x" if mm else "-",
                          f"{report.latency_ratio:.2f}x", f"{spent:.0f}")
    Console(width=130).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
