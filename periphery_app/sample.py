"""Fixed data for snapshot tests and screenshots: a cluster told as a fixed list of events.

Everything that varies in a live run (clocks, host names, ports, timings) is fixed here, so a
screen drawn from this data is the same on every machine. The events go through the same fold
(`periphery_core.cluster.state.fold`) as live ones.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from periphery_app.history import Sample, append, sample
from periphery_core.cluster import events as ev
from periphery_core.cluster.state import ClusterState, fold

if TYPE_CHECKING:
    from textual.pilot import Pilot

    from periphery_app.app import PeripheryApp

T0 = 1_700_000_000.0
# As `periphery-app --demo` shows them on the 2-core machine the README's figures come from:
# node ids are 32 hex digits, speeds about 18x the reference device, and the stages compute
# about 20, 21 and 12 ms a request, the second the bottleneck (below).
NODES = (("3f9c0a6e51d24b7c8e0f1a2b3c4d5e6f", "local0", 41001, 18.54),
         ("8b1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f", "local1", 41002, 18.42),
         ("c47e9a0b1c2d3e4f5a6b7c8d9e0f1a2b", "local2", 41003, 18.10))
SPARE_ID = "e5a1f0b2c3d4e5f6a7b8c9d0e1f2a3b4"
# The demo model's run against its estimates there (`generate.planning.calibrated`: 0.99-1.05),
# fixed so that the plan the screens draw does not move with the machine's load.
COST_SCALE = 1.0
REQUESTS = 240
END = T0 + 10 + REQUESTS * 0.05


def sample_events() -> list[ev.Event]:
    """Three nodes join, one more joins and is lost, a 3-stage plan deploys, requests stream."""
    out: list[ev.Event] = []
    for i, (nid, name, port, speed) in enumerate(NODES):
        out.append(ev.NodeJoined(node_id=nid, name=name, host="127.0.0.1", port=port,
                                 device="Intel(R) Xeon(R) CPU @ 2.20GHz", cores=2,
                                 memory_bytes=int(23.5 * (1 << 30)), speed=speed,
                                 rtt_s=1e-4, bandwidth=2e9, t=T0 + 0.1 * i))
    out.append(ev.NodeJoined(node_id=SPARE_ID, name="spare", host="10.0.0.9", port=41010,
                             device="cpu", cores=4, memory_bytes=16 << 30, speed=24.6,
                             rtt_s=4e-4, bandwidth=1e8, t=T0 + 0.5))
    out.append(ev.NodeLost(node_id=SPARE_ID, reason="no answer for 3.0 s", t=T0 + 4.0))
    assignment = tuple(n[0] for n in NODES)
    out.append(ev.DeployStarted(plan_stages=3, assignment=assignment, t=T0 + 5))
    for s, nid in enumerate(assignment):
        out.append(ev.ShardProgress(node_id=nid, stage=s, sent_bytes=1 << 20,
                                    total_bytes=1 << 20, t=T0 + 5.5 + s * 0.1))
        out.append(ev.StageReady(node_id=nid, stage=s, provider="CPUExecutionProvider",
                                 t=T0 + 6 + s * 0.1))
    out.append(ev.DeployFinished(t=T0 + 7, links=("ipc",) * len(assignment)))  # one host
    rng = random.Random(7)
    base = (0.0195, 0.0212, 0.0122)
    for r in range(REQUESTS):
        t = T0 + 10 + r * 0.05
        wave = 1.0 + 0.3 * ((r // 40) % 2)
        stages = tuple(
            ev.StageTiming(stage=s, queue_s=0.002 * rng.random() * (2 if s == 1 else 1),
                           compute_s=b * wave * (1 + 0.1 * rng.random()),
                           transfer_s=0.0011 + 0.0005 * rng.random())
            for s, b in enumerate(base)
        )
        latency = sum(x.total_s for x in stages)
        out.append(ev.RequestCompleted(request_id=str(r + 1), latency_s=latency, stages=stages,
                                       t=t))
        if r % 40 == 0:
            for k, (nid, *_rest) in enumerate(NODES):
                out.append(ev.NodeStats(node_id=nid, cpu_percent=55.0 + 15 * k + (r % 7),
                                        rss_bytes=(180 + 20 * k) << 20, memory_percent=2.5 + k,
                                        gpu_percent=None, t=t))
    out.sort(key=lambda e: e.t)
    return out


def sample_state() -> ClusterState:
    """The fold of `sample_events()`."""
    return fold(sample_events())


def sample_history(step_s: float = 0.25) -> tuple[Sample, ...]:
    """The dashboard's history as if sampled every `step_s` seconds during the stream."""
    events = sample_events()
    history: tuple[Sample, ...] = ()
    state = ClusterState.empty()
    i = 0
    t = T0 + 10.0
    while t <= END + 1e-9:
        while i < len(events) and events[i].t <= t:
            state = fold([events[i]], state)
            i += 1
        history = append(history, sample(state, t))
        t += step_s
    return history


DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-resnet.onnx"
SCREENSHOT_SIZE = (100, 32)


def sample_app(model: Path = DEMO_MODEL) -> PeripheryApp:
    """The app on the demo model with the fixed cluster, history and clock of this module."""
    from periphery_app.app import PeripheryApp

    return PeripheryApp(model, browse_dir=model.parent, fixed_state=sample_state(),
                        fixed_history=sample_history(), clock=lambda: END,
                        cost_scale=COST_SCALE)


async def until(pilot: Pilot, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Let the app run until `condition()` holds.

    Raises:
        TimeoutError: it did not hold within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not reach the expected state in time")
        await pilot.pause(0.05)


async def paste(pilot: Pilot, text: str) -> None:
    """Paste `text` into the focused widget, one event as a terminal's bracketed paste brings
    it. (Pressing it key by key costs a wait for the app to idle after every key: seconds for
    a path, while a live cluster keeps the process busy.)"""
    from textual import events

    pilot.app.post_message(events.Paste(text))
    await pilot.pause()


def screen_key(mode: str) -> str:
    """The key that shows a main screen: its place in the app's order, from 1."""
    from periphery_app.app import PeripheryApp

    return str([cls.MODE for cls in PeripheryApp.SCREENS_IN_ORDER].index(mode) + 1)


async def show_sample_screen(pilot: Pilot, mode: str) -> None:
    """Bring a `sample_app()` to one screen with its data shown and no toasts left."""
    from periphery_app.screens.graph import GraphScreen
    from periphery_app.screens.shards import ShardsScreen
    from periphery_app.widgets.graph_view import GraphView

    app = cast("PeripheryApp", pilot.app)
    await until(pilot, lambda: app.opened is not None)
    await pilot.press(screen_key("shards"))  # it makes the plan every other screen overlays
    await until(pilot, lambda: app.plan is not None and app.plan.k == len(NODES))
    if mode != "shards":
        await pilot.press(screen_key(mode))
    if mode == "graph":
        screen = app.screen
        await until(pilot, lambda: isinstance(screen, GraphScreen)
                    and screen.query_one(GraphView).graph_layout is not None)
    if mode == "shards":
        assert isinstance(app.screen, ShardsScreen)
    await until(pilot, lambda: app.current_mode == mode and app.screen.is_mounted)
    await clear_toasts(pilot)


async def ask_chat(pilot: Pilot, prompt: str, max_new_tokens: int,
                   timeout: float = 120.0) -> None:
    """On the Chat screen, type `prompt`, press enter and wait until the reply is finished."""
    from textual.widgets import Input

    from periphery_app.screens.chat import ChatScreen

    screen = pilot.app.screen
    assert isinstance(screen, ChatScreen)
    screen.max_new_tokens = max_new_tokens
    screen.last = None
    box = screen.query_one("#prompt", Input)
    box.focus()
    box.value = prompt
    await pilot.press("enter")
    await until(pilot, lambda: screen.last is not None, timeout=timeout)


async def clear_toasts(pilot: Pilot) -> None:
    """Dismiss every notification and let the app run until none is drawn."""
    pilot.app.clear_notifications()
    await until(pilot, lambda: not pilot.app.screen.query("Toast"))
