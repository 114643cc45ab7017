"""What every main screen shares: its mode and label, a typed handle on the app, the screen bar,
and the error path of workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

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


def screen_bar(screen: PeripheryScreen) -> ScreenBar:
    """The screen bar for one of the main screens: every main screen, in the app's order."""
    return ScreenBar([(cls.MODE, cls.LABEL) for cls in screen.papp.SCREENS_IN_ORDER], screen.MODE)


class PeripheryScreen(Screen[None]):
    """A main screen: it reads shared state from the app and posts facts back up.

    A main screen is a mode of the app, named `MODE` (what the `show` action takes); `LABEL` is
    its title for people: in the screen bar, the keys help and the sub-title.
    """

    MODE: ClassVar[str]
    LABEL: ClassVar[str]

    def __init__(self) -> None:
        super().__init__(name=self.MODE)
        self.sub_title = self.LABEL

    @property
    def papp(self) -> PeripheryApp:
        """The app, typed."""
        return cast("PeripheryApp", self.app)

    def report_failure(self, exc: BaseException) -> None:
        """Post a failure from any thread; the app shows it in a modal."""
        self.post_message(OperationFailed(as_user_error(exc)))
