"""`periphery quantize` and `periphery evaluate`: quantization from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import click
import numpy as np

from periphery_core.cli.common import (
    cli,
    handle_errors,
    input_shape_option,
    inputs_option,
    json_option,
)
from periphery_core.errors import PeripheryError
from periphery_core.quantize.config import METHODS, Engine


def _metric_fn(source: Any, task: str | None) -> tuple[str, Any]:
    """A score for the tolerance search: accuracy, Spearman, or mean output cosine x 100."""
    from periphery_core.quantize.sources import StsbSource
    from periphery_core.quantize.task_metrics import accuracy, spearman_sts

    if isinstance(source, StsbSource):
        return "Spearman x100", lambda m: spearman_sts(m, source)
    if source.labels() is not None and task != "none":
        return "accuracy %", lambda m: accuracy(m, source)
    raise PeripheryError("--tolerance needs labelled --data (e.g. mnist:..., images with "
                         "labels.txt, stsb:...) to measure the metric it holds")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(METHODS), required=True,
              help="dynamic/static: INT8 in ONNX Runtime; rtn/gptq/hqq: 4-bit weight-only "
                   "MatMul; awq/smoothquant: Intel Neural Compressor (extra 'inc').")
@click.option("--bits", type=int, default=None, help="Weight bits (default 8 or 4 by method).")
@click.option("--engine", type=click.Choice(get_args(Engine)), default="auto",
              show_default=True, help="auto: ONNX Runtime where it has the method.")
@click.option("--calib", default=None, metavar="SOURCE",
              help="Calibration data: random, npz:DIR, npz:FILE, npy:DIR, images:DIR?..., "
                   "mnist:IDX?..., text:FILE?tokenizer=..., stsb:TSV?tokenizer=... (default: "
                   "--inputs if given, else random).")
@click.option("--samples", type=int, default=None,
              help="Calibration samples to use (--data is used whole).")
@click.option("--tolerance", type=float, default=None,
              help="Keep the most sensitive nodes in float until the metric on --data drops "
                   "by at most this much.")
@click.option("--data", default=None, metavar="SOURCE",
              help="Evaluation data: the result's report against fp32 on it (as 'periphery "
                   "evaluate' prints); labelled, the metric --tolerance holds (default: "
                   "--calib).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="Quantize the shards of this plan one by one; -o is then a shard folder.")
@click.option("--stage", "stages", type=int, multiple=True,
              help="With --plan: the stages to quantize (default: all); others stay fp32.")
@input_shape_option
@inputs_option
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@json_option
@handle_errors
def quantize(model: Path, method: str, bits: int | None, engine: str, calib: str | None,
             samples: int | None, tolerance: float | None, data: str | None,
             plan_path: Path | None, stages: tuple[int, ...], input_shapes: tuple[str, ...],
             inputs_path: Path | None, output: Path, as_json: bool) -> None:
    """Quantize a model (or the shards of a plan) and write the result."""
    from periphery_core.cli.common import input_specs, load_and_analyze
    from periphery_core.cli.render import console, human_bytes, print_json
    from periphery_core.model import load_model
    from periphery_core.model.loading import save_model
    from periphery_core.model.shapes import overlay_shapes, parse_input_shapes
    from periphery_core.quantize.config import method_config
    from periphery_core.quantize.methods import quantize as run_quantize
    from periphery_core.quantize.sources import open_source
    from periphery_core.quantize.tolerance import quantize_within_tolerance

    if stages and plan_path is None:
        raise PeripheryError("--stage picks among a plan's stages: give the plan with --plan")
    if plan_path is not None and (tolerance is not None or data is not None):
        raise PeripheryError("--tolerance and --data measure a whole model, not a plan's "
                             "shards: quantize the model without --plan for them")
    loaded = load_model(model)
    shapes: dict[str, tuple[int, ...]] = {}
    plan = None
    if plan_path is not None:
        from periphery_core.partition.plan import load_plan, require_plan_for

        plan = load_plan(plan_path)
        require_plan_for(plan, loaded.sha256, loaded.name, str(plan_path))
        shapes = dict(plan.input_shapes)
    shapes = overlay_shapes(loaded, shapes, parse_input_shapes(input_shapes))
    # Per-shard quantization needs the typed graph; a whole model only its inputs.
    analysis = None if plan is None else load_and_analyze(loaded, shapes, inputs=inputs_path)[1]
    inputs = input_specs(loaded, shapes, inputs_path)[0] if analysis is None else analysis.inputs
    config = method_config(method, bits, engine=engine)  # type: ignore[arg-type]
    if not config.calibrated and (calib is not None or samples is not None):
        raise PeripheryError(f"{'--calib' if calib is not None else '--samples'}: {method} "
                             "quantizes without calibration data (static, gptq, awq and "
                             "smoothquant calibrate)")
    calib = calib or (f"npz:{inputs_path}" if inputs_path is not None else None)
    source = None
    if config.calibrated or calib is not None:
        source = open_source(calib or "random", inputs, samples=samples)
    fp32_bytes = loaded.path.stat().st_size
    summary: dict[str, Any] = {"method": method, "engine": config.engine, "output": str(output)}
    if plan is not None:
        from periphery_core.partition.extract import write_shards
        from periphery_core.quantize.pershard import quantize_stages

        chosen = stages or tuple(range(plan.k))
        bad = [s for s in chosen if not 0 <= s < plan.k]
        if bad:
            raise PeripheryError(f"--stage {bad[0]}: the plan has stages 0..{plan.k - 1}")
        assert analysis is not None
        done = quantize_stages(loaded, analysis, plan, {s: config for s in chosen}, source)
        paths = write_shards([d.model for d in done], plan, output)
        summary["stages"] = [{"stage": i, "quantized": i in chosen, "file": str(p),
                              "bytes": p.stat().st_size} for i, p in enumerate(paths)]
        if not as_json:
            for row in summary["stages"]:
                console.print(f"stage {row['stage']}: {'quantized' if row['quantized'] else 'fp32'}"
                              f" -> {row['file']} ({human_bytes(row['bytes'])})")
    else:
        from periphery_core.quantize.evaluate import evaluate

        eval_source = None
        if tolerance is not None or data is not None:
            # all of --data; --samples is calibration's (and --calib's, where it stands in)
            eval_source = open_source(data or calib or "random", inputs,
                                      samples=None if data is not None else samples)
        if tolerance is not None:
            assert eval_source is not None
            name, score = _metric_fn(eval_source, None)
            first = run_quantize(loaded, config, source)
            report = evaluate(loaded.path, first.model, eval_source, per_node=64)
            order = [n.node for n in report.sensitive_nodes]
            baseline = score(loaded.proto)
            result = quantize_within_tolerance(loaded, config, source, score, baseline,
                                               tolerance, order)
            summary.update({"metric": name, "fp32": baseline,
                            "quantized": score(result.model)})
        else:
            result = run_quantize(loaded, config, source)
        output.parent.mkdir(parents=True, exist_ok=True)
        save_model(result.model, output)
        summary.update({"excluded": list(result.excluded), "notes": list(result.notes),
                        "fp32_bytes": fp32_bytes, "bytes": output.stat().st_size,
                        "size_ratio": output.stat().st_size / fp32_bytes})
        if data is not None:  # the result against fp32 on the data given, as `evaluate` does
            assert eval_source is not None
            summary["report"] = _report_dict(evaluate(loaded.path, output, eval_source))
        if not as_json:
            console.print(f"{method} ({config.engine}): wrote {output}, "
                          f"{human_bytes(summary['bytes'])} = {summary['size_ratio']:.2f}x fp32")
            if result.excluded:
                console.print(f"kept in float: {', '.join(result.excluded)}")
            for note in result.notes:
                console.print(f"note: {note}", style="dim")
            if "report" in summary:
                _render_report(summary["report"])
            elif "metric" in summary:
                console.print(f"{summary['metric']}: fp32 {summary['fp32']:.2f}, quantized "
                              f"{summary['quantized']:.2f}")
    if as_json:
        print_json(summary)


@cli.command()
@click.argument("fp32", type=click.Path(path_type=Path))
@click.argument("quantized", type=click.Path(path_type=Path))
@click.option("--data", default=None, metavar="SOURCE",
              help="Evaluation data (same forms as quantize --calib; default: --inputs).")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="Labels for unlabelled --data: a .npy, or a text file with one per line.")
@click.option("--samples", type=int, default=None, help="Evaluate on at most N samples.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--latency-runs", type=int, default=20, show_default=True,
              help="Timed runs of one batch per model for the latency figures.")
@input_shape_option
@inputs_option
@json_option
@handle_errors
def evaluate(fp32: Path, quantized: Path, data: str | None, labels: Path | None,
             samples: int | None, batch_size: int, latency_runs: int,
             input_shapes: tuple[str, ...], inputs_path: Path | None, as_json: bool) -> None:
    """Compare a quantized model with its fp32 original: accuracy, size, latency, SQNR."""
    from periphery_core.cli.common import input_specs
    from periphery_core.cli.render import err_console, print_json
    from periphery_core.model import load_model
    from periphery_core.quantize.evaluate import evaluate as run_evaluate
    from periphery_core.quantize.sources import open_source

    if data is None and inputs_path is None:
        raise PeripheryError("give the evaluation data: --data SOURCE or --inputs FEEDS.npz")
    loaded = load_model(fp32)
    load_model(quantized)  # one clear line if the quantized file is bad
    specs = input_specs(loaded, input_shapes, inputs_path)[0]
    source = open_source(data or f"npz:{inputs_path}", specs, samples=samples)
    if labels is not None:
        source = _Labelled(source, _read_labels(labels, len(source)))
    report = run_evaluate(loaded.path, quantized, source, batch_size=batch_size,
                          latency_runs=latency_runs)
    data_out = _report_dict(report)
    if as_json:
        print_json(data_out)
    else:
        _render_report(data_out)
        if report.batch_size != batch_size:  # a model with a fixed batch runs what it takes
            err_console.print(f"note: --batch-size {batch_size}, but the model takes "
                              f"{report.batch_size} sample{'s' if report.batch_size > 1 else ''}"
                              " per run: ran that", style="dim")


class _Labelled:
    """A data source with labels from a file."""

    def __init__(self, source: Any, labels: np.ndarray) -> None:
        self._source, self._labels = source, labels
        self.description = source.description

    def __len__(self) -> int:
        return len(self._source)

    def batches(self, batch_size: int = 1) -> Any:
        return self._source.batches(batch_size)

    def labels(self) -> np.ndarray:
        return self._labels


def _read_labels(path: Path, count: int) -> np.ndarray:
    if not path.is_file():
        raise PeripheryError(f"labels file not found: {path}")
    try:
        values = (np.load(path, allow_pickle=False) if path.suffix == ".npy"
                  else np.array([float(x) for x in path.read_text().split()]))
    except ValueError:
        raise PeripheryError(f"{path} is not a .npy or a text file of numbers") from None
    if len(values) < count:
        raise PeripheryError(f"{path} has {len(values)} labels for {count} samples")
    return np.asarray(values[:count])


def _report_dict(r: Any) -> dict[str, Any]:
    return {
        "samples": r.samples,
        "outputs": [{"name": o.name, "cosine": o.cosine, "max_abs": o.max_abs,
                     "sqnr_db": o.sqnr_db} for o in r.outputs],
        "top1_agreement": r.top1_agreement,
        "task_metric": None if r.task_metric is None else
        {"name": r.task_metric[0], "fp32": r.task_metric[1], "quantized": r.task_metric[2]},
        "fp32_bytes": r.fp32_bytes, "quant_bytes": r.quant_bytes, "size_ratio": r.size_ratio,
        "fp32_latency_s": r.fp32_latency_s, "quant_latency_s": r.quant_latency_s,
        "latency_ratio": r.latency_ratio, "batch_size": r.batch_size,
        "sensitive_nodes": [{"node": n.node, "op_type": n.op_type, "tensor": n.tensor,
                             "sqnr_db": n.sqnr_db, "local_sqnr_db": n.local_sqnr_db}
                            for n in r.sensitive_nodes],
    }


def _render_report(d: dict[str, Any]) -> None:
    from rich.table import Table

    from periphery_core.cli.render import console, human_bytes, human_seconds

    t = Table(title=f"quantized vs fp32 on {d['samples']} samples", title_justify="left")
    for col in ("output", "cosine", "max abs", "SQNR dB"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in d["outputs"]:
        t.add_row(o["name"], f"{o['cosine']:.5f}", f"{o['max_abs']:.3g}", f"{o['sqnr_db']:.1f}")
    console.print(t)
    if d["task_metric"]:
        m = d["task_metric"]
        console.print(f"{m['name']}: fp32 {m['fp32']:.2f}, quantized {m['quantized']:.2f} "
                      f"({m['quantized'] - m['fp32']:+.2f})")
    if d["top1_agreement"] is not None:
        console.print(f"top-1 agreement {100 * d['top1_agreement']:.2f}%")
    console.print(f"size {human_bytes(d['quant_bytes'])} vs {human_bytes(d['fp32_bytes'])} "
                  f"({d['size_ratio']:.2f}x); latency {human_seconds(d['quant_latency_s'])} vs "
                  f"{human_seconds(d['fp32_latency_s'])} ({d['latency_ratio']:.2f}x)")
    if d["sensitive_nodes"]:
        # ranked by the noise each adds (its own SQNR, upstream noise taken out), and shown so
        console.print("most sensitive, by the noise each adds (SQNR): " + ", ".join(
            f"{n['node']} {n['local_sqnr_db']:.1f} dB" for n in d["sensitive_nodes"][:5]))
