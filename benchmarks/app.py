"""Benchmarks of the Textual app: launch to first screen, opening a 1,580-node graph, and the
dashboard's refresh rate under a live stream. Prints a table of medians.

Run from the repository root: `python benchmarks/app.py`. Targets: launch < 1.5 s, graph open
< 1 s, dashboard >= 4 refreshes per second. The app runs headless (`App.run_test`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STORIES = ROOT.parent / "shared" / "data" / "models" / "stories260K.onnx"
DEMO = ROOT / "assets" / "demo-resnet.onnx"

LAUNCH = """
import time, asyncio
t0 = time.perf_counter()
from periphery_app.app import PeripheryApp
async def main():
    app = PeripheryApp()
    async with app.run_test(size=(100, 32)) as pilot:
        await pilot.pause()
        print(time.perf_counter() - t0)
asyncio.run(main())
"""


def launch_s() -> float:
    """Seconds from a fresh interpreter to the first screen drawn (imports included)."""
    out = subprocess.run([sys.executable, "-c", LAUNCH], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.strip().splitlines()[-1])


async def graph_open_s(model: Path) -> float:
    """Seconds from pressing 2 (model already analysed) to the laid-out graph on screen."""
    from periphery_app.app import PeripheryApp
    from periphery_app.sample import until
    from periphery_app.screens.graph import GraphScreen
    from periphery_app.widgets.graph_view import GraphView

    app = PeripheryApp(model, browse_dir=model.parent)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: app.opened is not None, 60)
        t0 = time.perf_counter()
        await pilot.press("2")
        screen = app.screen
        await until(pilot, lambda: isinstance(screen, GraphScreen)
                    and screen.query_one(GraphView).graph_layout is not None, 30)
        await pilot.pause()  # one more frame: the first viewport painted
        elapsed = time.perf_counter() - t0
    app.control.close()
    return elapsed


async def dashboard_rates(window_s: float = 2.0, windows: int = 3) -> list[float]:
    """Dashboard redraws per second during the --demo stream, per window.

    The dashboard redraws its figures on every new sample of the app's history while it is
    shown; a watcher of our own on that history counts them (the samples come from a timer on
    the event loop, so a slow redraw lowers the count)."""
    from periphery_app.app import PeripheryApp
    from periphery_app.sample import until
    from periphery_app.screens.dashboard import DashboardScreen

    app = PeripheryApp(DEMO, demo=True, demo_nodes=3, browse_dir=DEMO.parent)
    rates = []
    try:
        async with app.run_test(size=(100, 32)) as pilot:
            await until(pilot, lambda: app.cluster_state.requests_completed > 5, 90)
            screen = app.screen
            assert isinstance(screen, DashboardScreen)
            redraws = 0

            def redrawn() -> None:
                nonlocal redraws
                redraws += app.screen is screen

            screen.watch(app, "history", redrawn, init=False)
            for _ in range(windows):
                before, t0 = redraws, time.perf_counter()
                await pilot.pause(window_s)
                rates.append((redraws - before) / (time.perf_counter() - t0))
            await pilot.press("q")
    finally:
        app.control.close()
    return rates


def main() -> None:
    os.environ["PERIPHERY_CONFIG_DIR"] = tempfile.mkdtemp(prefix="periphery-bench-")
    rows = []
    launches = [launch_s() for _ in range(5)]
    rows.append(("launch to first screen", f"{statistics.median(launches):.2f} s", "< 1.5 s"))
    if STORIES.is_file():
        opens = [asyncio.run(graph_open_s(STORIES)) for _ in range(3)]
        rows.append(("open graph (stories260K, 1,580 nodes)",
                     f"{statistics.median(opens):.2f} s", "< 1 s"))
    rates = asyncio.run(dashboard_rates())
    rows.append(("dashboard refresh under live stream", f"{statistics.median(rates):.1f} /s",
                 ">= 4 /s"))
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'median':>10}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")


if __name__ == "__main__":
    main()
