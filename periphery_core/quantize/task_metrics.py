"""Task metrics where the data allows one: top-1 accuracy against labels, STS-B Spearman.

`accuracy` and `spearman_sts` score one model (the tolerance search compares candidates by
them); `evaluate` uses the same pieces to score the float and the quantized model side by side.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import EvaluationError
from periphery_core.progress import CancelToken, check
from periphery_core.quantize.eval_sessions import (
    ModelLike,
    effective_batch,
    open_session,
    proto_of,
    session_config,
)
from periphery_core.quantize.sources import DataSource, Feeds, StsbSource
from periphery_core.runtime.session import run_session

TASKS = ("classification", "sts")


def top1(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """The predicted class of each row: the argmax of the first output."""
    scores = outputs[0]
    return scores.reshape(scores.shape[0], -1).argmax(axis=1)


def embed(outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
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


def spearman(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Spearman's rank correlation x100."""
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


def resolve_task(task: str | None, source: DataSource) -> str | None:
    """The task to score: `task` checked against the data, or the one the data allows.

    Raises:
        EvaluationError: an unknown task, or one the data cannot score.
    """
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


def accuracy(model: ModelLike, source: DataSource, batch_size: int = 1, *,
             threads: int | None = None, cancel: CancelToken | None = None) -> float:
    """Top-1 accuracy of a classifier against the source's labels, in percent.

    Raises:
        EvaluationError: the source has no labels.
    """
    labels = _labels_for(source)
    with tempfile.TemporaryDirectory() as scratch:
        sess = open_session(model, session_config(threads), Path(scratch))
        bs = effective_batch(batch_size, sess)
        correct = seen = 0
        for feeds in source.batches(bs):
            check(cancel)
            predicted = top1(run_session(sess, feeds))
            correct += int(np.sum(predicted == labels[seen:seen + len(predicted)]))
            seen += len(predicted)
    return 100.0 * correct / seen


def spearman_sts(model: ModelLike, source: StsbSource, batch_size: int = 32, *,
                 threads: int | None = None, cancel: CancelToken | None = None) -> float:
    """STS-B Spearman correlation x100 between cosine similarities and the gold scores.

    Sentence vectors are the first output mean-pooled over the attention mask and L2-normalised.
    """
    with tempfile.TemporaryDirectory() as scratch:
        sess = open_session(model, session_config(threads), Path(scratch))
        bs = effective_batch(batch_size, sess)
        return _sts(lambda feeds: run_session(sess, feeds), source, bs, cancel)


def spearman_sts_chain(shards: Sequence[ModelLike], source: StsbSource, batch_size: int = 32, *,
                       threads: int | None = None, cancel: CancelToken | None = None) -> float:
    """`spearman_sts` of a chain of shards run in order (e.g. only some of them quantized)."""
    from periphery_core.runtime.chain import LocalChain

    chain = LocalChain([proto_of(s) for s in shards], session_config(threads))
    names = chain.output_names
    return _sts(lambda feeds: [chain.run(feeds)[n] for n in names], source, batch_size, cancel)


def _sts(run: Callable[[Feeds], Sequence[np.ndarray]], source: StsbSource, batch_size: int,
         cancel: CancelToken | None) -> float:
    similarities: list[np.ndarray] = []
    for feeds1, feeds2 in source.pairs(batch_size):
        check(cancel)
        e1 = embed(run(feeds1), feeds1)
        e2 = embed(run(feeds2), feeds2)
        similarities.append(np.sum(e1 * e2, axis=1))
    return spearman(np.concatenate(similarities), np.asarray(source.labels()))
