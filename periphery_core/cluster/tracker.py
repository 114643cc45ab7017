"""A live view of the cluster: events from a bus folded into a `ClusterState`.

The fold itself is pure (`state.apply`); this is the one place that holds the current state,
behind a lock, for readers on other threads (the CLI, the app's timers, the HTTP server).
"""

from __future__ import annotations

import threading

from periphery_core.cluster.bus import EventBus
from periphery_core.cluster.events import Event
from periphery_core.cluster.state import ClusterState, apply


class StateTracker:
    """Subscribe to a bus and keep the folded state."""

    def __init__(self, bus: EventBus, initial: ClusterState | None = None) -> None:
        self._lock = threading.Lock()
        self._state = initial or ClusterState.empty()
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            self._state = apply(self._state, event)

    @property
    def state(self) -> ClusterState:
        with self._lock:
            return self._state

    def close(self) -> None:
        self._unsubscribe()
