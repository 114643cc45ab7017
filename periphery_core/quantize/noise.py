"""How far a quantized model's outputs are from the float model's: SQNR, cosine, largest
difference and top-1 agreement.

Key design choice: metrics are accumulated as running sums, so a data set never has to fit in
memory and batches of different shapes (padded text) mix freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from periphery_core.errors import EvaluationError


@dataclass(frozen=True, slots=True)
class OutputMetrics:
    """How close one output of the quantized model is to the float model's, over all samples."""

    name: str
    cosine: float
    max_abs: float
    sqnr_db: float  # inf where the outputs are identical


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10·log10(signal / noise): inf when there is no noise, -inf when there is no signal."""
    if noise_power == 0:
        return math.inf
    if signal_power == 0 or math.isinf(noise_power):
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def powers(ref: np.ndarray, quant: np.ndarray) -> tuple[float, float]:
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
        signal, noise = powers(r, q)
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
class Comparison:
    """The running sums of every output, and the top-1 agreement of class scores."""

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

    def outputs(self) -> tuple[OutputMetrics, ...]:
        """The metrics of every output, in the models' order."""
        return tuple(self.sums[n].metrics(n) for n in self.names)

    @property
    def top1_agreement(self) -> float | None:
        """The fraction of rows of class scores that agree on the argmax; None: no such rows."""
        return self.agree / self.rows if self.rows else None
