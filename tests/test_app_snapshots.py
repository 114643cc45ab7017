"""Snapshots of every screen at 100x32 with fixed data (pytest-textual-snapshot).

The cluster is the fixed event list of `periphery_app.sample` folded into a state, with a fixed
clock and history, so nothing here depends on the machine, the time or free ports. Update the
baselines with `pytest tests/test_app_snapshots.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from periphery_app.sample import (
    SCREENSHOT_SIZE,
    clear_toasts,
    sample_app,
    show_sample_screen,
    until,
)
from periphery_app.screens.modals import DetailsModal
from periphery_app.screens.quantize import QuantizeScreen
from periphery_app.widgets.graph_view import GraphView


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERIPHERY_CONFIG_DIR", str(tmp_path / "config"))
    # The same pictures whatever extras this machine has: as on a base install.
    monkeypatch.setattr("periphery_app.quantize_choices.missing_extra",
                        lambda method: {"gptq": "quantize-gptq", "hqq": "quantize-gptq",
                                        "awq": "inc", "smoothquant": "inc"}.get(method))


@pytest.mark.parametrize("screen", ["model", "graph", "shards", "cluster", "dashboard"])
def test_screen(snap_compare, screen: str) -> None:
    app = sample_app()
    assert snap_compare(app, terminal_size=SCREENSHOT_SIZE,
                        run_before=lambda pilot: show_sample_screen(pilot, screen))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("screen", ["model", "graph", "shards", "cluster", "dashboard",
                                    "quantize", "chat"])
def test_screen_at(snap_compare, screen: str, size: tuple[int, int]) -> None:
    """Every screen at the smallest size the app supports and at a common larger one."""
    app = sample_app()
    assert snap_compare(app, terminal_size=size,
                        run_before=lambda pilot: show_sample_screen(pilot, screen))


def test_graph_folded_with_details(snap_compare) -> None:
    async def run_before(pilot) -> None:
        await show_sample_screen(pilot, "graph")
        view = pilot.app.screen.query_one(GraphView)
        shown = view.graph_layout
        await pilot.press("f")
        # the folded layout is made in a worker and shown when its message is handled
        await until(pilot, lambda: view.graph_layout is not shown, timeout=30)
        await pilot.press("down", "down", "enter")
        await pilot.pause()

    app = sample_app()
    assert snap_compare(app, terminal_size=SCREENSHOT_SIZE, run_before=run_before)


def test_help(snap_compare) -> None:
    async def run_before(pilot) -> None:
        await show_sample_screen(pilot, "model")
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailsModal)
                    and pilot.app.screen.is_mounted)

    app = sample_app()
    assert snap_compare(app, terminal_size=SCREENSHOT_SIZE, run_before=run_before)


def test_quantize_method_pane(snap_compare) -> None:
    async def run_before(pilot) -> None:
        app = pilot.app
        await until(pilot, lambda: app.opened is not None)
        await pilot.press("6")
        await until(pilot, lambda: isinstance(app.screen, QuantizeScreen)
                    and app.screen.query_one("#methods").is_mounted)
        await clear_toasts(pilot)

    app = sample_app()
    assert snap_compare(app, terminal_size=SCREENSHOT_SIZE, run_before=run_before)
