"""`random`: seeded random feeds shaped from the model's inputs, for calibration without data."""

from __future__ import annotations

from collections.abc import Sequence

from periphery_core.errors import DataError, FeedError
from periphery_core.model.shapes import InputSpec
from periphery_core.quantize.sources.samples import Feeds, SampleSource
from periphery_core.runtime.feeds import random_feeds


class RandomSource(SampleSource):
    """Seeded random feeds shaped from the input specs; sample i uses seed + i."""

    def __init__(self, inputs: Sequence[InputSpec], count: int, seed: int = 0) -> None:
        self.description = f"{count} random samples (seed {seed})"
        super().__init__(inputs, count)
        self._seed = seed
        self._one = tuple(
            InputSpec(s.name, s.dtype, (1, *s.shape[1:]) if s.shape else (), s.kind)
            for s in inputs
        )
        self.sample(0)

    def sample(self, index: int) -> Feeds:
        try:
            return random_feeds(self._one, seed=self._seed + index)
        except FeedError as exc:
            raise DataError(exc.message) from None
