"""The accuracy report: a float model against its quantized copy on the same data.

`evaluate` runs both models over a data source batch by batch and reports, per output, the
cosine similarity, the largest absolute difference and the signal-to-quantization-noise ratio
(SQNR) (`noise`); the agreement of their top-1 classes; a task metric where the data allows one
(`task_metrics`: top-1 accuracy against labels, or STS-B Spearman); file sizes; latency; and the
intermediate tensors whose SQNR is lowest (`sensitivity`), which is where to look when a
quantized model is inaccurate.

Key design choice: latency is measured with the two models interleaved run by run, so machine
noise hits both.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from periphery_core.errors import EvaluationError
from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.quantize.eval_sessions import (
    ModelLike,
    effective_batch,
    model_bytes,
    open_session,
    output_names,
    session_config,
)
from periphery_core.quantize.noise import Comparison, OutputMetrics
from periphery_core.quantize.sensitivity import NodeSensitivity, node_sqnr
from periphery_core.quantize.sources import DataSource, Feeds, StsbSource
from periphery_core.quantize.task_metrics import embed, resolve_task, spearman, top1
from periphery_core.runtime.session import run_session


@dataclass(frozen=True, slots=True)
class EvalReport:
    """The float model against the quantized one."""

    outputs: tuple[OutputMetrics, ...]
    top1_agreement: float | None  # fraction of samples whose class scores agree on the argmax
    task_metric: tuple[str, float, float] | None  # (name, fp32, quantized)
    fp32_bytes: int
    quant_bytes: int
    fp32_latency_s: float  # median of single-batch runs
    quant_latency_s: float
    samples: int
    sensitive_nodes: tuple[NodeSensitivity, ...]  # lowest SQNR first
    batch_size: int = 1  # samples per run: the one asked for, or less where a model fixes it

    @property
    def size_ratio(self) -> float:
        """Quantized size over float size (0.25 for weights cut from 32 to 8 bits)."""
        return self.quant_bytes / self.fp32_bytes if self.fp32_bytes else math.nan

    @property
    def latency_ratio(self) -> float:
        """Quantized latency over float latency (below 1: the quantized model is faster)."""
        return self.quant_latency_s / self.fp32_latency_s if self.fp32_latency_s else math.nan


def _latency(ref_sess: ort.InferenceSession, q_sess: ort.InferenceSession, feeds: Feeds,
             runs: int, progress: ProgressFn | None,
             cancel: CancelToken | None) -> tuple[float, float]:
    for sess in (ref_sess, q_sess):  # warm-up: first runs allocate and pick kernels
        run_session(sess, feeds)
        run_session(sess, feeds)
    ref_times: list[float] = []
    q_times: list[float] = []
    for i in range(runs):
        check(cancel)
        for sess, times in ((ref_sess, ref_times), (q_sess, q_times)):
            start = time.perf_counter()
            run_session(sess, feeds)
            times.append(time.perf_counter() - start)
        report(progress, "Timing", i + 1, runs)
    return statistics.median(ref_times), statistics.median(q_times)


def _batches_of(source: DataSource, bs: int) -> Iterator[tuple[Feeds, ...]]:
    if isinstance(source, StsbSource):
        yield from source.pairs(bs)
    else:
        for feeds in source.batches(bs):
            yield (feeds,)


def evaluate(
    fp32: ModelLike,
    quant: ModelLike,
    source: DataSource,
    *,
    task: str | None = None,
    batch_size: int = 1,
    per_node: int = 10,
    node_samples: int = 32,
    latency_runs: int = 20,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> EvalReport:
    """Compare a float model with its quantized copy on a data source.

    Args:
        fp32: the float model (a path, or a proto).
        quant: the quantized model; it must have the float model's inputs and outputs.
        source: the data; for STS-B data every pair is run (both sentences).
        task: "classification" (top-1 accuracy against the labels), "sts" (Spearman x100), or
            None: "sts" for STS-B data, "classification" when the source has labels, else none.
        batch_size: samples per run (models with a fixed batch of 1 run one at a time).
        per_node: how many of the lowest-SQNR intermediate tensors to report; 0 skips it.
        node_samples: how many samples (from the start of the source) the per-node SQNR uses.
        latency_runs: timed runs of one batch per model.
        threads: ONNX Runtime intra-op threads; None: its default.
        progress: called with `Progress` updates (tasks "Evaluating", "Timing", "Per-node SQNR").
        cancel: checked between batches and runs.

    Raises:
        EvaluationError: the models' outputs differ, the task does not fit the data, or the
            source is empty.
        Cancelled: `cancel` was set.
    """
    resolved = resolve_task(task, source)
    if latency_runs <= 0:
        raise EvaluationError(f"latency_runs must be positive, not {latency_runs}")
    config = session_config(threads)
    with tempfile.TemporaryDirectory() as scratch:
        ref_sess = open_session(fp32, config, Path(scratch, "fp32-0"))
        q_sess = open_session(quant, config, Path(scratch, "quant-0"))
        names = output_names(ref_sess)
        missing = [n for n in names if n not in output_names(q_sess)]
        if missing:
            raise EvaluationError(f"the quantized model has no output '{missing[0]}'; it must "
                                  "keep the float model's outputs")
        bs = effective_batch(batch_size, ref_sess, q_sess)
        comparison = Comparison(names)
        labels = source.labels() if resolved == "classification" else None
        correct = [0, 0]
        similarities: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        first: Feeds | None = None
        seen = 0
        total = source.pair_count if isinstance(source, StsbSource) else len(source)
        report(progress, "Evaluating", 0, total)
        for group in _batches_of(source, bs):
            check(cancel)
            if first is None:
                first = group[0]
            embeddings: list[tuple[np.ndarray, np.ndarray]] = []
            for feeds in group:
                ref = run_session(ref_sess, feeds, names)
                got = run_session(q_sess, feeds, names)
                comparison.add(ref, got)
                if resolved == "sts":
                    embeddings.append((embed(ref, feeds), embed(got, feeds)))
            count = min(bs, total - seen)  # samples in this batch (inputs may have no batch axis)
            if labels is not None:
                expected = labels[seen:seen + count]
                correct[0] += int(np.sum(top1(ref) == expected))
                correct[1] += int(np.sum(top1(got) == expected))
            if embeddings:
                (r1, q1), (r2, q2) = embeddings
                similarities[0].append(np.sum(r1 * r2, axis=1))
                similarities[1].append(np.sum(q1 * q2, axis=1))
            seen += count
            report(progress, "Evaluating", seen, total)
        if first is None or seen == 0:
            raise EvaluationError(f"{source.description} gave no samples to evaluate")
        task_metric: tuple[str, float, float] | None = None
        if resolved == "classification":
            task_metric = ("top-1 accuracy %", 100.0 * correct[0] / seen,
                           100.0 * correct[1] / seen)
        elif resolved == "sts":
            gold = np.asarray(source.labels())[:seen]
            task_metric = ("STS-B Spearman x100",
                           spearman(np.concatenate(similarities[0]), gold),
                           spearman(np.concatenate(similarities[1]), gold))
        fp32_latency, quant_latency = _latency(ref_sess, q_sess, first, latency_runs, progress,
                                               cancel)
    sensitive: list[NodeSensitivity] = []
    if per_node > 0:
        wanted = max(1, node_samples)
        batches = _limited(source.batches(bs), bs, wanted, progress, cancel)
        sensitive = node_sqnr(fp32, quant, batches, per_node, threads=threads, cancel=cancel)
    return EvalReport(
        outputs=comparison.outputs(),
        top1_agreement=comparison.top1_agreement,
        task_metric=task_metric,
        fp32_bytes=model_bytes(fp32),
        quant_bytes=model_bytes(quant),
        fp32_latency_s=fp32_latency,
        quant_latency_s=quant_latency,
        samples=seen,
        sensitive_nodes=tuple(sensitive),
        batch_size=bs,
    )


def _limited(batches: Iterator[Feeds], bs: int, samples: int, progress: ProgressFn | None,
             cancel: CancelToken | None) -> Iterator[Feeds]:
    """The first `samples` samples of a stream of batches of `bs` (the last batch cut to fit;
    a model whose inputs have no batch axis is fed one sample a batch, never cut)."""
    done = 0
    for feeds in batches:
        check(cancel)
        count = bs
        if done + count > samples:
            count = samples - done
            feeds = {k: v[:count] if np.ndim(v) > 0 and len(v) == bs else v
                     for k, v in feeds.items()}
        yield feeds
        done += count
        report(progress, "Per-node SQNR", done, samples)
        if done >= samples:
            return
