"""The keys of every screen, for the `?` help dialog."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.binding import Binding, BindingType


def _rows(bindings: Iterable[BindingType]) -> list[tuple[str, str]]:
    rows = []
    for b in bindings:
        if not isinstance(b, Binding) or not b.description:
            continue
        keys = ", ".join(k.replace("question_mark", "?").replace("slash", "/")
                         .replace("equals_sign", "=") for k in b.key.split(","))
        rows.append((keys, b.description))
    return rows


def keys_help(sections: Iterable[tuple[str, Iterable[BindingType]]]) -> RenderableType:
    """A table of keys per section (the app, then each screen and widget)."""
    parts: list[RenderableType] = []
    for title, bindings in sections:
        rows = _rows(bindings)
        if not rows:
            continue
        table = Table(title=title, title_justify="left", show_header=False, box=None,
                      padding=(0, 2), title_style="bold")
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for keys, description in rows:
            table.add_row(keys, description)
        parts += [table, Text("")]
    parts.append(Text("Every action is also in the command palette (ctrl+p).", style="dim"))
    return Group(*parts)
