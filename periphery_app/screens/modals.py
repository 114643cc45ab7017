"""Small modal screens: an error, a one-line prompt, details of a thing, a choice from a list,
a file or folder from a tree.

Each returns its answer with `dismiss`; the screen that pushed it gets the value in its
callback, so modals never reach into the app's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from rich.console import RenderableType
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, OptionList, Static
from textual.widgets.option_list import Option


class ErrorModal(ModalScreen[None]):
    """Shows one error's title and its one-line message; the app keeps running."""

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, title: str, message: str) -> None:
        super().__init__(classes="modal error")
        self._title = title
        self._message = message

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="title")
            yield Static(self._message, id="message", markup=False)
            yield Button("OK", id="ok", variant="error")

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss()


class PromptModal(ModalScreen[str | None]):
    """Asks for one line of text (a path, an address); escape answers None."""

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, placeholder: str = "", value: str = "") -> None:
        super().__init__(classes="modal")
        self._title = title
        self._placeholder = placeholder
        self._value = value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="title")
            yield Input(value=self._value, placeholder=self._placeholder, id="answer")
            yield Label("enter: OK   escape: cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class DetailsModal(ModalScreen[None]):
    """Shows a rich renderable (a node's details, the help) in a scrollable dialog."""

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, title: str, body: RenderableType, *, wide: bool = False) -> None:
        super().__init__(classes="modal wide" if wide else "modal")
        self._title = title
        self._body = body

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="title")
            with VerticalScroll(id="body"):
                yield Static(self._body, id="content")
            yield Label("escape: close", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#body").focus()


class ChoiceModal(ModalScreen[str | None]):
    """Picks one of several options (by id); escape answers None."""

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, choices: Sequence[tuple[str, str]]) -> None:
        super().__init__(classes="modal")
        self._title = title
        self._choices = list(choices)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="title")
            if self._choices:
                yield OptionList(*(Option(text, id=key) for key, text in self._choices),
                                 id="choices")
            else:
                yield Static("Nothing to choose from.", id="message")
            yield Label("enter: choose   escape: cancel", classes="hint")

    def on_mount(self) -> None:
        if self._choices:
            self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PathModal(ModalScreen[Path | None]):
    """Picks a file or a folder in a tree; escape answers None.

    Enter on a file answers it (enter on a folder opens it, as in any tree); `f` answers the
    highlighted folder, or the folder of the highlighted file, so a folder of samples can be
    chosen; backspace moves the tree's root up a folder, out of where it started.
    """

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "choose_folder", "Choose folder"),
        Binding("backspace", "up", "Up a folder"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, title: str, tree: DirectoryTree) -> None:
        super().__init__(classes="modal wide")
        self._title = title
        self._tree = tree

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="title")
            yield self._tree
            yield Label("enter: open a folder or choose a file   f: choose the folder   "
                        "backspace: up   escape: cancel", classes="hint")

    def on_mount(self) -> None:
        self._tree.focus()

    @on(DirectoryTree.FileSelected)
    def _file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(event.path)

    def action_choose_folder(self) -> None:
        node = self._tree.cursor_node
        path = Path(self._tree.path) if node is None or node.data is None else node.data.path
        self.dismiss(path if path.is_dir() else path.parent)

    def action_up(self) -> None:
        self._tree.path = Path(self._tree.path).resolve().parent

    def action_cancel(self) -> None:
        self.dismiss(None)
