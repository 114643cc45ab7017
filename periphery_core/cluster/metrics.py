"""Request metrics for the cluster view: the latency window and per-stage timings.

Design choice: the metric holders are *immutable values*. `LatencyWindow.add` and
`StageStats.add` return a new holder and leave the old one untouched, so
`periphery_core.cluster.state.apply` stays a pure function and any earlier `ClusterState` a UI
still holds keeps its numbers. To keep that cheap, `LatencyWindow` stores its samples as a tuple
of sealed, fixed-size chunks plus a short open tail: an add copies at most one chunk's worth of
references (plus, once per chunk, the tuple of chunk references), and expiry drops whole chunks.
`StageStats` keeps the last few hundred timings per stage as plain tuples. Reads (percentiles,
medians) sort what is in the window; they run at a UI's refresh rate, not per request.

No clock is read here: every time is passed in (`t` of the event, `now` of the reader). How the
figures are shown to Prometheus is the exporter's business (`periphery_core.cluster.exporter`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from periphery_core.cluster.events import StageTiming

QUANTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))
"""The percentiles `LatencyWindow.percentiles` reports, by key."""

_CHUNK = 128  # samples per sealed chunk: bounds the copy an add makes


def percentile(sorted_values: tuple[float, ...] | list[float], q: float) -> float:
    """Percentile by linear interpolation between closest ranks (numpy's default method).

    Args:
        sorted_values: Values in ascending order.
        q: Percentile in [0, 100].

    Returns:
        The interpolated value, or NaN when there are no values.
    """
    n = len(sorted_values)
    if n == 0:
        return math.nan
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = sorted_values[lo], sorted_values[hi]
    return a + (b - a) * frac if frac else a


@dataclass(frozen=True, slots=True)
class _Chunk:
    newest_t: float  # the largest sample time inside: the chunk expires as a whole after it
    samples: tuple[tuple[float, float], ...]  # (t, latency_s)


@dataclass(frozen=True, slots=True)
class LatencyWindow:
    """Request latencies of the last `window_s` seconds; an immutable value.

    A sample at time `t` is inside the window at `now` when ``now - t < window_s``. At most
    `max_samples` of the newest samples are kept (memory stays bounded under any load); when
    that cap cuts into the window, throughput is measured over the span the kept samples cover.

    Attributes:
        window_s: Width of the sliding window in seconds.
        max_samples: Most samples kept and read.
    """

    window_s: float = 30.0
    max_samples: int = 100_000
    _chunks: tuple[_Chunk, ...] = field(default=(), repr=False)
    _tail: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    _count: int = field(default=0, repr=False)
    _first_t: float | None = field(default=None, repr=False)  # earliest sample ever added
    _capped_t: float = field(default=-math.inf, repr=False)  # newest sample dropped for the cap

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")

    def __len__(self) -> int:
        """Number of samples held (including some already outside the window)."""
        return self._count

    def add(self, t: float, latency_s: float) -> LatencyWindow:
        """Return a new window with one more sample; this one is unchanged.

        Args:
            t: When the request completed (seconds, the events' clock).
            latency_s: Its end-to-end latency in seconds.

        Returns:
            The new window.
        """
        tail = self._tail + ((t, latency_s),)  # noqa: RUF005  (one copy, see StageStats.add)
        chunks = self._chunks
        if len(tail) >= _CHUNK:
            chunks = (*chunks, _Chunk(max(s[0] for s in tail), tail))
            tail = ()
        count = self._count + 1
        capped_t = self._capped_t
        # Drop whole chunks that are out of the window as of this sample, or beyond the cap.
        drop = 0
        while drop < len(chunks):
            oldest = chunks[drop]
            expired = t - oldest.newest_t >= self.window_s
            if not expired and count - len(oldest.samples) < self.max_samples:
                break
            if not expired:
                capped_t = max(capped_t, oldest.newest_t)
            count -= len(oldest.samples)
            drop += 1
        first_t = t if self._first_t is None else min(self._first_t, t)
        return LatencyWindow(
            self.window_s, self.max_samples, chunks[drop:] if drop else chunks, tail, count,
            first_t, capped_t,
        )  # fmt: skip

    def _in_window(self, now: float) -> list[tuple[float, float]]:
        """Samples inside the window at `now`, oldest first, at most `max_samples`."""
        out = [
            s
            for chunk in self._chunks
            if now - chunk.newest_t < self.window_s
            for s in chunk.samples
            if now - s[0] < self.window_s
        ]
        out.extend(s for s in self._tail if now - s[0] < self.window_s)
        return out

    def _kept(self, now: float) -> tuple[list[tuple[float, float]], bool]:
        samples = self._in_window(now)
        capped = self._capped_t > now - self.window_s
        if len(samples) > self.max_samples:
            samples = samples[-self.max_samples :]
            capped = True
        return samples, capped

    def latencies(self, now: float) -> list[float]:
        """Latencies inside the window at `now`, in the order they were added.

        Args:
            now: The reader's time (seconds, the events' clock).

        Returns:
            A new list of latencies in seconds.
        """
        return [s[1] for s in self._kept(now)[0]]

    def percentiles(self, now: float) -> dict[str, float]:
        """p50, p90 and p99 of the latencies inside the window at `now`.

        Args:
            now: The reader's time.

        Returns:
            ``{"p50": ..., "p90": ..., "p99": ...}`` in seconds, computed like
            ``numpy.percentile`` (linear); NaN values when the window is empty.
        """
        values = sorted(self.latencies(now))
        return {key: percentile(values, q) for key, q in QUANTILES}

    def throughput(self, now: float) -> float:
        """Completed requests per second over the window at `now`.

        The count of samples in the window divided by ``min(window_s, now - first sample)``,
        so a run younger than the window is not diluted. When the sample cap cut into the
        window, the divisor is the span the kept samples cover instead.

        Args:
            now: The reader's time.

        Returns:
            Requests per second; 0.0 when the window is empty or no time has passed yet.
        """
        samples, capped = self._kept(now)
        if not samples or self._first_t is None:
            return 0.0
        elapsed = min(self.window_s, now - self._first_t)
        if capped:
            elapsed = min(elapsed, now - min(s[0] for s in samples))
        if elapsed <= 0:
            return 0.0
        return len(samples) / elapsed


@dataclass(frozen=True, slots=True)
class StageSummary:
    """Recent timings of one stage, in seconds.

    Attributes:
        stage: Stage index.
        count: Number of timings summarised.
        queue_mean, queue_median: Time waiting in the node's queue.
        compute_mean, compute_median: Time running the shard.
        transfer_mean, transfer_median: Time moving the activation to the stage.
        total_median: Median of queue + compute + transfer per request.
    """

    stage: int
    count: int
    queue_mean: float
    queue_median: float
    compute_mean: float
    compute_median: float
    transfer_mean: float
    transfer_median: float
    total_median: float


def _summarise(stage: int, timings: tuple[StageTiming, ...]) -> StageSummary:
    queue = [x.queue_s for x in timings]
    compute = [x.compute_s for x in timings]
    transfer = [x.transfer_s for x in timings]
    return StageSummary(
        stage=stage,
        count=len(timings),
        queue_mean=math.fsum(queue) / len(queue),
        queue_median=statistics.median(queue),
        compute_mean=math.fsum(compute) / len(compute),
        compute_median=statistics.median(compute),
        transfer_mean=math.fsum(transfer) / len(transfer),
        transfer_median=statistics.median(transfer),
        total_median=statistics.median(x.total_s for x in timings),
    )


@dataclass(frozen=True, slots=True)
class StageStats:
    """The last `max_samples` timings of every stage; an immutable value.

    The window is by count, not time: a stage's summary describes its last `max_samples`
    requests however slow they came.

    Attributes:
        max_samples: Timings kept per stage.
    """

    max_samples: int = 256
    _samples: tuple[tuple[int, tuple[StageTiming, ...]], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {self.max_samples}")

    def add(self, timings: Iterable[StageTiming]) -> StageStats:
        """Return new stats with one request's stage timings added; these are unchanged.

        Args:
            timings: The request's timings, one per stage it passed.

        Returns:
            The new stats.
        """
        per_stage = dict(self._samples)
        keep = self.max_samples
        known = len(per_stage)
        for timing in timings:
            old = per_stage.get(timing.stage, ())
            # Concatenation copies the kept timings once; `(*old[i:], x)` copies them twice.
            per_stage[timing.stage] = old[max(0, len(old) - keep + 1) :] + (timing,)  # noqa: RUF005
        items = tuple(per_stage.items())
        return StageStats(self.max_samples, items if len(items) == known else tuple(sorted(items)))

    def stages(self) -> tuple[int, ...]:
        """Stage indices with at least one timing, ascending."""
        return tuple(stage for stage, _ in self._samples)

    def timings(self, stage: int) -> tuple[StageTiming, ...]:
        """The kept timings of `stage`, oldest first (empty when none)."""
        return dict(self._samples).get(stage, ())

    def summary(self, stage: int) -> StageSummary | None:
        """Means and medians of `stage`'s kept timings, or None when it has none."""
        timings = self.timings(stage)
        return _summarise(stage, timings) if timings else None

    def summaries(self) -> tuple[StageSummary, ...]:
        """A summary per stage with timings, by stage index."""
        return tuple(_summarise(stage, timings) for stage, timings in self._samples)

    def bottleneck(self) -> int | None:
        """The stage with the largest median of queue + compute + transfer time.

        Returns:
            Its index (the lowest on a tie), or None when no timings were added.
        """
        best: StageSummary | None = None
        for summary in self.summaries():
            if best is None or summary.total_median > best.total_median:
                best = summary
        return None if best is None else best.stage
