"""The app's flows, driven with Pilot: each screen, a bad file, and the whole loop against real
local node processes (model -> plan K=2 -> move a boundary -> assign -> deploy -> latencies)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import onnx
import psutil
import pytest
from rich.console import Console
from textual.content import Content
from textual.coordinate import Coordinate
from textual.css.query import NoMatches
from textual.pilot import Pilot
from textual.strip import Strip
from textual.widgets import DataTable, Input, Log, Static

from periphery_app.app import PeripheryApp
from periphery_app.sample import DEMO_MODEL, paste, sample_app, show_sample_screen, until
from periphery_app.screens.cluster import ClusterScreen
from periphery_app.screens.dashboard import DashboardScreen
from periphery_app.screens.graph import GraphScreen
from periphery_app.screens.modals import ChoiceModal, DetailsModal, ErrorModal, PromptModal
from periphery_app.screens.shards import ShardsScreen
from periphery_app.widgets.graph_view import GraphView
from periphery_core.cluster.local import LocalCluster
from periphery_core.wire import PROTOCOL_VERSION
from tests.conftest import MODELS, require_shared

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "models" / "stories260K.onnx"
SIZE = (100, 32)


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv("PERIPHERY_CONFIG_DIR", str(folder))
    return folder


def text_of(app: PeripheryApp, selector: str) -> str:
    """The plain text a Static shows (markup, Content or a Rich renderable)."""
    content = app.screen.query_one(selector, Static).content
    if isinstance(content, str | Content):
        return str(content)
    return rendered_text(content)


def rendered_text(renderable: object) -> str:
    """A Rich renderable (what a widget's `render` draws) as plain text, 160 columns wide."""
    console = Console(width=160, file=io.StringIO(), record=True)
    console.print(renderable)
    return console.export_text()


async def _graph_screen(app: PeripheryApp, pilot: Pilot) -> tuple[GraphScreen, GraphView]:
    """Once the model is open, the Graph screen with its first layout drawn."""
    await until(pilot, lambda: app.opened is not None)
    await pilot.press("2")
    screen = app.screen
    assert isinstance(screen, GraphScreen)
    view = screen.query_one(GraphView)
    await until(pilot, lambda: view.graph_layout is not None, timeout=30)
    return screen, view


async def test_model_screen_shows_the_summary_and_remembers_the_file(config_dir: Path) -> None:
    app = PeripheryApp(DEMO_MODEL, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.opened is not None)
        await pilot.pause()
        summary = text_of(app, "#summary")
        for expected in ("demo-resnet.onnx", "image", "1x3x128x128", "logits", "Conv",
                         "GFLOP", "ai.onnx 17"):
            assert expected in summary
    app.control.close()
    assert json.loads((config_dir / "recent.json").read_text()) == [str(DEMO_MODEL)]


async def test_the_file_picker_lists_only_onnx_files_and_opens_one(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DEMO_MODEL, folder / "net.onnx")
    (folder / "notes.txt").write_text("not a model")
    app = PeripheryApp(browse_dir=folder)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("o")  # focus the tree
        tree = app.screen.query_one("#tree")
        await until(pilot, lambda: len(tree.root.children) > 0)  # type: ignore[attr-defined]
        names = [str(c.label) for c in tree.root.children]  # type: ignore[attr-defined]
        assert names == ["net.onnx"]
        await pilot.press("down", "enter")
        await until(pilot, lambda: app.opened is not None)
        assert app.opened is not None and app.opened.loaded.name == "net.onnx"


async def test_a_bad_file_shows_the_error_modal_and_the_app_keeps_running(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 3)
    app = PeripheryApp(browse_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("p")
        assert isinstance(app.screen, PromptModal)
        await pilot.press(*str(bad), "enter")
        await until(pilot, lambda: isinstance(app.screen, ErrorModal))
        message = text_of(app, "#message")
        assert "broken.onnx" in message and "\n" not in message.strip()
        await pilot.press("escape")
        assert not isinstance(app.screen, ErrorModal)
        assert app.opened is None
        # still alive: a good model opens afterwards
        await pilot.press("p")
        await paste(pilot, str(DEMO_MODEL))
        await pilot.press("enter")
        await until(pilot, lambda: app.opened is not None)
        await pilot.press("2")
        assert isinstance(app.screen, GraphScreen)


async def test_graph_screen_navigates_searches_shows_details_and_folds() -> None:
    app = PeripheryApp(DEMO_MODEL, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        screen, view = await _graph_screen(app, pilot)
        layout = view.graph_layout
        assert layout is not None
        start = view.selected
        await pilot.press("down", "down")
        assert layout.vertices[view.selected].layer > layout.vertices[start].layer
        await pilot.press("enter")
        assert isinstance(app.screen, DetailsModal)
        details = text_of(app, "#content")
        assert "Relu" in details or "Conv" in details
        assert "FLOP" in details and "float32" in details
        await pilot.press("escape")
        # A weight shows its dtype, shape and size, not "? ? ?".
        conv = next(i for i, n in enumerate(app.opened.analysis.nodes)  # type: ignore[union-attr]
                    if n.op_type == "Conv")
        console = Console(width=160, file=io.StringIO(), record=True)
        console.print(screen.details((conv,)))
        rows = [ln for ln in console.export_text().splitlines() if "(weight)" in ln]
        assert rows and all(re.search(r"float32\s+\d+(x\d+)*\s+\d", r) for r in rows), rows
        assert any("48x3x3x3" in r for r in rows)
        await pilot.press("slash", *"block2.add", "enter")
        chosen = app.opened.analysis.nodes[layout.vertices[view.selected].members[0]]  # type: ignore[union-attr]
        assert chosen.key == "block2.add"
        assert screen._matches  # highlighted; escape clears them and stays on the screen
        await pilot.press("escape")
        assert app.current_mode == "graph" and not screen._matches
        await pilot.press("f")
        await until(pilot, lambda: view.graph_layout is not layout)
        folded = view.graph_layout
        assert folded is not None and folded.folded
        assert len(folded.vertices) < len(layout.vertices)
        assert "▸ block2" in folded.vertices[view.selected].label  # selection kept its node
        await pilot.press("escape")  # back to the Model screen
        assert app.current_mode == "model"


@pytest.mark.skipif(not STORIES.is_file(), reason="shared corpus not present")
async def test_graph_of_1580_nodes_paints_only_its_viewport(
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = PeripheryApp(STORIES, browse_dir=STORIES.parent)
    async with app.run_test(size=SIZE) as pilot:
        _, view = await _graph_screen(app, pilot)
        await pilot.pause()
        painted: list[int] = []  # the rows Textual asked the view to paint from here on
        render_line = view.render_line

        def counted(y: int) -> Strip:
            painted.append(y)
            return render_line(y)

        monkeypatch.setattr(view, "render_line", counted)
        for _ in range(20):
            await pilot.press("down")
        await pilot.pause()
        layout = view.graph_layout
        assert layout is not None and layout.height > 700
        # 21 redraws of a ~25-row viewport, nowhere near the 700+ rows of the canvas each
        assert 0 < len(painted) < 21 * 40
        assert layout.vertices[view.selected].layer >= 10


async def test_shards_screen_plans_moves_a_boundary_and_saves_and_loads(tmp_path: Path) -> None:
    app = PeripheryApp(DEMO_MODEL, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.opened is not None)
        await pilot.press("3")
        screen = app.screen
        assert isinstance(screen, ShardsScreen)
        await until(pilot, lambda: app.plan is not None)
        plan = app.plan
        assert plan is not None and plan.k == 2
        cut = plan.cuts[0]
        await pilot.press("right")
        await until(pilot, lambda: app.plan is not plan)
        moved_plan = app.plan
        assert moved_plan is not None and moved_plan.cuts == [cut + 1]
        assert moved_plan.strategy == "manual"
        await pilot.press("b")  # re-balance
        await until(pilot, lambda: app.plan is not moved_plan)
        assert app.plan is not None and app.plan.cuts == [cut]
        await pilot.press("t")  # the next strategy, then `b`: balanced again, not the same plan
        await until(pilot, lambda: app.plan is not None and app.plan.strategy != "balanced")
        await pilot.press("b")
        await until(pilot, lambda: app.plan is not None and app.plan.strategy == "balanced")
        assert screen.strategy == "balanced" and app.plan.cuts == [cut]
        await pilot.press("plus")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 3)
        target = tmp_path / "plan.json"
        await pilot.press("s")
        assert isinstance(app.screen, PromptModal)
        await pilot.press("ctrl+a", "ctrl+k")
        await paste(pilot, str(target))
        await pilot.press("enter")
        await until(pilot, target.is_file)
        await pilot.press("minus")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 2)
        await pilot.press("o", "ctrl+a", "ctrl+k")
        await paste(pilot, str(target))
        await pilot.press("enter")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 3)


async def _add_nodes_by_address(app: PeripheryApp, pilot: Pilot, cluster: LocalCluster) -> None:
    """Once the model is open, add every node of `cluster` on the Cluster screen with `a`."""
    await until(pilot, lambda: app.opened is not None)
    await pilot.press("4")
    for address in cluster.addresses:
        await pilot.press("a")
        await paste(pilot, f"{address.host}:{address.port}")
        await pilot.press("enter")
    await until(pilot, lambda: len(app.cluster_state.nodes) == len(cluster.addresses),
                timeout=30)


@contextlib.asynccontextmanager
async def app_on_local_nodes(model: Path, browse_dir: Path, size: tuple[int, int] = SIZE,
                             nodes: int = 2, workers: int | None = None
                             ) -> AsyncIterator[tuple[PeripheryApp, Pilot]]:
    """The app (Pilot) on `model`, with `nodes` local node processes (`--workers`, if given)
    added by address on its Cluster screen; the app's cluster control and the nodes are
    stopped after, pass or fail."""
    cluster = LocalCluster(nodes, secure=False, workers=workers)
    cluster.start()
    app = PeripheryApp(model, browse_dir=browse_dir, insecure=True)
    try:
        async with app.run_test(size=size) as pilot:
            await _add_nodes_by_address(app, pilot, cluster)
            yield app, pilot
    finally:
        app.control.close()
        cluster.stop()


async def test_whole_loop_against_real_local_nodes(tmp_path: Path) -> None:
    """Add two nodes by address, see the plan made before they joined move onto them, move a
    boundary, assign, deploy, stream, see it; opening another model then says the cluster
    still runs the deployed one."""
    async with app_on_local_nodes(DEMO_MODEL, DEMO_MODEL.parent) as (app, pilot):
        table = app.screen.query_one(DataTable)
        assert table.row_count == 2
        await pilot.press("3")
        # The model was planned on reference devices when it opened, before any node;
        # the nodes that joined take its stages and it is planned again on their figures.
        await until(pilot, lambda: app.plan is not None
                    and [s.device for s in app.plan.stages] == ["local0", "local1"])
        plan = app.plan
        assert plan is not None and plan.k == 2 and plan.strategy == "balanced"
        controls = text_of(app, "#controls")
        assert "no node" not in controls and "reference" not in controls, controls
        assert re.search(r"requests/s predicted", controls) and "e+" not in controls
        assert "planned again on local0, local1" in text_of(app, "#status")
        await pilot.press("left")
        await until(pilot, lambda: app.plan is not plan)
        assert app.plan is not None and app.plan.cuts == [plan.cuts[0] - 1]
        # stage 0 -> the second node, stage 1 -> the first: by keyboard in the picker
        await pilot.press("a")
        assert isinstance(app.screen, ChoiceModal)
        await pilot.press("down", "enter")
        await pilot.press("down", "a", "enter")
        screen = app.screen
        assert isinstance(screen, ShardsScreen)
        names = {n.id: n.name for n in app.cluster_state.nodes.values()}
        assert [names[a] for a in screen.assignment if a] == ["local1", "local0"]
        await until(pilot, lambda: app.plan is not None and
                    app.plan.stages[0].device == "local1")  # replanned with node figures
        await pilot.press("d")
        await until(pilot, lambda: app.cluster_state.deploy_status == "deployed", timeout=60)
        await pilot.press("5", "space")
        await until(pilot, lambda: app.cluster_state.requests_completed > 3, timeout=60)
        dash = app.screen
        assert isinstance(dash, DashboardScreen) and dash.load_running
        await until(pilot, lambda: "ms" in text_of(app, "#stages"), timeout=10)
        assert "local1" in text_of(app, "#stages")
        # local nodes: each stage sends over its host's private socket, not TCP
        assert app.cluster_state.links == ("ipc", "ipc")
        assert "local" in text_of(app, "#stages") and "TCP" not in text_of(app, "#stages")
        await pilot.press("space")
        assert not dash.load_running
        other = tmp_path / "other.onnx"
        shutil.copyfile(DEMO_MODEL, other)
        await pilot.press("1", "p")
        await paste(pilot, str(other))
        await pilot.press("enter")
        await until(pilot, lambda: app.opened is not None and app.opened.loaded.path == other)
        await until(pilot, lambda: any(
            "the cluster still runs demo-resnet.onnx" in str(n.message)
            for n in app._notifications))
        await pilot.press("q")


def _p50_shown(app: PeripheryApp) -> bool:
    if app.current_mode != "dashboard":
        return False
    try:
        label = text_of(app, "#label-p50")
    except NoMatches:  # the dashboard is still being mounted
        return False
    return re.search(r"p50 latency\s+\S*\d+(\.\d+)? (ms|s|µs)", label) is not None


async def test_demo_streams_on_its_own() -> None:
    """`periphery-app --demo` (3 nodes, as the README runs it) shows a p50 with no key press."""
    app = PeripheryApp(DEMO_MODEL, demo=True, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: _p50_shown(app), timeout=120)
        assert app.plan is not None and app.plan.k == 3
        assert not any(isinstance(s, ErrorModal) for s in app.screen_stack)
        await pilot.press("q")
    assert app.control.local is None  # quitting stopped the local nodes


async def test_demo_restarts_a_killed_node_recovering_and_spreading_back_losing_nothing() -> None:
    """Streaming, one node SIGKILLed: the app starts it again at its address (its event log
    says so), the pipeline recovers onto the two survivors and then spreads back over the new
    process, three nodes again; no request fails and requests keep completing."""
    app = PeripheryApp(DEMO_MODEL, demo=True, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.cluster_state.requests_completed > 10, timeout=120)
        local = app.control.local
        assert local is not None
        port, first = local.addresses[1].port, local.nodes[1].process.pid
        local.kill(1)

        def said(what: str) -> list[str]:
            return [line for line in app.cluster_state.recent if what in line]

        # (a restart quicker than the loss is noticed recovers onto three nodes at once)
        await until(pilot, lambda: said("spread back:") or said("on 3 nodes"), timeout=60)
        (restarted,) = said("node local1 exited (signal 9); started again at ")
        assert f"127.0.0.1:{port}, id " in restarted
        assert local.nodes[1].process.pid != first and local.alive() == 3
        (recovered,) = said("recovered:")
        back = said("spread back:")
        if "on 2 nodes (local0, local2)" in recovered:
            assert back and "local1 joined; serving again on 3 nodes" in back[0], back
        print(f"\napp: {restarted}\napp: {recovered}\napp: {back}")
        await until(pilot, lambda: len(app.cluster_state.assignment) == 3, timeout=10)
        # the process started again replaces the lost one in the Cluster screen's table
        await until(pilot, lambda: len(app.cluster_state.nodes) == 3, timeout=10)
        assert not app.cluster_state.nodes_in("lost")
        after = app.cluster_state.requests_completed
        await until(pilot, lambda: app.cluster_state.requests_completed > after + 5,
                    timeout=15)
        assert app.cluster_state.requests_failed == 0
        await until(pilot, lambda: "recovered 1x" in text_of(app, "#load"), timeout=10)
        load = text_of(app, "#load")
        assert "failed 0" in load and "running" in load
        await pilot.press("q")


async def test_a_redeploy_onto_a_hung_node_fails_cleanly_and_quit_is_prompt() -> None:
    """Streaming; a node is stopped (SIGSTOP, hung not dead) and the user redeploys from the
    Shards screen: the deploy fails with a modal, the pipeline recovers onto the two other
    nodes without failing a request, and `q` then quits at once, leaving no node process."""
    app = PeripheryApp(DEMO_MODEL, demo=True, browse_dir=DEMO_MODEL.parent)
    local = None
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.cluster_state.requests_completed > 10, timeout=120)
            local = app.control.local
            assert local is not None
            pids = [n.process.pid for n in local.nodes]
            os.kill(pids[2], signal.SIGSTOP)
            await pilot.press("3")
            await until(pilot, lambda: isinstance(app.screen, ShardsScreen))
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ErrorModal), timeout=30)
            await pilot.press("escape")
            await until(pilot, lambda: app.cluster_state.recoveries == 1, timeout=30)
            after = app.cluster_state.requests_completed
            await until(pilot, lambda: app.cluster_state.requests_completed > after + 5,
                        timeout=15)
            assert app.cluster_state.requests_failed == 0
            t0 = time.monotonic()
            await pilot.press("q")
        quit_s = time.monotonic() - t0
        assert quit_s < 10, f"quitting took {quit_s:.1f} s"
        print(f"\nquit after a failed redeploy onto a hung node: {quit_s:.1f} s")
        for pid in pids:  # the hung node too (it is killed when it does not stop in time)
            assert not psutil.pid_exists(pid), f"node process {pid} outlived the app"
    finally:
        if local is not None:
            for n in local.nodes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.process.pid, signal.SIGCONT)
        app.control.close()


async def test_the_event_log_tails_new_events_unless_scrolled_up() -> None:
    app = PeripheryApp(DEMO_MODEL, demo=True, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=(100, 20)) as pilot:
        await until(pilot, lambda: app.cluster_state.requests_completed > 0, timeout=120)
        await pilot.press("4")
        await until(pilot, lambda: isinstance(app.screen, ClusterScreen))
        log = app.screen.query_one(Log)
        local = app.control.local
        assert local is not None
        local.kill(2)  # new events: its restart, the loss, the recovery, the spread back
        await until(pilot, lambda: any("spread back:" in line for line in log.lines), timeout=60)
        await until(pilot, lambda: log.lines[-1] == app.cluster_state.recent[-1])
        assert log.max_scroll_y > 0  # more lines than fit: following them means scrolling
        assert log.is_vertical_scroll_end
        log.scroll_home(animate=False, immediate=True)  # the user scrolls up to read
        shown = log.line_count
        local.kill(1)  # more events
        await until(pilot, lambda: log.line_count > shown, timeout=30)
        await pilot.pause()
        assert log.scroll_y == 0  # it stayed where the user is reading
        await pilot.press("q")


async def test_cluster_and_dashboard_show_a_fixed_fold() -> None:
    app = sample_app()
    async with app.run_test(size=SIZE) as pilot:
        await show_sample_screen(pilot, "cluster")
        table = app.screen.query_one(DataTable)
        assert table.row_count == 4
        states = [str(table.get_row_at(i)[1]) for i in range(4)]  # state: 2nd column
        assert "lost" in " ".join(states) and "busy" in " ".join(states)
        await pilot.press("5")
        await pilot.pause()
        assert "S1 ◀" in text_of(app, "#stages")  # the bottleneck of the fixed timings
        assert "20.0 req/s" in text_of(app, "#label-rps")


async def test_the_shards_screen_plans_on_the_figures_the_nodes_reported() -> None:
    """An app with no master of its own (the fixture's recorded events) plans the deployed
    stages on the nodes' reported speeds, not on reference devices."""
    app = sample_app()
    async with app.run_test(size=SIZE) as pilot:
        await show_sample_screen(pilot, "shards")
        plan = app.plan
        assert plan is not None
        names = [app.cluster_state.nodes[i].name for i in app.cluster_state.assignment]
        assert [s.device for s in plan.stages] == names
        await pilot.press("minus")  # K = 2: two of the same nodes, still their figures
        await until(pilot, lambda: app.plan is not None and app.plan.k == 2)
        plan = app.plan
        assert plan is not None
        assert [s.device for s in plan.stages] == names[:2]
        assert "reference devices" not in text_of(app, "#controls")


async def test_help_lists_keys_and_the_palette_offers_every_action() -> None:
    app = PeripheryApp(DEMO_MODEL, browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.opened is not None)
        await pilot.press("question_mark")
        assert isinstance(app.screen, DetailsModal)
        text = text_of(app, "#content")
        for expected in ("Search", "Fold", "Deploy", "Add node", "Start/stop load"):
            assert expected in text
        await pilot.press("escape")
        await pilot.press("2")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Search", "Fold", "Dashboard", "Shards", "Keys"} <= titles


async def test_the_cluster_screen_finds_nodes_over_mdns_and_connects_one() -> None:
    """With no nodes the screen says what to do; nodes advertised over mDNS (on loopback here)
    appear as `discovered`, `c` joins the selected one, and one that stops goes away."""
    app = PeripheryApp(browse_dir=DEMO_MODEL.parent, insecure=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        await until(pilot, lambda: isinstance(app.screen, ClusterScreen))
        summary = " ".join(text_of_label(app, "#summary").split())
        assert "no nodes yet" in summary and "press l" in summary and "a to add" in summary
        with LocalCluster(2, advertise=True, secure=False) as cluster:
            table = app.screen.query_one(DataTable)
            await until(pilot, lambda: table.row_count == 2, timeout=20)
            assert "2 discovered" in text_of_label(app, "#summary")
            table.move_cursor(row=0)
            await pilot.press("c")
            await until(pilot, lambda: len(app.cluster_state.nodes) == 1, timeout=20)
            joined = next(iter(app.cluster_state.nodes.values()))
            assert joined.name in {"local0", "local1"}
            await until(pilot, lambda: "1 discovered" in text_of_label(app, "#summary"))
            other = 1 if joined.name == "local0" else 0
            cluster.nodes[other].process.terminate()  # a clean stop says goodbye over mDNS
            await until(pilot, lambda: table.row_count == 1, timeout=20)
            assert "discovered" not in text_of_label(app, "#summary")


# A node of another release, as an older install would run it: wire protocol 1 on the wire and
# in its mDNS record.
_OLD_NODE = ("import sys, periphery_core.wire as wire, periphery_core.wire.codec as codec; "
             "codec.PROTOCOL_VERSION = wire.PROTOCOL_VERSION = 1; "
             "from periphery_core.cli.node import main; sys.exit(main())")


async def test_a_discovered_node_of_another_release_says_so_before_it_is_tried() -> None:
    """A node advertising another wire protocol over mDNS is listed as `other release`, and
    `c` on it says at once, in one line, what to do: no connection is tried (its control port
    is never answered, so one tried would only time out)."""
    node = subprocess.Popen(
        [sys.executable, "-c", _OLD_NODE, "--name", "old", "--host", "127.0.0.1", "--port", "0",
         "--insecure", "--threads", "1", "--no-recalibrate", "--mdns-interface", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    app = PeripheryApp(browse_dir=DEMO_MODEL.parent, insecure=True)
    try:
        assert node.stdout is not None and "ready" in node.stdout.readline()
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await until(pilot, lambda: isinstance(app.screen, ClusterScreen))
            table = app.screen.query_one(DataTable)
            await until(pilot, lambda: table.row_count == 1, timeout=20)
            assert "other release" in str(table.get_row_at(0)[1])
            os.kill(node.pid, signal.SIGSTOP)  # its record stays listed; its sockets go silent
            await pilot.press("c")
            # A connection tried would end in "did not answer" (the node is stopped), never in
            # the release's message, and would leave a node behind: the message and the empty
            # cluster show none was tried, with no clock to trip on a loaded machine (a check
            # of under 2 s failed once under the suite's load, 5.8 s to the modal).
            await until(pilot, lambda: isinstance(app.screen, ErrorModal), timeout=30)
            message = str(app.screen.query_one("#message", Static).content)
            assert f"speaks wire protocol 1 and this master {PROTOCOL_VERSION}: install the " \
                   "same Periphery release on both" in message, message
            assert not app.cluster_state.nodes
    finally:
        node.kill()
        node.wait(10)


async def test_a_node_computing_several_requests_at_once_shows_it_and_plans_for_it() -> None:
    """A node started --workers 2: the Cluster table says so beside its device, and the
    Shards screen's plan on it counts two requests' activations."""
    async with app_on_local_nodes(DEMO_MODEL, DEMO_MODEL.parent, nodes=1,
                                  workers=2) as (app, pilot):
        (node,) = app.cluster_state.nodes.values()
        assert node.workers == 2
        table = app.screen.query_one(DataTable)
        await until(pilot, lambda: table.row_count == 1)
        assert str(table.get_cell_at(Coordinate(0, 6))) == \
            f"{(node.device or '?')[:12]}, 2 at once"
        await pilot.press("3")
        await until(pilot, lambda: app.plan is not None)
        while app.plan is not None and app.plan.k > 1:  # one stage
            k = app.plan.k
            await pilot.press("minus")
            await until(pilot, lambda k=k: app.plan is not None and app.plan.k < k)
        await pilot.press("a", "enter")  # the stage on the node
        await until(pilot, lambda: app.plan is not None
                    and app.plan.stages[0].device == "local0", timeout=30)
        (stage,) = app.plan.stages
        assert stage.workers == 2
        assert stage.memory_bytes == stage.param_bytes + 2 * stage.peak_activation_bytes
        from periphery_app.widgets.stage_chart import StageChart

        chart = app.screen.query_one(StageChart)
        await until(pilot, lambda: "(2 at once)" in rendered_text(chart.render()))


def text_of_label(app: PeripheryApp, selector: str) -> str:
    from textual.widgets import Label

    return str(app.screen.query_one(selector, Label).content)


async def test_the_shards_screen_shows_deploy_state_only_for_the_plan_that_runs() -> None:
    """After the demo deploys, the Shards screen shows its stages ready; a cut moved by hand
    makes another plan, which was never deployed and says it is manual."""
    from periphery_app.widgets.stage_chart import StageChart

    app = PeripheryApp(DEMO_MODEL, demo=True, browse_dir=DEMO_MODEL.parent)

    def chart_text() -> str:
        return rendered_text(app.screen.query_one(StageChart).render())

    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.cluster_state.deploy_status == "deployed",
                    timeout=120)
        # The demo's load stopped: each key below then costs Pilot no wait for a busy process.
        await pilot.press("5", "space", "3")
        await until(pilot, lambda: isinstance(app.screen, ShardsScreen)
                    and "ready" in chart_text(), timeout=20)
        assert chart_text().count(" ready ") == 3
        await pilot.press("right")  # move the selected boundary: a plan made by hand
        await until(pilot, lambda: app.plan is not None and app.plan.strategy == "manual")
        await pilot.pause()
        assert " ready " not in chart_text()
        assert "this plan: manual" in text_of(app, "#controls")
        await pilot.press("plus")  # K = 4 on 3 nodes: the fourth stage has none
        await until(pilot, lambda: app.plan is not None and app.plan.k == 4)
        await pilot.pause()
        controls = " ".join(text_of(app, "#controls").split())
        assert "stage 3 has no node (K = 4 > 3 nodes)" in controls, controls
        # costed on a node like the others; the nodes' own stages on their measured speeds
        assert "its figures assume a node like the others" in controls, controls
        assert [s.device for s in app.plan.stages][3] == "stage 3 (no node)"
        assert {s.device for s in app.plan.stages[:3]} == {"local0", "local1", "local2"}
        # Assignments follow K: down to 1 and back up to 3, every stage is on a node again
        # (not on a reference "device2"), the same nodes as before.
        await pilot.press("minus", "minus", "minus")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 1)
        await pilot.press("plus", "plus")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 3)
        plan = app.plan
        assert plan is not None
        assert [s.device for s in plan.stages] == ["local0", "local1", "local2"]
        await pilot.press("q")


async def test_the_cluster_screen_says_when_the_master_stops_and_its_figures_go_stale(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes connected; the master's control thread dies (injected). The Cluster screen
    and the dashboard say the master is not responding, and rows whose events stopped say how
    long they have been silent instead of showing `ready` as if live."""
    from periphery_core.cluster.master_control import Control

    app = PeripheryApp(browse_dir=DEMO_MODEL.parent)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("4")
        await until(pilot, lambda: isinstance(app.screen, ClusterScreen))
        app.control.start_local(2)
        await until(pilot, lambda: len(app.cluster_state.nodes) == 2, timeout=20)
        table = app.screen.query_one(DataTable)
        await until(pilot, lambda: "ready" in str(table.get_row_at(0)[1]))

        class Fatal(BaseException):  # what the loop's per-turn guard does not catch
            pass

        def broken(self: Control, next_beat: float) -> float:
            raise Fatal("injected failure")

        monkeypatch.setattr(Control, "_turn", broken)
        await until(pilot, lambda: "master not responding" in
                    text_of_label(app, "#summary"), timeout=10)
        assert "injected failure" in text_of_label(app, "#summary")
        await until(pilot, lambda: "silent" in str(table.get_row_at(0)[1]), timeout=15)
        await pilot.press("5")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await until(pilot, lambda: "master not responding" in text_of(app, "#load")
                    and "silent" in text_of(app, "#utilisation"), timeout=5)
        assert "injected failure" in text_of(app, "#load")


async def test_a_narrow_cluster_table_keeps_the_state_column_whole() -> None:
    """The state column comes right after the name, so a narrow terminal cuts others first."""
    app = sample_app()
    async with app.run_test(size=(60, 24)) as pilot:
        await show_sample_screen(pilot, "cluster")
        table = app.screen.query_one(DataTable)
        edge = 0  # where the state column ends, in cells from the table's left
        for column in table.ordered_columns:
            edge += column.get_render_width(table)
            if str(column.key.value) == "state":
                break
        assert edge <= table.size.width, (edge, table.size.width)


async def test_the_model_screen_sets_input_shapes_and_recomputes() -> None:
    """stories260K's symbolic [batch, seq] defaults to 1x1; `i` sets 1x64 and the analysis,
    FLOPs included, follows. The notes say how in the app's terms, not the CLI's flag."""
    require_shared()
    app = PeripheryApp(MODELS / "stories260K.onnx", browse_dir=MODELS)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.opened is not None)
        assert app.opened is not None
        before = app.opened.analysis
        assert before.input_shapes["tokens"] == (1, 1)
        summary = " ".join(text_of(app, "#summary").split())
        assert "press i to set input shapes" in summary and "--input-shape" not in summary
        await pilot.press("i")
        assert isinstance(app.screen, PromptModal)
        app.screen.query_one(Input).value = "tokens=1x64"
        await pilot.press("enter")
        await until(pilot, lambda: app.opened is not None
                    and app.opened.analysis.input_shapes["tokens"] == (1, 64), timeout=30)
        assert app.opened.analysis.total_flops > 30 * before.total_flops
        await pilot.press("i")
        app.screen.query_one(Input).value = "tokens=1x2x3"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ErrorModal))
        assert "rank" in text_of(app, "#message")


async def test_the_graph_of_a_transformer_reads_like_the_model() -> None:
    """stories260K (1,580 nodes, 564 of them constants, 611 arithmetic on shapes): no Constant
    box by default, no box of shape plumbing, and folded it is the embedding, one box per layer,
    and the head."""
    require_shared()
    app = PeripheryApp(MODELS / "stories260K.onnx", browse_dir=MODELS)
    async with app.run_test(size=SIZE) as pilot:
        screen, view = await _graph_screen(app, pilot)
        layout = view.graph_layout
        assert layout is not None and app.opened is not None
        nodes, tensors = app.opened.analysis.nodes, app.opened.analysis.tensors
        ops = [v.label.split()[0] for v in layout.vertices]
        assert "Constant" not in ops
        assert len(layout.vertices) < 500  # 1,016 when only constants are drawn inside boxes
        # every node is in exactly one box, and no box is a step on int64 shape values
        assert sorted(i for v in layout.vertices for i in v.members) == list(range(len(nodes)))
        assert all(i in layout.vertices[layout.vertex_of_node[i]].members
                   for i in range(len(nodes)))
        kinds = {(nodes[i].op_type, tensors[nodes[i].outputs[0]].dtype)
                 for v in layout.vertices for i in v.own}
        assert not {k for k in kinds if k[0] in ("Shape", "Gather", "Unsqueeze", "Concat")
                    and k[1] == "int64"}, kinds
        # steps on activations stay boxes: the embedding lookup reads the tokens' values
        for key in ("/tok_embeddings/Gather", "/layers.0/Reshape"):
            index = app.opened.analysis.node(key).index
            assert layout.vertices[layout.vertex_of_node[index]].own == (index,), key
        console = Console(width=160, file=io.StringIO(), record=True)
        for kind in ("Constant", "Shape"):  # the box's details say what is drawn in it
            holder = next(v for v in layout.vertices if not v.folded and any(
                nodes[i].op_type == kind for i in v.members[len(v.own):]))
            console.print(screen.details(holder.members))
        details = console.export_text()
        assert "drawn in this box" in details and "shape ops drawn in this box" in details
        assert "1,175 drawn inside other boxes" in text_of(app, "#legend")
        # search finds a hidden Shape node and selects the box it is drawn in
        hidden = next(i for v in layout.vertices for i in v.members[len(v.own):]
                      if nodes[i].op_type == "Shape"
                      and sum(nodes[i].key.lower() in n.key.lower() for n in nodes) == 1)
        await pilot.press("slash", *nodes[hidden].key, "enter")
        assert view.selected == layout.vertex_of_node[hidden]
        assert hidden not in layout.vertices[view.selected].own
        await pilot.press("f")
        await until(pilot, lambda: view.graph_layout is not layout)
        folded = view.graph_layout
        assert folded is not None
        layers = [v.label for v in folded.vertices if "/layers." in v.label]
        assert len(layers) == 5 and len(set(layers)) == 5, layers
        assert len(folded.vertices) < 30


async def test_a_big_terminal_gives_its_room_to_more_figures() -> None:
    """At 200x60 the Model screen lists the whole op histogram and the heaviest nodes, the
    Shards chart says what each stage holds beside bars of bounded length, and the dashboard's
    charts grow; at 100x32 the Model screen keeps its short form."""
    require_shared()
    app = PeripheryApp(STORIES, browse_dir=STORIES.parent)
    async with app.run_test(size=(200, 60)) as pilot:
        await until(pilot, lambda: app.opened is not None)
        assert app.opened is not None
        ops = len(app.opened.analysis.op_histogram)
        assert ops > 20
        await until(pilot, lambda: "Heaviest nodes" in text_of(app, "#summary"))
        summary = text_of(app, "#summary")
        assert "more" not in summary.split("Heaviest nodes")[0].split("Op histogram")[1]
        assert "/output/MatMul" in summary  # the LM head: the node with the most FLOPs
        await pilot.resize_terminal(100, 32)
        await until(pilot, lambda: "Heaviest nodes" not in text_of(app, "#summary"))
        assert f"+{ops - 12} more" in text_of(app, "#summary")
    shown = sample_app()
    async with shown.run_test(size=(200, 60)) as pilot:
        await show_sample_screen(pilot, "shards")
        chart = shown.screen.query_one("#chart")
        lines = [strip.text for strip in chart.render_lines(chart.region.reset_offset)]
        plan = shown.plan
        assert plan is not None
        assert any(f"from  {plan.stages[1].nodes[0]}" in line for line in lines)
        assert max(line.count("█") for line in lines) <= 72
        await pilot.press("5")
        await until(pilot, lambda: isinstance(shown.screen, DashboardScreen))
        await pilot.pause()
        assert shown.screen.query_one("#spark-p50").size.height > 10


async def test_the_app_follows_the_pipeline_when_it_rebalances(tmp_path: Path) -> None:
    """A plan made on estimates that mislead (`periphery plan`'s, loaded with o), deployed and
    streaming: the pipeline moves its cuts on what the nodes measured; the log says so, the
    Shards screen shows the plan that now runs, every stage ready, and no request failed."""
    from periphery_app.widgets.stage_chart import StageChart
    from periphery_core.model import load_model
    from periphery_core.model.analysis import analyze
    from periphery_core.partition.planner import make_plan
    from tests.models import misleading_costs

    model = tmp_path / "misleading.onnx"
    onnx.save_model(misleading_costs(), model)
    on_estimates = make_plan(analyze(load_model(model)), 2).save(tmp_path / "plan.json")
    async with app_on_local_nodes(model, tmp_path) as (app, pilot):
        await pilot.press("3", "o", "ctrl+a", "ctrl+k")
        await paste(pilot, str(on_estimates))
        await pilot.press("enter")
        await until(pilot, lambda: app.plan is not None and app.plan.k == 2
                    and app.plan.model_path.endswith("misleading.onnx"))
        first = app.plan
        await pilot.press("d")
        await until(pilot, lambda: app.cluster_state.deploy_status == "deployed", timeout=60)
        await pilot.press("5", "space")
        await until(pilot, lambda: app.cluster_state.rebalances >= 1, timeout=120)
        pipeline = app.control.pipeline
        assert pipeline is not None and pipeline.plan is not first
        await until(pilot, lambda: app.plan is pipeline.plan, timeout=10)
        await pilot.press("space", "4")
        await until(pilot, lambda: isinstance(app.screen, ClusterScreen))
        log = app.screen.query_one(Log)
        assert any("rebalanced on measured compute" in line for line in log.lines)
        await pilot.press("3")
        await until(pilot, lambda: isinstance(app.screen, ShardsScreen))
        chart = app.screen.query_one(StageChart)

        def ready() -> int:
            return rendered_text(chart.render()).count(" ready ")

        await until(pilot, lambda: ready() == 2, timeout=30)
        assert app.cluster_state.requests_failed == 0
        await pilot.press("q")


async def test_the_planner_s_shape_deploys_replicas_that_both_serve() -> None:
    """On two real nodes, `p` asks the planner for its shape: the demo model fits one node,
    so two replicas of one stage, and the screen says why; deployed and streaming, both
    replicas serve. `r` then takes the plan back to one pipeline."""
    async with app_on_local_nodes(DEMO_MODEL, DEMO_MODEL.parent, size=(140, 40)) as (app, pilot):
        await pilot.press("3")
        await until(pilot, lambda: app.plan is not None)
        await pilot.press("p")
        await until(pilot, lambda: app.plan is not None and app.plan.replicas == 2)
        assert app.plan is not None and app.plan.k == 1
        controls = text_of(app, "#controls")
        assert "shape 2 replicas x 1 stage" in controls and "1 x 2 stages" in controls
        # the planner's figure once (a second, its plan's own sum, differed by a few)
        assert controls.count("requests/s predicted") == 1, controls
        await until(pilot, lambda: "planning the shape" not in text_of(app, "#status"))
        await pilot.press("d")
        await until(pilot, lambda: app.cluster_state.deploy_status == "deployed", timeout=60)
        assert app.cluster_state.replicas == 2 and len(app.cluster_state.assignment) == 2
        await pilot.press("5", "space")
        await until(pilot, lambda: app.cluster_state.requests_completed > 20, timeout=60)
        await until(pilot, lambda: "R1·S0" in text_of(app, "#stages"), timeout=10)
        await pilot.press("space")
        served = app.cluster_state.last_request
        assert set(served) == set(app.cluster_state.assignment), "both replicas served"
        await pilot.press("3", "r")
        await until(pilot, lambda: app.plan is not None and app.plan.replicas == 1)
        assert app.cluster_state.requests_failed == 0
        await pilot.press("q")
