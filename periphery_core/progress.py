"""Progress reporting and cancellation for long operations.

Core operations take `progress: ProgressFn | None` and `cancel: CancelToken | None`. They call
`report(progress, ...)` between steps and `cancel.check()` where stopping is safe. The app runs
them in worker threads and forwards progress as messages; the CLI draws a rich progress bar.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from periphery_core.errors import Cancelled


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress update: `done` of `total` steps of `task`."""

    task: str
    done: int
    total: int
    detail: str = ""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressFn = Callable[[Progress], None]


class CancelToken:
    """A thread-safe flag a caller sets to stop a long operation at its next safe point."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise `Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled("The operation was cancelled.")


def report(
    progress: ProgressFn | None, task: str, done: int, total: int, detail: str = ""
) -> None:
    if progress is not None:
        progress(Progress(task, done, total, detail))


def check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()
