"""Render every screen of the app to `screenshots/<screen>.svg` with fixed data.

Run from the repository root: `python screenshots/make_screenshots.py [SCREEN ...]` (default:
every screen). The app is the real one; the cluster is the fixed event list of
`periphery_app.sample` (no nodes are started), so the pictures are the same on every machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from periphery_app.sample import (  # noqa: E402
    SCREENSHOT_SIZE,
    sample_app,
    screen_key,
    show_sample_screen,
    until,
)

SCREENS = ("model", "graph", "shards", "cluster", "dashboard", "quantize")


async def show_quantize(pilot) -> None:
    """The Quantize wizard's first step (the method) on the open demo model."""
    app = pilot.app
    await until(pilot, lambda: app.opened is not None)
    await pilot.press(screen_key("quantize"))
    await pilot.pause(0.2)
    app.clear_notifications()
    await pilot.pause(0.1)


async def render(mode: str, out_dir: Path) -> Path:
    """Save one screen's SVG and return its path."""
    app = sample_app()
    try:
        async with app.run_test(size=SCREENSHOT_SIZE) as pilot:
            if mode == "quantize":
                await show_quantize(pilot)
            else:
                await show_sample_screen(pilot, mode)
            app.save_screenshot(f"{mode}.svg", str(out_dir))
    finally:
        app.control.close()
    return out_dir / f"{mode}.svg"


async def main() -> None:
    os.environ["PERIPHERY_CONFIG_DIR"] = tempfile.mkdtemp(prefix="periphery-shots-")
    wanted = sys.argv[1:] or SCREENS
    unknown = [m for m in wanted if m not in SCREENS]
    if unknown:
        sys.exit(f"unknown screen {unknown[0]!r}; screens: {', '.join(SCREENS)}")
    for mode in wanted:
        print(await render(mode, HERE))


if __name__ == "__main__":
    asyncio.run(main())
