"""What every data source shares: the `DataSource` protocol, and sources built sample by sample.

A `SampleSource` makes one sample at a time (a batch of one, fitted to the model's inputs) and
stacks samples into batches on demand, so a sample's content never depends on the batch size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec

Feeds = dict[str, np.ndarray]


class DataSource(Protocol):
    """Samples of model feeds, in a fixed order, optionally with labels."""

    description: str

    def __len__(self) -> int:
        """Number of samples that `batches` yields in total."""
        ...

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        """Model feeds, in order; every array has the batch dimension first.

        The last batch may be smaller than `batch_size`.
        """
        ...

    def labels(self) -> np.ndarray | None:
        """One label or score per sample, aligned with `batches`' order, or None."""
        ...


def _batch_rank_checked(inputs: Sequence[InputSpec]) -> None:
    for spec in inputs:
        if spec.kind != "tensor":
            raise DataError(f"input '{spec.name}' is a {spec.kind} of tensors: data sources give "
                            "tensors only")


def fit_sample(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """One sample as a batch of one: add the batch dimension if the file left it out."""
    rank = len(spec.shape)
    if arr.dtype != spec.dtype:
        raise DataError(f"'{spec.name}' in {where} is {arr.dtype}; the model expects "
                        f"{spec.dtype} (save it with .astype(np.{spec.dtype.name}))")
    if rank == 0:
        if arr.ndim != 0:
            raise DataError(f"'{spec.name}' in {where} has rank {arr.ndim}; the model expects "
                            "a scalar")
        return arr
    if arr.ndim == rank - 1:
        return arr[np.newaxis]
    if arr.ndim != rank:
        raise DataError(f"'{spec.name}' in {where} has rank {arr.ndim}; the model expects rank "
                        f"{rank} (or {rank - 1} without the batch dimension)")
    if arr.shape[0] != 1:
        raise DataError(f"'{spec.name}' in {where} holds {arr.shape[0]} samples; put one sample "
                        "in each file")
    return arr


def stack_samples(parts: Sequence[Feeds], inputs: Sequence[InputSpec]) -> Feeds:
    """Samples (batches of one) stacked into one batch; they must share their shapes."""
    if len(parts) == 1:
        return dict(parts[0])
    scalars = [s.name for s in inputs if not s.shape]
    if scalars:
        raise DataError(f"input '{scalars[0]}' is a scalar and has no batch dimension: use "
                        "batch size 1")
    out: Feeds = {}
    for spec in inputs:
        arrays = [p[spec.name] for p in parts]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"samples of '{spec.name}' have different shapes "
                            f"({', '.join(map(str, sorted(shapes)))}) and cannot share a batch: "
                            "use batch size 1")
        out[spec.name] = np.concatenate(arrays)
    return out


def check_batch_size(batch_size: int) -> None:
    """Raise `DataError` for a batch size below 1."""
    if batch_size <= 0:
        raise DataError(f"the batch size must be positive, not {batch_size}")


class SampleSource:
    """A source that makes one sample at a time (a batch of one) and stacks them."""

    description = ""

    def __init__(self, inputs: Sequence[InputSpec], count: int,
                 labels: np.ndarray | None = None) -> None:
        _batch_rank_checked(inputs)
        if count <= 0:
            raise DataError(f"{self.description or 'the data source'} holds no samples")
        if labels is not None and len(labels) != count:
            raise DataError(f"{self.description}: {len(labels)} labels for {count} samples")
        self.inputs = tuple(inputs)
        self._count = count
        self._labels = labels

    def __len__(self) -> int:
        return self._count

    def sample(self, index: int) -> Feeds:
        """Feeds for one sample, each with a batch dimension of 1."""
        raise NotImplementedError

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        check_batch_size(batch_size)
        for start in range(0, self._count, batch_size):
            stop = min(self._count, start + batch_size)
            yield stack_samples([self.sample(i) for i in range(start, stop)], self.inputs)

    def labels(self) -> np.ndarray | None:
        return self._labels
