"""What every main screen shares: a typed handle on the app and the error path of workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

from periphery_app.messages import OperationFailed
from periphery_app.widgets.screen_bar import ScreenBar
from periphery_core.errors import PeripheryError

if TYPE_CHECKING:
    from periphery_app.app import PeripheryApp


def as_user_error(exc: BaseException) -> PeripheryError:
    """A `PeripheryError` for any exception a worker caught, so a modal can show it."""
    if isinstance(exc, PeripheryError):
        return exc
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return PeripheryError(f"{type(exc).__name__}: {first}" if first else type(exc).__name__,
                          title="Unexpected error")


SCREENS = (("model", "Model"), ("graph", "Graph"), ("shards", "Shards"), ("cluster", "Cluster"),
           ("dashboard", "Dashboard"), ("quantize", "Quantize"), ("chat", "Chat"))


def screen_bar(screen: Screen) -> ScreenBar:
    """The screen bar for one of the main screens (its `name` is its mode)."""
    return ScreenBar(SCREENS, screen.name or "")


class PeripheryScreen(Screen[None]):
    """A main screen: it reads shared state from the app and posts facts back up."""

    @property
    def papp(self) -> PeripheryApp:
        """The app, typed."""
        return cast("PeripheryApp", self.app)

    def report_failure(self, exc: BaseException) -> None:
        """Post a failure from any thread; the app shows it in a modal."""
        self.post_message(OperationFailed(as_user_error(exc)))
