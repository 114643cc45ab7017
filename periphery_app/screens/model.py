"""The Model screen: open a model (argument, file tree, recent list or typed path) and read its
summary. Loading and analysis run in a thread worker that reports progress."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DirectoryTree, Footer, Label, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from periphery_app.control import OpenedModel, open_model
from periphery_app.messages import ModelOpened, ProgressReported
from periphery_app.recent import distinct_names, load_recent
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.screens.modals import PromptModal
from periphery_app.widgets.file_trees import OnnxTree
from periphery_app.widgets.summary import model_summary
from periphery_core.errors import PeripheryError
from periphery_core.model.shapes import parse_input_shapes
from periphery_core.progress import CancelToken, Progress


class ModelScreen(PeripheryScreen):
    """Open a model and show what is in it."""

    MODE = "model"
    LABEL = "Model"
    CSS_PATH = "model.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "focus_tree", "Files"),
        Binding("r", "focus_recent", "Recent"),
        Binding("p", "open_path", "Open path"),
        Binding("i", "input_shapes", "Input shapes"),
    ]

    def __init__(self) -> None:
        super().__init__()

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        with Horizontal():
            with Vertical(id="picker"):
                yield Label("Recent", classes="section")
                yield OptionList(id="recent")
                yield Label("Files (.onnx)", classes="section")
                yield OnnxTree(self.papp.browse_dir, id="tree")
            with Vertical(id="info"):
                with Horizontal(id="busy"):
                    yield Label("", id="status")
                    yield ProgressBar(total=1, show_eta=False, id="progress")
                with VerticalScroll(id="summary-pane"):
                    yield Static(
                        "No model open. Pick an .onnx file on the left (enter), a recent one, "
                        "or press p to type a path.", id="summary")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#busy").display = False
        self._fill_recent()
        tree = self.query_one(OnnxTree)
        tree.root.set_label(self.papp.browse_dir.name + "/")
        self.watch(self.papp, "opened", self._show_model)

    def _fill_recent(self) -> None:
        recent = self.query_one("#recent", OptionList)
        recent.clear_options()
        paths = load_recent()
        recent.add_options(Option(name, id=str(p))
                           for p, name in zip(paths, distinct_names(paths), strict=True))
        if not paths:
            recent.add_option(Option("(none yet)", id="", disabled=True))

    def _show_model(self, opened: OpenedModel | None) -> None:
        if opened is None:
            return
        self._draw_summary(opened)
        self._fill_recent()

    def _draw_summary(self, opened: OpenedModel) -> None:
        """The summary, filling the pane it is in (more rows and longer bars where it is big)."""
        loaded = opened.loaded
        size = loaded.path.stat().st_size if loaded.path.exists() else 0
        pane = self.query_one("#summary-pane").content_size
        self.query_one("#summary", Static).update(model_summary(
            opened.analysis, loaded.name, size, opened.decoder,
            (pane.width, pane.height) if pane.height else None))

    def on_resize(self) -> None:
        self.call_after_refresh(self._fit_summary)  # once the pane has its new size

    def on_screen_resume(self) -> None:
        self.call_after_refresh(self._fit_summary)

    def _fit_summary(self) -> None:
        if self.papp.opened is not None:
            self._draw_summary(self.papp.opened)

    # ------------------------------------------------------------------ opening

    def open(self, path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        """Load and analyse `path` in a worker, at `shapes` (input shapes or dimension sizes)."""
        self.query_one("#busy").display = True
        self.query_one("#status", Label).update(f"Opening {path.name}…")
        self.query_one("#progress", ProgressBar).update(total=1, progress=0)
        self._open(path, shapes)

    def action_input_shapes(self) -> None:
        """Analyse the open model again at input shapes the user types (as --input-shape)."""
        opened = self.papp.opened
        if opened is None:
            self.notify("open a model first", severity="warning")
            return
        current = " ".join(f"{s.name}={'x'.join(map(str, s.shape))}"
                           for s in opened.analysis.inputs if s.kind == "tensor")

        def answered(answer: str | None) -> None:
            if answer is None or not answer.strip():
                return
            try:
                shapes = parse_input_shapes(answer.split())
            except PeripheryError as exc:
                self.report_failure(exc)
                return
            self.open(opened.loaded.path, shapes)

        self.app.push_screen(PromptModal(
            "Input shapes: NAME=DIMS per input, or a dimension's size (past_sequence_length=16)",
            "tokens=1x128", current), answered)

    @work(thread=True, exclusive=True, group="open")
    def _open(self, path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        worker = get_current_worker()
        cancel = CancelToken()

        def progress(p: Progress) -> None:
            if worker.is_cancelled:
                cancel.cancel()
            self.post_message(ProgressReported(p))

        try:
            opened = open_model(path, progress=progress, cancel=cancel, shapes=shapes)
        except Exception as exc:
            self.post_message(ProgressReported(Progress("analyze", 1, 1, "failed")))
            self.report_failure(exc)
            return
        self.post_message(ModelOpened(opened))

    def on_progress_reported(self, message: ProgressReported) -> None:
        p = message.progress
        if p.task != "analyze":
            return
        self.query_one("#progress", ProgressBar).update(total=max(1, p.total), progress=p.done)
        self.query_one("#status", Label).update(f"Analysing: {p.detail}")
        if p.done >= p.total:
            self.query_one("#busy").display = False

    def on_model_opened(self, message: ModelOpened) -> None:
        self.query_one("#busy").display = False  # the message goes on up to the app

    @on(DirectoryTree.FileSelected)
    def _file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.open(event.path)

    @on(OptionList.OptionSelected, "#recent")
    def _recent_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.open(Path(event.option.id))

    # ------------------------------------------------------------------ actions

    def action_focus_tree(self) -> None:
        self.query_one(OnnxTree).focus()

    def action_focus_recent(self) -> None:
        self.query_one("#recent", OptionList).focus()

    def action_open_path(self) -> None:
        def opened(answer: str | None) -> None:
            if answer is None:
                return  # dismissed
            if not answer.strip():
                self.notify("no path given: type the path of an .onnx file or a model folder",
                            severity="warning")
                return
            self.open(Path(answer.strip()).expanduser())

        self.app.push_screen(PromptModal("Open model", "path/to/model.onnx"), opened)
