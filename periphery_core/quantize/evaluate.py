"""The accuracy report: a float model against its quantized copy on the same data.

`evaluate` runs both models over a data source batch by batch and reports, per output, the
cosine similarity, the largest absolute difference and the signal-to-quantization-noise ratio
(SQNR); the agreement of their top-1 classes; a task metric where the data allows one (top-1
accuracy against labels, or STS-B Spearman); file sizes; latency; and the intermediate tensors
whose SQNR is lowest, which is where to look when a quantized model is inaccurate.

Key design choices: metrics are accumulated as running sums, so a data set never has to fit in
memory and batches of different shapes (padded text) mix freely. Accuracy and latency are
measured with ONNX Runtime's graph optimizations on, as a quantized model is deployed (that is
where INT8 kernels replace the QuantizeLinear/DequantizeLinear pairs); the per-node SQNR runs
with them off, so that every intermediate tensor exists under its own name in both models.
Latency is measured with the two models interleaved run by run, so machine noise hits both.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from periphery_core.errors import EvaluationError
from periphery_core.model import loading
from periphery_core.progress import CancelToken, ProgressFn, check, report
from periphery_core.quantize.sources import DataSource, Feeds, StsbSource
from periphery_core.runtime.session import SessionConfig, make_session, run_session

ModelLike = Path | str | onnx.ModelProto
TASKS = ("classification", "sts")




@dataclass(frozen=True, slots=True)
class OutputMetrics:
    """How close one output of the quantized model is to the float model's, over all samples."""

    name: str
    cosine: float
    max_abs: float
    sqnr_db: float  # inf where the outputs are identical


@dataclass(frozen=True, slots=True)
class NodeSensitivity:
    """How much quantization noise one intermediate tensor carries, and how much of it is new.

    `sqnr_db` is the tensor's SQNR: the noise of everything upstream included, so it can only
    fall along the graph. `local_sqnr_db` counts only the noise this node adds: its output's
    noise-to-signal ratio less the worst such ratio among its inputs (inf when it adds none).
    Nodes are ranked by `local_sqnr_db`, so the node that does the damage comes first rather
    than the last layers, which merely inherit it.
    """

    tensor: str
    node: str  # the producing node in the float model
    op_type: str
    sqnr_db: float
    local_sqnr_db: float


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

    @property
    def size_ratio(self) -> float:
        """Quantized size over float size (0.25 for weights cut from 32 to 8 bits)."""
        return self.quant_bytes / self.fp32_bytes if self.fp32_bytes else math.nan

    @property
    def latency_ratio(self) -> float:
        """Quantized latency over float latency (below 1: the quantized model is faster)."""
        return self.quant_latency_s / self.fp32_latency_s if self.fp32_latency_s else math.nan


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal / noise): inf when there is no noise, -inf when there is no signal."""
    if noise_power == 0:
        return math.inf
    if signal_power == 0 or math.isinf(noise_power):
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


# --------------------------------------------------------------------------------------------
# Running sums


@dataclass
class _OutputSums:
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    quant_sq: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: np.ndarray, quant: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).ravel()
        q = np.asarray(quant, dtype=np.float64).ravel()
        signal, noise = _powers(r, q)
        self.signal += signal
        self.noise += noise
        diff = r - q
        self.dot += float(r @ q)
        self.quant_sq += float(q @ q)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def metrics(self, name: str) -> OutputMetrics:
        norms = math.sqrt(self.signal) * math.sqrt(self.quant_sq)
        # Identical outputs are cosine 1 even where both are all zeros.
        cosine = 1.0 if self.noise == 0 else (self.dot / norms if norms else 0.0)
        return OutputMetrics(name, cosine, self.max_abs, sqnr_db(self.signal, self.noise))


def _is_class_scores(arr: np.ndarray) -> bool:
    return arr.ndim == 2 and arr.shape[1] > 1 and arr.dtype.kind == "f"


@dataclass
class _Comparison:
    """Everything the main pass accumulates."""

    names: Sequence[str]
    sums: dict[str, _OutputSums] = field(default_factory=dict)
    agree: int = 0
    rows: int = 0

    def add(self, ref: Sequence[np.ndarray], quant: Sequence[np.ndarray]) -> None:
        for name, r, q in zip(self.names, ref, quant, strict=True):
            if r.shape != q.shape:
                raise EvaluationError(f"output '{name}' has shape {list(r.shape)} in the float "
                                      f"model but {list(q.shape)} in the quantized one")
            self.sums.setdefault(name, _OutputSums()).add(r, q)
            if _is_class_scores(r):
                self.agree += int(np.sum(r.argmax(1) == q.argmax(1)))
                self.rows += r.shape[0]


# --------------------------------------------------------------------------------------------
# Models and sessions


def _proto(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return loading.load_model(model).proto


def _model_bytes(model: ModelLike) -> int:
    """File size including external data files, or the serialized size of a proto."""
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    path = Path(model)
    header = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for init in header.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file()
    )


def _session(model: ModelLike, config: SessionConfig, scratch: Path) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto):
        scratch.mkdir(parents=True, exist_ok=True)
        return make_session(model, config, scratch_dir=scratch)
    path = Path(model)
    if not path.is_file():
        raise EvaluationError(f"model file not found: {path}")
    return make_session(path, config)


def _output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def _fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size a model is fixed at (dimension 0 of its inputs), if it is fixed."""
    for inp in sess.get_inputs():
        if inp.shape and isinstance(inp.shape[0], int):
            return inp.shape[0]
    return None


def _effective_batch(batch_size: int, *sessions: ort.InferenceSession) -> int:
    if batch_size <= 0:
        raise EvaluationError(f"the batch size must be positive, not {batch_size}")
    fixed = {b for b in map(_fixed_batch, sessions) if b is not None}
    # A model exported with a fixed batch of 1 (mnist-8) can only run one sample at a time.
    return min([batch_size, *fixed])


def _config(threads: int | None, exact: bool = False) -> SessionConfig:
    return SessionConfig(exact=exact, threads=threads or 0)


# --------------------------------------------------------------------------------------------
# Task metrics


def _top1(outputs: Sequence[np.ndarray]) -> np.ndarray:
    scores = outputs[0]
    return scores.reshape(scores.shape[0], -1).argmax(axis=1)


def _embed(outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
    """Sentence embeddings: mean over unmasked tokens of the first output, L2-normalised."""
    hidden = outputs[0].astype(np.float64)
    if hidden.ndim == 3:
        mask = feeds.get("attention_mask")
        weights = (np.ones(hidden.shape[:2]) if mask is None else mask.astype(np.float64))
        summed = (hidden * weights[..., None]).sum(axis=1)
        pooled = summed / np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None)
    elif hidden.ndim == 2:
        pooled = hidden  # already one vector per sentence
    else:
        raise EvaluationError(f"the first output has shape {list(hidden.shape)}: expected "
                              "token states [batch, seq, hidden] or sentence vectors")
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def _spearman(predicted: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return 100.0 * float(spearmanr(predicted, gold).statistic)


def _labels_for(source: DataSource) -> np.ndarray:
    labels = source.labels()
    if labels is None:
        raise EvaluationError(f"{source.description} has no labels: accuracy needs them")
    if len(labels) != len(source):
        raise EvaluationError(f"{source.description}: {len(labels)} labels for "
                              f"{len(source)} samples")
    return labels


def accuracy(model: ModelLike, source: DataSource, batch_size: int = 1, *,
             threads: int | None = None, cancel: CancelToken | None = None) -> float:
    """Top-1 accuracy of a classifier against the source's labels, in percent.

    Raises:
        EvaluationError: the source has no labels.
    """
    labels = _labels_for(source)
    with tempfile.TemporaryDirectory() as scratch:
        sess = _session(model, _config(threads), Path(scratch))
        bs = _effective_batch(batch_size, sess)
        correct = seen = 0
        for feeds in source.batches(bs):
            check(cancel)
            predicted = _top1(run_session(sess, feeds))
            correct += int(np.sum(predicted == labels[seen:seen + len(predicted)]))
            seen += len(predicted)
    return 100.0 * correct / seen


def spearman_sts(model: ModelLike, source: StsbSource, batch_size: int = 32, *,
                 threads: int | None = None, cancel: CancelToken | None = None) -> float:
    """STS-B Spearman correlation x100 between cosine similarities and the gold scores.

    Sentence vectors are the first output mean-pooled over the attention mask and L2-normalised.
    """
    with tempfile.TemporaryDirectory() as scratch:
        sess = _session(model, _config(threads), Path(scratch))
        bs = _effective_batch(batch_size, sess)
        return _sts(lambda feeds: run_session(sess, feeds), source, bs, cancel)


def spearman_sts_chain(shards: Sequence[ModelLike], source: StsbSource, batch_size: int = 32, *,
                       threads: int | None = None, cancel: CancelToken | None = None) -> float:
    """`spearman_sts` of a chain of shards run in order (e.g. only some of them quantized)."""
    from periphery_core.runtime.chain import LocalChain

    chain = LocalChain([_proto(s) for s in shards], _config(threads))
    names = chain.output_names
    return _sts(lambda feeds: [chain.run(feeds)[n] for n in names], source, batch_size, cancel)


def _sts(run: Callable[[Feeds], Sequence[np.ndarray]], source: StsbSource, batch_size: int,
         cancel: CancelToken | None) -> float:
    similarities: list[np.ndarray] = []
    for feeds1, feeds2 in source.pairs(batch_size):
        check(cancel)
        e1 = _embed(run(feeds1), feeds1)
        e2 = _embed(run(feeds2), feeds2)
        similarities.append(np.sum(e1 * e2, axis=1))
    return _spearman(np.concatenate(similarities), np.asarray(source.labels()))


# --------------------------------------------------------------------------------------------
# Per-node SQNR


def _node_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node of the main graph that produces it."""
    return {out: node for node in model.graph.node for out in node.output if out}


def _node_label(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    if node.name:
        return node.name
    return f"{node.op_type}_{list(model.graph.node).index(node)}"


def _noise_ratio(signal: float, noise: float) -> float:
    if noise == 0:
        return 0.0
    return math.inf if signal == 0 else noise / signal


def _dequantized_views(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the DequantizeLinear output that its consumers read, in a QDQ model.

    In a QDQ model a float tensor `t` is read through `DequantizeLinear(QuantizeLinear(t))`,
    so that is the value to compare. The quantizer may also fold a Relu into the quantization
    range and give its name to the tensor before it: only after the Q/DQ pair do the two
    models mean the same thing by that name.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    views: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not node.output:
            continue
        after = [c for c in consumers.get(node.output[0], [])
                 if c.op_type == "DequantizeLinear"]
        if after and after[0].output:
            views.setdefault(node.input[0], after[0].output[0])
    return views


def _powers(ref: np.ndarray, quant: np.ndarray) -> tuple[float, float]:
    """Σ ref² and Σ (ref − quant)² in float64, over the finite values of the reference.

    Masks hold ±inf or the float minimum on purpose: equal non-finite values are no noise, and
    a non-finite value where the reference has none (or another one) is infinite noise.
    """
    r = np.asarray(ref, dtype=np.float64).ravel()
    q = np.asarray(quant, dtype=np.float64).ravel()
    finite = np.isfinite(r)
    if not finite.all():
        if np.any(r[~finite] != q[~finite]):
            return float(r[finite] @ r[finite]), math.inf
        r, q = r[finite], q[finite]
    if not np.isfinite(q).all():
        return float(r @ r), math.inf
    with np.errstate(over="ignore"):
        diff = r - q
        return float(r @ r), float(diff @ diff)


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    # A name alone is enough: ONNX Runtime types the extra outputs from the graph itself.
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return exposed


def node_sqnr(fp32: ModelLike, quant: ModelLike, feeds_iter: Iterable[Feeds], limit: int, *,
              threads: int | None = None,
              cancel: CancelToken | None = None) -> list[NodeSensitivity]:
    """The `limit` nodes that add the most quantization noise, worst first.

    Every float tensor that a node produces under the same name in both models becomes an
    extra output; both models run (optimizations off, so no tensor is fused away) on each feed,
    and SQNR = 10·log10(Σ ref² / Σ (ref − quant)²) over all feeds. Each tensor is attributed to
    the node that produces it in the float model, and ranked by the noise that node adds (see
    `NodeSensitivity`); inputs that are not measured (graph inputs, weights) count as clean, so
    weight quantization is charged to the node that reads the weights. Ties: lower SQNR first,
    then the float graph's order.
    """
    fp32_proto, quant_proto = _proto(fp32), _proto(quant)
    producers = _node_outputs(fp32_proto)
    quant_tensors = set(_node_outputs(quant_proto))
    shared = [t for t in producers if t in quant_tensors]
    if not shared or limit <= 0:
        return []
    seen_as = _dequantized_views(quant_proto)
    q_names = [seen_as.get(t, t) for t in shared]
    config = _config(threads, exact=True)
    with tempfile.TemporaryDirectory() as scratch:
        ref_dir, q_dir = Path(scratch, "fp32"), Path(scratch, "quant")
        ref_dir.mkdir()
        q_dir.mkdir()
        ref_sess = make_session(_with_outputs(fp32_proto, shared), config, ref_dir)
        q_sess = make_session(_with_outputs(quant_proto, q_names), config, q_dir)
        sums: dict[str, list[float]] = {}
        for feeds in feeds_iter:
            check(cancel)
            ref = dict(zip(shared, run_session(ref_sess, feeds, shared), strict=True))
            got = dict(zip(shared, run_session(q_sess, feeds, q_names), strict=True))
            for name in shared:
                r, q = np.asarray(ref[name]), np.asarray(got[name])
                if r.dtype.kind != "f" or q.dtype.kind != "f" or r.shape != q.shape:
                    continue
                signal, noise = _powers(r, q)
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += signal
                acc[1] += noise
    ratios = {t: _noise_ratio(*sums[t]) for t in sums}
    found: list[NodeSensitivity] = []
    for tensor in shared:
        if tensor not in sums:
            continue
        node = producers[tensor]
        inherited = max((ratios.get(i, 0.0) for i in node.input if i), default=0.0)
        added = ratios[tensor] - inherited if ratios[tensor] != inherited else 0.0
        local = math.inf if added <= 0 else -10.0 * math.log10(added)
        found.append(NodeSensitivity(tensor, _node_label(fp32_proto, node), node.op_type,
                                     sqnr_db(*sums[tensor]), local))
    found.sort(key=lambda n: (n.local_sqnr_db, n.sqnr_db))
    return found[:limit]


# --------------------------------------------------------------------------------------------
# Latency


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


# --------------------------------------------------------------------------------------------
# The report


def _resolve_task(task: str | None, source: DataSource) -> str | None:
    if task is None:
        if isinstance(source, StsbSource):
            return "sts"
        return "classification" if source.labels() is not None else None
    if task not in TASKS:
        raise EvaluationError(f"unknown task '{task}'; use one of: {', '.join(TASKS)}")
    if task == "sts" and not isinstance(source, StsbSource):
        raise EvaluationError("the sts task needs STS-B data: --data stsb:FILE.tsv?tokenizer=...")
    if task == "classification":
        _labels_for(source)
    return task


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
    resolved = _resolve_task(task, source)
    if latency_runs <= 0:
        raise EvaluationError(f"latency_runs must be positive, not {latency_runs}")
    config = _config(threads)
    with tempfile.TemporaryDirectory() as scratch:
        ref_sess = _session(fp32, config, Path(scratch, "fp32-0"))
        q_sess = _session(quant, config, Path(scratch, "quant-0"))
        names = _output_names(ref_sess)
        missing = [n for n in names if n not in _output_names(q_sess)]
        if missing:
            raise EvaluationError(f"the quantized model has no output '{missing[0]}'; it must "
                                  "keep the float model's outputs")
        bs = _effective_batch(batch_size, ref_sess, q_sess)
        comparison = _Comparison(names)
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
                    embeddings.append((_embed(ref, feeds), _embed(got, feeds)))
            count = min(bs, total - seen)  # samples in this batch (inputs may have no batch axis)
            if labels is not None:
                expected = labels[seen:seen + count]
                correct[0] += int(np.sum(_top1(ref) == expected))
                correct[1] += int(np.sum(_top1(got) == expected))
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
                           _spearman(np.concatenate(similarities[0]), gold),
                           _spearman(np.concatenate(similarities[1]), gold))
        fp32_latency, quant_latency = _latency(ref_sess, q_sess, first, latency_runs, progress,
                                               cancel)
    sensitive: list[NodeSensitivity] = []
    if per_node > 0:
        wanted = max(1, node_samples)
        batches = _limited(source.batches(bs), bs, wanted, progress, cancel)
        sensitive = node_sqnr(fp32, quant, batches, per_node, threads=threads, cancel=cancel)
    return EvalReport(
        outputs=tuple(comparison.sums[n].metrics(n) for n in names),
        top1_agreement=comparison.agree / comparison.rows if comparison.rows else None,
        task_metric=task_metric,
        fp32_bytes=_model_bytes(fp32),
        quant_bytes=_model_bytes(quant),
        fp32_latency_s=fp32_latency,
        quant_latency_s=quant_latency,
        samples=seen,
        sensitive_nodes=tuple(sensitive),
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
