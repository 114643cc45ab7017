"""The event bus: a thread-safe fan-out of cluster events from the master's threads.

Design choice: the bus is the one stateful piece between the master and the views that fold its
events (`periphery_core.cluster.events` holds the event types and their dict and text forms).
It delivers every event to every subscriber (the app, a JSON log writer, a `StateTracker`) in
the same total order, and a subscriber that raises is logged and skipped, never the
publisher's problem.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from periphery_core.cluster.events import Event

log = logging.getLogger(__name__)

Subscriber = Callable[[Event], None]


class EventBus:
    """Thread-safe fan-out of events to subscribers, in one total order.

    Any thread may `publish`. Events are queued and delivered by whichever publishing thread
    finds no delivery in progress, so every subscriber sees every event in the same order, a
    subscriber may publish or (un)subscribe from inside its callback without deadlock, and no
    lock is held while a callback runs. When another thread is delivering, `publish` returns
    once the event is queued and that thread delivers it.

    A callback that raises `Exception` is logged and skipped; the publisher and the other
    subscribers carry on. Callbacks run on the delivering thread, so UI code must hop to its own
    thread (e.g. Textual's `post_message` / `call_from_thread`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Replaced, never mutated, so reading it under the lock is a free snapshot.
        self._subscribers: tuple[tuple[object, Subscriber], ...] = ()
        self._pending: collections.deque[Event] = collections.deque()
        self._delivering = False

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add a subscriber.

        Args:
            callback: Called with each event published from now on.

        Returns:
            A function that removes this subscription; calling it again does nothing.
        """
        key = object()  # one per subscription, so the same callback may subscribe twice
        with self._lock:
            self._subscribers = (*self._subscribers, (key, callback))

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s[0] is not key)

        return unsubscribe

    def publish(self, event: Event) -> None:
        """Deliver an event to every current subscriber.

        Args:
            event: The event. Subscribers see it after every event published before it.
        """
        with self._lock:
            self._pending.append(event)
            if self._delivering:
                return
            self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._delivering = False
                        return
                    current = self._pending.popleft()
                    subscribers = self._subscribers
                for _key, callback in subscribers:
                    try:
                        callback(current)
                    except Exception:
                        log.exception("event subscriber failed on %s", type(current).__name__)
        except BaseException:
            # KeyboardInterrupt/SystemExit from a callback: let the next publish deliver the rest.
            with self._lock:
                self._delivering = False
            raise

    def __len__(self) -> int:
        """Number of current subscribers."""
        return len(self._subscribers)
