"""Which measured node speeds the planner may trust.

A node measures its speed when it starts and again while idle; until then its speed is unknown
(None), never zero. The planner uses the figures only when it has no reason to doubt them: every
chosen node has one, and nodes reporting identical hardware agree within `SPREAD_LIMIT`. Otherwise
it plans with equal speeds, which is never badly wrong, instead of trusting noise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SPREAD_LIMIT = 1.5  # identical machines whose speeds differ more than this were mismeasured
EQUAL_SPEED = 1.0


@dataclass(frozen=True, slots=True)
class NodeSpeed:
    """One node as the speed check sees it: its hardware and its measured speed, if any."""

    name: str
    device: str
    cores: int
    speed: float | None


@dataclass(frozen=True, slots=True)
class PlanningSpeeds:
    """The speeds to plan with, in the order of the nodes given, and why they are not the
    measured ones (None when they are)."""

    speeds: tuple[float, ...]
    warning: str | None = None


def parse_speed(value: Any) -> float | None:
    """A speed from a node's message: a positive finite number, else None (unknown).

    Older nodes sent 0.0 for "not measured yet"; that is unknown too.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    speed = float(value)
    return speed if math.isfinite(speed) and speed > 0 else None


def planning_speeds(nodes: Sequence[NodeSpeed],
                    spread_limit: float = SPREAD_LIMIT) -> PlanningSpeeds:
    """The speeds the planner should use for `nodes`.

    The measured speeds, unless some node's speed is unknown or nodes with the same device
    and core count differ by more than `spread_limit` (max / min): then `EQUAL_SPEED` for every
    node, with a warning that says why.
    """
    equal = tuple(EQUAL_SPEED for _ in nodes)
    unknown = [n.name for n in nodes if parse_speed(n.speed) is None]
    if unknown:
        return PlanningSpeeds(equal, f"speed of {', '.join(unknown)} not measured yet: "
                                     "planning with equal speeds")
    groups: dict[tuple[str, int], list[NodeSpeed]] = defaultdict(list)
    for n in nodes:
        groups[(n.device, n.cores)].append(n)
    for (device, cores), group in groups.items():
        speeds = [float(n.speed or 0.0) for n in group]
        if len(group) < 2 or max(speeds) <= spread_limit * min(speeds):
            continue
        detail = ", ".join(f"{n.name} {float(n.speed or 0.0):.2f}x" for n in group)
        return PlanningSpeeds(equal, (
            f"nodes with identical hardware ({device}, {cores} cores) measured speeds "
            f"{max(speeds) / min(speeds):.2f}x apart ({detail}), more than the "
            f"{spread_limit:g}x to trust: planning with equal speeds"))
    return PlanningSpeeds(tuple(float(n.speed or 0.0) for n in nodes))
