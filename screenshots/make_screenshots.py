"""Render every screen of the app to `screenshots/<screen>.svg` with fixed data.

Run from the repository root: `python screenshots/make_screenshots.py [SCREEN ...]` (default:
every screen). The app is the real one; the cluster is the fixed event list of
`periphery_app.sample` (no nodes are started), so the pictures are the same on every machine.
The one exception is `chat`: a live run, as `periphery-app --demo MODEL_FOLDER --nodes 2` shows
it (two local node processes serving SmolLM2 from ../shared/data, one prompt, greedy decoding),
so its figures are this machine's.
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
    ask_chat,
    clear_toasts,
    sample_app,
    screen_key,
    show_sample_screen,
    until,
)

SCREENS = ("model", "graph", "shards", "cluster", "dashboard", "quantize", "chat")
SMOLLM = HERE.parent.parent / "shared" / "data" / "models" / "smollm2-135m-instruct-int4"
CHAT_PROMPT = "What is the capital of France? Answer in one sentence."


async def show_quantize(pilot) -> None:
    """The Quantize wizard's first step (the method) on the open demo model."""
    app = pilot.app
    await until(pilot, lambda: app.opened is not None)
    await pilot.press(screen_key("quantize"))
    await pilot.pause(0.2)
    app.clear_notifications()
    await pilot.pause(0.1)


async def render_chat(out_dir: Path) -> Path:
    """The Chat screen after one reply from SmolLM2 deployed on two local node processes."""
    from periphery_app.app import PeripheryApp
    from periphery_app.screens.chat import ChatScreen

    if not SMOLLM.is_dir():
        sys.exit(f"the chat picture needs {SMOLLM} (the shared data folder beside the project)")
    app = PeripheryApp(SMOLLM, demo=True, demo_nodes=2, browse_dir=SMOLLM)
    try:
        async with app.run_test(size=SCREENSHOT_SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, ChatScreen)
                        and bool(app.screen.query("#prompt")), timeout=180)
            await ask_chat(pilot, CHAT_PROMPT, max_new_tokens=48)
            await clear_toasts(pilot)
            app.save_screenshot("chat.svg", str(out_dir))
    finally:
        app.control.close()
    return out_dir / "chat.svg"


async def render(mode: str, out_dir: Path) -> Path:
    """Save one screen's SVG and return its path."""
    if mode == "chat":
        return await render_chat(out_dir)
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
