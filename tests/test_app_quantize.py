"""The Quantize wizard, driven with Pilot on real models: method -> data -> options -> run ->
report -> save and use; a cancelled run; a method whose optional extra is missing; no model;
data fields filled from the file picker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import DirectoryTree, Input, OptionList, ProgressBar

from periphery_app.app import PeripheryApp
from periphery_app.messages import QuantizationStopped
from periphery_app.quantize_choices import Choices, build_config
from periphery_app.sample import DEMO_MODEL, paste, until
from periphery_app.screens.modals import ErrorModal, PathModal, PromptModal
from periphery_app.screens.model import ModelScreen
from periphery_app.screens.quantize import QuantizeScreen
from periphery_app.screens.shards import ShardsScreen
from periphery_core.model import load_model
from periphery_core.quantize.config import METHODS, IncRtn, StaticInt8, WeightOnly4Bit
from tests.conftest import MODELS, SHARED_DATA, require_shared
from tests.test_app import text_of

SIZE = (100, 32)
MNIST_MODEL = MODELS / "mnist-8.onnx"
MNIST_IMAGES = SHARED_DATA / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz"


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv("PERIPHERY_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The MNIST test images under a short relative name (Pilot types every character), with
    their labels beside them under the name the mnist source looks for."""
    require_shared()
    monkeypatch.chdir(tmp_path)
    Path("t10k.gz").symlink_to(MNIST_IMAGES)
    labels = "t10k-labels-idx1-ubyte.gz"
    Path(labels).symlink_to(MNIST_IMAGES.with_name(labels))
    return "t10k.gz"


async def open_wizard(app: PeripheryApp, pilot) -> QuantizeScreen:
    await until(pilot, lambda: app.opened is not None)
    await pilot.press("6")
    screen = app.screen
    assert isinstance(screen, QuantizeScreen)
    return screen


async def choose(pilot, screen: QuantizeScreen, method: str, calib: str = "",
                 samples: str = "", data: str = "") -> None:
    """Pick a method, type the data fields (blank keeps the default) and reach the options."""
    assert screen.pane == "method"
    await pilot.press(*["down"] * METHODS.index(method), "enter")
    assert screen.pane == "data"
    if calib:
        await pilot.press("ctrl+a", "ctrl+k", *calib)
    await pilot.press("enter", *samples, "enter", *data, "enter", "enter")
    assert screen.pane == "options"


@pytest.mark.parametrize(("choices", "expected"), [
    (Choices("static", per_channel=False, calibration="entropy", calib_samples=50),
     StaticInt8(calibration="entropy", per_channel=False, samples=50)),
    (Choices("rtn", bits=4, per_channel=True, calibration="entropy"), WeightOnly4Bit("rtn")),
    (Choices("rtn", bits=2), IncRtn(bits=2)),
])
def test_choices_become_the_core_config(choices: Choices, expected: object) -> None:
    assert build_config(choices) == expected


@pytest.mark.asyncio
async def test_static_int8_on_mnist_reports_saves_and_becomes_the_current_model(
        images: str) -> None:
    calib = f"mnist:{images}?range=0:100"
    data = f"mnist:{images}?range=100:400"
    app = PeripheryApp(MNIST_MODEL, browse_dir=MNIST_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_wizard(app, pilot)
        assert "Quantize" in {c.title for c in app.get_system_commands(screen)}
        await choose(pilot, screen, "static", calib=calib, data=data)
        assert screen.choices.calib_spec == calib and screen.choices.eval_spec == data
        assert "Run" in {c.title for c in app.get_system_commands(screen)}
        await pilot.press("r")
        await until(pilot, lambda: screen.pane != "run", timeout=60)
        assert screen.pane == "report"
        report = text_of(app, "#report-body")
        assert "evaluated on 300 samples" in report
        assert "top-1 accuracy: fp32 " in report and "quantized " in report
        assert "size " in report and "fp32: 0." in report  # INT8 weights: smaller than fp32
        assert "Most sensitive nodes" in report and "added dB:" in report  # with its legend
        assert {"Save", "Use"} <= {c.title for c in app.get_system_commands(screen)}

        target = Path("int8.onnx")
        await pilot.press("s")
        assert isinstance(app.screen, PromptModal)
        # The model lies in the read-only shared data: the default is not beside it.
        offered = Path(app.screen.query_one(Input).value)
        assert offered == Path.cwd() / "periphery-output" / "mnist-8.static8.onnx", offered
        await pilot.press("ctrl+a", "ctrl+k")
        await paste(pilot, str(target))
        await pilot.press("enter")
        await until(pilot, target.is_file)
        saved = load_model(target)
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in saved.proto.graph.node}

        fp32 = app.opened
        await pilot.press("u")
        await until(pilot, lambda: app.opened is not fp32)
        assert app.opened is not None and app.opened.loaded.path == target
        assert app.opened.analysis.sha256 == saved.sha256
        assert screen.pane == "report"  # using the result keeps its report on screen
        await pilot.press("3")  # the Shards screen plans the quantized model
        assert isinstance(app.screen, ShardsScreen)
        await until(pilot, lambda: app.plan is not None
                    and app.plan.model_sha256 == saved.sha256)


@pytest.mark.asyncio
async def test_cancelling_a_run_returns_to_the_options_and_stops_the_thread(
        images: str) -> None:
    stopped: list[QuantizationStopped] = []  # each as dispatched: to the screen, then the app

    def seen(message: object) -> None:
        if isinstance(message, QuantizationStopped) and message.cancelled:
            stopped.append(message)

    app = PeripheryApp(MNIST_MODEL, browse_dir=MNIST_MODEL.parent)
    async with app.run_test(size=SIZE, message_hook=seen) as pilot:
        screen = await open_wizard(app, pilot)
        # all 10,000 test images: calibration alone takes several seconds
        await choose(pilot, screen, "static", calib=f"mnist:{images}", samples="10000")
        await pilot.press("r")
        assert screen.pane == "run"
        bar = screen.query_one("#run-progress", ProgressBar)
        await until(pilot, lambda: (bar.progress or 0) > 0)  # calibrating
        await pilot.press("escape")
        assert screen.pane == "options"
        # the thread stopped on the cancel token and said so
        await until(pilot, lambda: bool(stopped), timeout=10)
        await pilot.pause(0.2)  # a second stop message would arrive now: there is none to await
        assert len({id(m) for m in stopped}) == 1
        assert screen.pane == "options"  # the stopped run posted nothing that changed it
        assert not isinstance(app.screen, ErrorModal)
        await pilot.press("1")  # still alive
        assert isinstance(app.screen, ModelScreen)


@pytest.mark.asyncio
@pytest.mark.skipif(importlib.util.find_spec("onnx_neural_compressor") is not None,
                    reason="Intel Neural Compressor is installed: awq would run")
async def test_a_method_whose_extra_is_missing_shows_the_install_hint() -> None:
    app = PeripheryApp(DEMO_MODEL, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_wizard(app, pilot)
        methods = screen.query_one("#methods", OptionList)
        # said in the list, before the user picks it
        assert "not installed: pip install 'periphery[inc]'" in str(
            methods.get_option("awq").prompt)
        assert "not installed" not in str(methods.get_option("dynamic").prompt)
        await choose(pilot, screen, "awq")
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, ErrorModal))
        message = text_of(app, "#message")
        assert "pip install 'periphery[inc]'" in message and "\n" not in message.strip()
        await pilot.press("escape")
        assert app.screen is screen and screen.pane == "options"


@pytest.mark.asyncio
async def test_without_a_model_the_wizard_says_so_and_offers_the_model_screen(
        tmp_path: Path) -> None:
    app = PeripheryApp(browse_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("6")
        screen = app.screen
        assert isinstance(screen, QuantizeScreen) and screen.pane == "no-model"
        assert "No model open" in text_of(app, "#no-model-text")
        await pilot.press("m")
        assert isinstance(app.screen, ModelScreen)


@pytest.mark.asyncio
async def test_the_data_step_offers_the_sources_that_fit_the_model() -> None:
    app = PeripheryApp(MNIST_MODEL, browse_dir=MNIST_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_wizard(app, pilot)
        await pilot.press("enter")  # dynamic
        assert screen.pane == "data"
        hints = text_of(app, "#schemes")
        for spec in ("random", "npz:FEEDS.npz", "mnist:IMAGES.idx.gz?range=0:200",
                     "images:DIR?size=28x28"):
            assert spec in hints, hints
        assert "tokenizer" not in hints  # no tokenizer beside mnist-8


def listed(tree: DirectoryTree) -> list[str]:
    """The names the tree lists, folders opened so far included, in order."""
    names, nodes = [], list(reversed(tree.root.children))
    while nodes:
        node = nodes.pop()
        names.append(node.data.path.name if node.data is not None else "")
        nodes.extend(reversed(node.children))
    return names


async def pick(pilot, app: PeripheryApp, name: str, key: str = "enter") -> None:
    """In the open file picker, move the cursor down to the entry `name`, then press `key`."""
    tree = app.screen.query_one(DirectoryTree)
    await until(pilot, lambda: name in listed(tree))  # listed by a worker
    for _ in range(len(listed(tree)) + 1):
        node = tree.cursor_node
        if node is not None and node.data is not None and node.data.path.name == name:
            break
        await pilot.press("down")
    await pilot.press(key)


@pytest.mark.asyncio
async def test_the_file_picker_fills_the_data_fields_with_specs_the_run_opens(
        tmp_path: Path) -> None:
    require_shared()
    data = tmp_path / "data"
    (data / "samples").mkdir(parents=True)
    model = data / "mnist-8.onnx"
    model.write_bytes(MNIST_MODEL.read_bytes())  # the picker opens at the model's folder
    rng = np.random.default_rng(0)
    np.savez(data / "feeds.npz", Input3=rng.random((4, 1, 1, 28, 28), dtype=np.float32))
    for i in range(3):
        np.save(data / "samples" / f"{i}.npy", rng.random((1, 1, 28, 28), dtype=np.float32))
    for unread in ("notes.md", "feeds.json", "other.onnx"):  # no source reads these
        (data / unread).write_text("{}")
    app = PeripheryApp(model, browse_dir=data)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_wizard(app, pilot)
        await pilot.press(*["down"] * METHODS.index("static"), "enter")
        assert screen.pane == "data" and screen.focused is screen.query_one("#calib")
        assert "ctrl+o" in text_of(app, "#data .hint")
        await pilot.press("ctrl+o")  # the key works while the field has the focus
        assert isinstance(app.screen, PathModal)
        tree = app.screen.query_one(DirectoryTree)
        await until(pilot, lambda: bool(listed(tree)))
        assert Path(tree.path) == data
        assert listed(tree) == ["samples", "feeds.npz"]  # not the files no source reads
        await pick(pilot, app, "feeds.npz")
        assert app.screen is screen
        calib = screen.query_one("#calib", Input)
        assert calib.value == f"npz:{data / 'feeds.npz'}"

        await pilot.press("enter", "enter")  # to the evaluation field, past the samples
        evaluation = screen.query_one("#eval", Input)
        assert screen.focused is evaluation
        await pilot.press("ctrl+o", "escape")  # escape cancels the picker, not the step
        assert app.screen is screen and screen.pane == "data"
        assert evaluation.value == "" and calib.value == f"npz:{data / 'feeds.npz'}"
        await pilot.press("ctrl+o")
        await pick(pilot, app, "samples")  # enter on a folder opens it
        await pick(pilot, app, "0.npy", key="f")  # a sample's folder: npy reads folders
        assert evaluation.value == f"npy:{data / 'samples'}"

        await pilot.press("enter", "enter")
        assert screen.pane == "options"
        assert screen.choices.calib_spec == f"npz:{data / 'feeds.npz'}"
        assert screen.choices.eval_spec == f"npy:{data / 'samples'}"
        await pilot.press("r")  # the run opens both: calibration, then evaluation
        await until(pilot, lambda: screen.pane != "run", timeout=60)
        assert screen.pane == "report" and not isinstance(app.screen, ErrorModal)
        assert "evaluated on 3 samples" in text_of(app, "#report-body")
