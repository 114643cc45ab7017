"""Waiting on a condition with a deadline: what tests do instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout: float, what: str | Callable[[], str],
             poll: float = 0.05) -> T:
    """Call `condition` until it returns something true and return that; fail the test with
    "timed out ... waiting for <what>" after `timeout` seconds.

    `what` may be a function: it is called once, on failure, so that the message can say how
    things stood at the deadline (the threads still running, the figures last seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {said}")
        time.sleep(poll)
