"""The bar of screens above the footer: every screen's key, the current one highlighted."""

from __future__ import annotations

from collections.abc import Sequence

from textual.content import Content
from textual.widgets import Static


class ScreenBar(Static):
    """`1 Model  2 Graph  …` with the current screen marked; a click switches screens too."""

    DEFAULT_CSS = """
    ScreenBar {
        dock: bottom;
        height: 1;
        margin-bottom: 1;
        background: $panel;
        color: $text-muted;
    }
    """

    def __init__(self, screens: Sequence[tuple[str, str]], current: str) -> None:
        super().__init__(self._content(screens, current))

    @staticmethod
    def _content(screens: Sequence[tuple[str, str]], current: str) -> Content:
        parts: list[Content | str] = []
        for i, (name, label) in enumerate(screens, start=1):
            text = f" {i} {label} "
            if name == current:
                parts.append(Content.styled(text, "bold reverse"))
            else:
                parts.append(Content.from_markup(f"[@click=app.show('{name}')]$text[/]",
                                                 text=text))
        parts.append(Content.from_markup("  [b]?[/b] keys  [b]esc[/b] back  [b]q[/b] quit"))
        return Content.assemble(*parts)
