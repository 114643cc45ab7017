"""Settling futures that their callers may have given up on.

The master hands out `concurrent.futures.Future`s (a request's result, a node's reply) and
settles them from its own threads. A caller may cancel one meanwhile, or two paths may race to
settle it (a result and a loss); the first settlement wins and the others are no-ops.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from typing import Any


def settle(future: Future, value: Any) -> None:
    """Resolve `future` with `value` (an exception fails it) unless it is already done."""
    if future.done():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled between the check and here
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
