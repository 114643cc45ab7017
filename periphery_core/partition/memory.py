"""Stage memory against device caps: which stage starts fit a cap, and why no split does.

A stage holds the distinct initializers its nodes read plus its peak live activations (see
`cost_model`), those once for each request its device computes at once (its workers). Both
only grow as a stage gets longer, so the feasible starts for every end come from one
two-pointer sweep, and a failed plan names the device whose cap no split meets and the least
that device would need.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from periphery_core.partition.cost_model import GraphFacts, OrderLayout
from periphery_core.partition.plan import DeviceSpec
from periphery_core.units import human_bytes


def memory_starts(facts: GraphFacts, layout: OrderLayout, cap: int | None,
                  workers: int = 1) -> np.ndarray:
    """For each end b, the earliest start a with mem(a, b) <= cap (b itself when none), on a
    device that computes `workers` requests at once.

    mem(a, b) only grows with b and shrinks with a, so one two-pointer sweep finds them all,
    keeping per-initializer use counts for the distinct bytes and a deque for the peak.
    """
    n = facts.n
    if cap is None:
        return np.zeros(n + 1, dtype=np.int64)
    starts = np.zeros(n + 1, dtype=np.int64)
    uses = [0] * len(facts.param_bytes)
    held = 0
    live = layout.live.tolist()
    peak: deque[int] = deque()  # positions in the window, live decreasing
    a = 0
    for b in range(1, n + 1):
        p = b - 1
        for q in facts.node_params[layout.order[p]]:
            if uses[q] == 0:
                held += facts.param_bytes[q]
            uses[q] += 1
        while peak and live[peak[-1]] <= live[p]:
            peak.pop()
        peak.append(p)
        while a < b and held + workers * live[peak[0]] > cap:
            for q in facts.node_params[layout.order[a]]:
                uses[q] -= 1
                if uses[q] == 0:
                    held -= facts.param_bytes[q]
            if peak[0] == a:
                peak.popleft()
            a += 1
        starts[b] = a
    return starts


def segment_memory(facts: GraphFacts, layout: OrderLayout, a: int, b: int,
                   workers: int = 1) -> int:
    """Bytes the stage ``[a, b)`` holds: its distinct initializers plus its peak live bytes,
    those for each of `workers` requests at once."""
    params: set[int] = set()
    for v in layout.order[a:b]:
        params.update(facts.node_params[v])
    return sum(facts.param_bytes[p] for p in params) + workers * int(layout.live[a:b].max())


def memory_message(dev: DeviceSpec, cap: int, stage: int, need: int) -> str:
    """The one-line error for a memory cap that no split meets."""
    return (f"the memory cap of device '{dev.name}' ({human_bytes(cap)}) cannot be "
            f"met: in every split, stage {stage} needs at least {human_bytes(need)} "
            f"({_held_text(dev.workers)}); give it more memory, "
            f"{'fewer workers, ' if dev.workers > 1 else ''}or use more or other devices")


def _held_text(workers: int) -> str:
    """What a stage holds, in words: its parameters and each run's activations."""
    if workers == 1:
        return "parameters + activations"
    return f"parameters + activations of {workers} requests at once"


def diagnose_memory(
    facts: GraphFacts,
    layout: OrderLayout,
    devs: Sequence[DeviceSpec],
    stuck: int,
    starts: np.ndarray,
) -> str:
    """Say which device's cap no split meets, and the least it would need."""
    n, k = facts.n, len(devs)
    where = np.flatnonzero(starts[:n])
    w = devs[stuck].workers
    if stuck == k - 1:  # it must hold everything from its start on: the latest start is least
        need = segment_memory(facts, layout, int(where.max()), n, w)
    else:  # its smallest possible stage is a single node
        need = min(segment_memory(facts, layout, int(a), int(a) + 1, w) for a in where)
    return memory_message(devs[stuck], devs[stuck].memory_bytes or 0, stuck, need)
