"""The Quantize screen: a wizard from a method to a quantized model that the app can use.

Steps are panes of one screen in a `ContentSwitcher`: method, data (calibration and evaluation
sources), options, the run, and the report of the quantized model against fp32. From the report
the result is saved to a file or made the app's current model, so Graph and Shards plan it.

Design choice: the wizard only collects `Choices` (frozen data); `build_config` turns them into
the core's typed config, and one thread worker runs the whole job (open the sources, quantize,
evaluate) with a `CancelToken`, posting coalesced progress and a final fact back. Cancelling
returns to the options at once and marks the run stale: whatever its thread posts afterwards is
ignored, so a late result never overwrites a newer choice. What each step asks and how it words
a method are in `periphery_app.quantize_choices` (facts about methods come from the core), the
options step's widgets in `widgets.method_options`, the report in `quantize_report`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import ClassVar

import onnx
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import (
    Button,
    ContentSwitcher,
    Footer,
    Input,
    Label,
    OptionList,
    ProgressBar,
    RadioSet,
    Static,
)
from textual.widgets.option_list import Option

from periphery_app.control import OpenedModel, open_model
from periphery_app.messages import (
    ModelOpened,
    ProgressReported,
    QuantizationFinished,
    QuantizationStopped,
    QuantizedModelSaved,
)
from periphery_app.quantize_choices import (
    Choices,
    build_config,
    data_hints,
    method_prompt,
    picked_spec,
    picker_folder,
)
from periphery_app.quantize_report import report_view
from periphery_app.screens.base import PeripheryScreen, screen_bar
from periphery_app.screens.modals import PathModal, PromptModal
from periphery_app.widgets.file_trees import DataTree
from periphery_app.widgets.method_options import MethodOptions
from periphery_core.errors import Cancelled, DataError
from periphery_core.model.loading import display_name, save_model
from periphery_core.progress import CancelToken, Progress
from periphery_core.quantize.config import METHODS, install_hint, method_info, weight_bits
from periphery_core.quantize.evaluate import evaluate
from periphery_core.quantize.methods import quantize
from periphery_core.quantize.sources import open_source

STEPS = (("method", "Method"), ("data", "Data"), ("options", "Options"), ("run", "Run"),
         ("report", "Report"))

TASK_NAMES = {"calibrate": "Calibrating", "quantize": "Quantizing", "Evaluating": "Evaluating",
              "Timing": "Timing", "Per-node SQNR": "Per-node SQNR"}


def _whole_or_none(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.lstrip("+-").isdigit() else None


class QuantizeScreen(PeripheryScreen):
    """Quantize the open model, compare it with fp32, then save or use the result."""

    MODE = "quantize"
    LABEL = "Quantize"
    CSS_PATH = "quantize.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "run", "Run", tooltip="Quantize and evaluate with these settings"),
        # ctrl+o, not a letter: it works while a data field has the focus (Input takes letters)
        Binding("ctrl+o", "pick_data", "Pick a file",
                tooltip="Fill the data field with a file or folder chosen in a tree"),
        Binding("escape", "cancel_run", "Cancel", tooltip="Stop the run, back to the options"),
        Binding("c", "cancel_run", "Cancel", show=False),
        Binding("s", "save", "Save", tooltip="Write the quantized model to a file"),
        Binding("u", "use", "Use", tooltip="Make the quantized model the current model"),
        Binding("n", "restart", "New", tooltip="Start again from the method"),
        Binding("m", "model_screen", "Model screen", tooltip="Open a model first"),
        Binding("escape", "back", "Back", tooltip="The previous step of the wizard"),
    ]
    PANE_ACTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "run": ("options",),
        "pick_data": ("data",),
        "cancel_run": ("run",),
        "save": ("report",),
        "use": ("report",),
        "restart": ("report",),
        "model_screen": ("no-model",),
        "back": ("data", "options", "report"),
    }

    def __init__(self) -> None:
        super().__init__()
        self.pane = "no-model"
        self.choices = Choices()
        self._opened: OpenedModel | None = None
        self._run = 0
        self._cancel: CancelToken | None = None
        self._finished: QuantizationFinished | None = None
        self._saved: Path | None = None
        self._used: Path | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def compose(self) -> ComposeResult:
        yield screen_bar(self)
        yield Static("", id="steps")
        with ContentSwitcher(initial="no-model", id="panes"):
            with Vertical(id="no-model", classes="pane"):
                yield Static("No model open: quantizing needs one. Open it on the Model screen "
                             "(1), then come back here (6).", id="no-model-text")
                yield Button("Open the Model screen", id="to-model", variant="primary")
            with Vertical(id="method", classes="pane"):
                yield Label("Method", classes="section")
                yield OptionList(*(Option(method_prompt(m), id=m) for m in METHODS),
                                 id="methods")
                yield Label("↑↓ pick a method   enter: next   escape: previous screen",
                            classes="hint")
            with VerticalScroll(id="data", classes="pane"):
                yield Label("Calibration data", classes="section")
                yield Static("", id="calib-note", classes="note")
                yield Input(value=self.choices.calib_spec, id="calib",
                            placeholder="random, mnist:FILE?range=0:200, npz:DIR, images:DIR…")
                yield Input(type="integer", id="calib-samples",
                            placeholder="samples (blank: the method's default)")
                yield Static("", id="schemes", classes="note")
                yield Label("Evaluation data", classes="section")
                yield Input(id="eval", placeholder="blank: the calibration data")
                yield Input(type="integer", id="eval-samples",
                            placeholder="samples (blank: all of them; random: 32)")
                yield Label("ctrl+o: pick a file or folder   enter: next field (the last goes "
                            "on)   tab: move   escape: back", classes="hint")
            with VerticalScroll(id="options", classes="pane"):
                yield Static("", id="options-summary")
                yield MethodOptions(id="option-widgets")
                yield Button("Run", id="run-button", variant="primary")
                yield Label("tab: next setting   ↑↓ enter: choose   r: run   escape: back",
                            classes="hint")
            with Vertical(id="run", classes="pane"):
                yield Label("", id="run-title", classes="section")
                with Horizontal(id="run-line"):
                    yield Label("", id="run-phase")
                    yield ProgressBar(total=1, show_eta=False, id="run-progress")
                yield Label("escape or c: cancel", classes="hint")
            with VerticalScroll(id="report", classes="pane"):
                yield Static("", id="report-body")
                yield Label("s: save to a file   u: use as the current model   n: new run   "
                            "escape: back to the options", classes="hint")
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.papp, "opened", self._model_changed)

    def on_unmount(self) -> None:
        self._stop_run()  # quitting mid-run stops the thread at its next safe point

    # ------------------------------------------------------------------ panes

    def show_pane(self, pane: str) -> None:
        """Switch the wizard to one of its panes and focus what it asks for."""
        self.pane = pane
        self._say("")
        self.query_one(ContentSwitcher).current = pane
        self._draw_steps()
        focus = {"no-model": "#to-model", "method": "#methods", "data": "#calib",
                 "report": "#report"}.get(pane)
        if pane == "options":
            first = self.query_one(MethodOptions).first_setting
            self.set_focus(first or self.query_one("#run-button"))
        elif focus is not None:
            self.query_one(focus).focus()
        else:
            self.set_focus(None)
        self.refresh_bindings()

    def _draw_steps(self) -> None:
        parts: list[Content | str] = []
        names = [name for name, _ in STEPS]
        at = names.index(self.pane) if self.pane in names else -1
        for i, (_, label) in enumerate(STEPS):
            if i:
                parts.append(" › ")
            text = f" {label} "
            if i == at:
                parts.append(Content.styled(text, "bold reverse"))
            else:
                parts.append(Content.styled(text, "" if i < at else "dim"))
        if self._opened is not None:
            parts.append(Content.styled(f"   {self._opened.loaded.name}", "dim"))
        self.query_one("#steps", Static).update(Content.assemble(*parts))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        panes = self.PANE_ACTIONS.get(action)
        return panes is None or self.pane in panes

    def _say(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    # ------------------------------------------------------------------ state in

    def _model_changed(self, opened: OpenedModel | None) -> None:
        previous, self._opened = self._opened, opened
        if opened is not None and self._used is not None and opened.loaded.path == self._used:
            self._used = None
            self._say(f"{opened.loaded.name} is now the current model: Graph (2) and Shards (3) "
                      "plan it")
            self._draw_steps()
            return
        if opened is previous and self.pane != "no-model":
            return
        self._stop_run()
        self._finished = None
        self._saved = None
        self.show_pane("method" if opened is not None else "no-model")

    # ------------------------------------------------------------------ method and data

    @on(OptionList.OptionSelected, "#methods")
    def _method_chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        method = event.option.id or "static"
        if method != self.choices.method:
            self.choices = Choices(method=method, calib_spec=self.choices.calib_spec,
                                   calib_samples=self.choices.calib_samples,
                                   eval_spec=self.choices.eval_spec,
                                   eval_samples=self.choices.eval_samples)
        calibrated = build_config(Choices(method=method)).calibrated
        self.query_one("#calib-note", Static).update(
            f"{method} calibrates on these samples" if calibrated else
            f"{method} needs no calibration: these data are only evaluated on unless you "
            "give evaluation data below")
        if self._opened is not None:
            self.query_one("#schemes", Static).update(Text(
                "Data sources for this model:\n" + "\n".join(
                    f"  {spec:<44} {what}" for spec, what in data_hints(self._opened))))
        self.show_pane("data")

    @on(Input.Submitted)
    async def _field_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id != "eval-samples":
            self.focus_next()
            return
        await self._go_to_options()

    async def _go_to_options(self) -> None:
        self.choices = dataclasses.replace(
            self.choices,
            calib_spec=self.query_one("#calib", Input).value.strip() or "random",
            calib_samples=_whole_or_none(self.query_one("#calib-samples", Input).value),
            eval_spec=self.query_one("#eval", Input).value.strip(),
            eval_samples=_whole_or_none(self.query_one("#eval-samples", Input).value),
        )
        await self.query_one(MethodOptions).show_method(self.choices.method)
        self._draw_options_summary()
        self.show_pane("options")

    def action_pick_data(self) -> None:
        """Fill the focused data field (calibration unless the evaluation's has the focus)
        with the spec of a file or folder chosen in a tree of the data the sources read."""
        opened = self._opened
        if opened is None:
            return
        evaluation = self.focused is not None and self.focused.id in ("eval", "eval-samples")
        field = self.query_one("#eval" if evaluation else "#calib", Input)

        def picked(path: Path | None) -> None:
            if path is None:
                return
            spec = picked_spec(path, opened)
            if spec is None:
                self._say(f"no data source reads {path}: the field is unchanged")
                return
            field.value = spec
            field.focus()

        tree = DataTree(picker_folder(field.value, opened), id="data-tree")
        self.app.push_screen(PathModal(
            f"{'Evaluation' if evaluation else 'Calibration'} data: a file, or a folder (f)",
            tree), picked)

    # ------------------------------------------------------------------ options

    def _draw_options_summary(self) -> None:
        c = self.choices
        text = Text()
        text.append(f"{c.method}", style="bold")
        text.append(f"  ({method_info(c.method).summary})\n")
        text.append(f"calibration data: {c.calib_spec}"
                    f"{f' ({c.calib_samples} samples)' if c.calib_samples else ''}\n")
        evaluation = c.eval_spec or "the calibration data"
        samples = c.evaluation_samples
        text.append(f"evaluation data:  {evaluation}{f' ({samples} samples)' if samples else ''}")
        self.query_one("#options-summary", Static).update(text)

    @on(RadioSet.Changed, "#bits")
    def _bits_changed(self, event: RadioSet.Changed) -> None:
        bits = int((event.pressed.id or "bits-4").partition("-")[2])
        engine = dataclasses.replace(self.choices, bits=bits).engine
        self._say(f"{bits} bits run on Intel Neural Compressor ({install_hint('inc')})"
                  if engine == "inc" else "")

    @on(Button.Pressed, "#run-button")
    def _run_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_run()

    @on(Button.Pressed, "#to-model")
    def _to_model_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_model_screen()

    # ------------------------------------------------------------------ the run

    def action_run(self) -> None:
        opened = self._opened
        if opened is None:
            return
        self.choices = self.query_one(MethodOptions).chosen(self.choices)
        self._run += 1
        self._cancel = CancelToken()
        self._finished = None
        self._saved = None
        c = self.choices
        self.query_one("#run-title", Label).update(
            f"Quantizing {opened.loaded.name}: {c.method}"
            f"{f', {c.bits} bits' if c.bits else ''}")
        self.query_one("#run-phase", Label).update("Opening the data…")
        self.query_one("#run-progress", ProgressBar).update(total=1, progress=0)
        self.show_pane("run")
        self._quantize(self._run, opened, c, self._cancel)

    @work(thread=True, exclusive=True, group="quantize")
    def _quantize(self, run: int, opened: OpenedModel, choices: Choices,
                  cancel: CancelToken) -> None:
        def progress(p: Progress) -> None:
            if not cancel.cancelled:
                self.post_message(ProgressReported(p))

        inputs = opened.analysis.inputs
        try:
            config = build_config(choices)
            calib = (open_source(choices.calib_spec, inputs,
                                 samples=getattr(config, "samples", None))
                     if config.calibrated else None)
            data = open_source(choices.evaluation_spec, inputs,
                               samples=choices.evaluation_samples)
            result = quantize(opened.loaded, config, calib, progress=progress, cancel=cancel)
            report = evaluate(opened.loaded.path, result.model, data, progress=progress,
                              cancel=cancel)
        except Cancelled:
            self.post_message(QuantizationStopped(run, cancelled=True))
            return
        except Exception as exc:
            # Bad data sends the wizard back to the data step, anything else to the options.
            self.post_message(QuantizationStopped(run, cancelled=False,
                                                  bad_data=isinstance(exc, DataError)))
            self.report_failure(exc)
            return
        self.post_message(QuantizationFinished(run, result, report))

    def on_progress_reported(self, message: ProgressReported) -> None:
        p = message.progress
        if self.pane != "run" or p.task not in TASK_NAMES:
            return
        message.stop()
        self.query_one("#run-progress", ProgressBar).update(total=max(1, p.total),
                                                            progress=p.done)
        detail = f" ({p.detail})" if p.detail else ""
        self.query_one("#run-phase", Label).update(
            f"{TASK_NAMES[p.task]}: {p.done:,} of {p.total:,}{detail}")

    def on_quantization_finished(self, message: QuantizationFinished) -> None:
        if message.run != self._run or self._opened is None:
            return
        self._finished = message
        self.query_one("#report-body", Static).update(
            report_view(message.report, message.result, self._opened.loaded.name))
        self.show_pane("report")

    def on_quantization_stopped(self, message: QuantizationStopped) -> None:
        if message.run != self._run or self.pane != "run":
            return  # a run already cancelled (the options are showing) or superseded
        self._run += 1
        self.show_pane("data" if message.bad_data else "options")
        self._say("the run failed: see the message")

    def _stop_run(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
        self._run += 1  # whatever the stopped run posts from now on is stale

    def action_cancel_run(self) -> None:
        self._stop_run()
        self.show_pane("options")
        self._say("cancelled: change the settings and run again (r)")

    # ------------------------------------------------------------------ moving around

    def action_back(self) -> None:
        previous = {"data": "method", "options": "data", "report": "options"}
        self.show_pane(previous.get(self.pane, "method"))

    def action_restart(self) -> None:
        self.show_pane("method")

    def action_model_screen(self) -> None:
        self.papp.action_show("model")

    # ------------------------------------------------------------------ save and use

    def _default_path(self) -> Path:
        finished, opened = self._finished, self._opened
        if finished is None or opened is None:
            return Path("quantized.onnx")
        config = finished.result.config
        source = opened.loaded.path
        stem = display_name(source).removesuffix(".onnx").replace("/", "-")
        name = f"{stem}.{config.method}{weight_bits(config)}.onnx"
        # Beside the model when that folder is ours to write; never into a read-only or shared
        # data folder: then a `periphery-output` folder in the working directory.
        if os.access(source.parent, os.W_OK) and "shared" not in source.parts:
            return source.with_name(name)
        return Path.cwd() / "periphery-output" / name

    def action_save(self) -> None:
        finished = self._finished
        if finished is None:
            return

        def answered(path: str | None) -> None:
            if path:
                self._write(finished.result.model, Path(path).expanduser())

        self.app.push_screen(PromptModal("Save the quantized model to", "model.onnx",
                                         str(self._default_path())), answered)

    @work(thread=True, exclusive=True, group="save")
    def _write(self, model: onnx.ModelProto, path: Path) -> None:
        try:
            save_model(model, path)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(QuantizedModelSaved(path))

    def on_quantized_model_saved(self, message: QuantizedModelSaved) -> None:
        self._saved = message.path
        self._say(f"saved to {message.path}")

    def action_use(self) -> None:
        finished = self._finished
        if finished is None:
            return
        if self._saved is not None and self._saved.is_file():
            path, write = self._saved, False
        else:
            if self._scratch is None:  # removed when the app exits
                self._scratch = tempfile.TemporaryDirectory(prefix="periphery-quantized-")
            path, write = Path(self._scratch.name) / self._default_path().name, True
        self._used = path
        self._say(f"opening the quantized model {path.name}…")
        self._open_quantized(finished.result.model, path, write)

    @work(thread=True, exclusive=True, group="use")
    def _open_quantized(self, model: onnx.ModelProto, path: Path, write: bool) -> None:
        try:
            if write:
                save_model(model, path)
            opened = open_model(path)
        except Exception as exc:
            self.report_failure(exc)
            return
        self.post_message(ModelOpened(opened))  # the app makes it the current model
