"""`stsb:TSV`: STS-B sentence pairs with gold similarity scores, for the Spearman report."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from periphery_core.errors import DataError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.samples import Feeds, check_batch_size
from periphery_core.quantize.sources.text import TextEncoder


class StsbSource:
    """STS-B sentence pairs with gold similarity scores (0-5), from an `sts-*.tsv` file.

    A sample is a pair: `pairs()` yields the feeds of the first and of the second sentences of
    a batch of pairs, and `labels()` gives one gold score per pair. For calibration,
    `batches()` yields every sentence, pair by pair (s1, s2, s1, s2, ...), so `len()` counts
    sentences: twice the number of pairs.
    """

    def __init__(self, path: Path, inputs: Sequence[InputSpec], encoder: TextEncoder,
                 samples: int | None = None) -> None:
        first: list[str] = []
        second: list[str] = []
        scores: list[float] = []
        with path.open(encoding="utf-8", newline="") as handle:
            # STS-B sentences contain unbalanced quotes: the file is plain tab-separated.
            for number, row in enumerate(csv.reader(handle, delimiter="\t",
                                                    quoting=csv.QUOTE_NONE), 1):
                if not row or not "".join(row).strip():
                    continue
                try:
                    score = float(row[4])
                    a, b = row[5], row[6]
                except (IndexError, ValueError):
                    raise DataError(f"{path} line {number} is not an STS-B row (column 5 a "
                                    "score, columns 6 and 7 two sentences)") from None
                first.append(a)
                second.append(b)
                scores.append(score)
        if not scores:
            raise DataError(f"{path} holds no sentence pairs")
        stop = samples if samples is not None else len(scores)
        self.first, self.second = first[:stop], second[:stop]
        self._scores = np.array(scores[:stop], dtype=np.float64)
        self.encoder = encoder
        self.description = f"{len(self._scores)} STS-B pairs from {path.name}"

    def __len__(self) -> int:
        return 2 * len(self._scores)

    @property
    def pair_count(self) -> int:
        return len(self._scores)

    def pairs(self, batch_size: int = 32) -> Iterator[tuple[Feeds, Feeds]]:
        """Feeds for the first and the second sentences of each batch of pairs."""
        check_batch_size(batch_size)
        for start in range(0, self.pair_count, batch_size):
            stop = start + batch_size
            yield (self.encoder.encode(self.first[start:stop]),
                   self.encoder.encode(self.second[start:stop]))

    def batches(self, batch_size: int = 1) -> Iterator[Feeds]:
        check_batch_size(batch_size)
        sentences = [s for pair in zip(self.first, self.second, strict=True) for s in pair]
        for start in range(0, len(sentences), batch_size):
            yield self.encoder.encode(sentences[start:start + batch_size])

    def labels(self) -> np.ndarray | None:
        """Gold scores, one per pair (aligned with `pairs`, not with `batches`)."""
        return self._scores
