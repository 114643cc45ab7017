"""Local node processes never outlive what started them, and one dead node strands no other.

`periphery cluster up` runs as a user runs it (a subprocess); it is ended with SIGTERM, with
SIGKILL, and one of its nodes is killed while it runs. A `LocalCluster` inside a Python
process that is SIGKILLed takes its nodes with it too, started from the main thread (parent-death
signal and watchdog) or from a worker thread (watchdog alone; the thread ending must not stop
the nodes). Each process a test starts is killed by pid at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from periphery_core.cluster.events import NodeExited, describe
from periphery_core.cluster.local import LocalCluster
from periphery_core.cluster.master import Master
from periphery_core.discovery import NodeAddress
from periphery_core.errors import PeripheryError
from tests.waiting import wait_for

# faulthandler: a launcher that hangs is sent SIGABRT and writes every thread's stack to its log
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def _nodes_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "periphery_core.cli.node" in " ".join(p.cmdline())]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launcher:
    """A launcher subprocess whose output goes to a file, and its node processes."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115
        # Ctrl-C as a terminal sends it, whatever this test run inherited: a shell starts
        # background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT,
                                     env=ENV, preexec_fn=_default_sigint)
        self.nodes: list[psutil.Process] = []

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, marker: str, n_nodes: int, timeout: float = 60) -> str:
        def ready() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.text()}")
            return self.text() if marker in self.text() else None

        text = str(wait_for(ready, timeout, marker))
        self.nodes = _nodes_of(self.proc.pid)
        assert len(self.nodes) == n_nodes, text
        return text

    def stopped(self, timeout: float) -> int:
        """The launcher's exit code once it has exited. One still running after `timeout` is
        made to dump its threads' stacks (SIGABRT with faulthandler on), and the failure says
        where it hung and which of its nodes were still alive."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            alive = [f"{p.pid} {p.status()}" for p in _alive(self.nodes)]
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise AssertionError(f"still running {timeout:.0f} s after being told to stop; "
                                 f"nodes alive: {alive}; its output:\n{self.text()}") from None

    def cleanup(self) -> None:
        for p in [*_alive(self.nodes), *([psutil.Process(self.proc.pid)]
                                         if self.proc.poll() is None else [])]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._file.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launcher]]:
    started: list[Launcher] = []

    def start(*args: str) -> Launcher:
        launcher = Launcher(list(args), tmp_path / f"launcher{len(started)}.log")
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.cleanup()


def cluster_up(launch: Callable[..., Launcher], n: int) -> Launcher:
    launcher = launch(sys.executable, "-m", "periphery_core.cli.main", "cluster", "up",
                      "--nodes", str(n), "--no-advertise", "--insecure")
    launcher.wait_for("nodes up", n)
    return launcher


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_cluster_up_takes_its_nodes_with_it(launch: Callable[..., Launcher],
                                            sig: signal.Signals) -> None:
    up = cluster_up(launch, 2)
    up.proc.send_signal(sig)
    # A node stops cleanly, or ends itself 3 s after it sees its launcher gone (cli/node.py);
    # 10 s leaves room for a loaded machine (5 s once ran out during the full suite).
    wait_for(lambda: not _alive(up.nodes), 10, f"the nodes to exit after {sig.name}")
    up.stopped(10)
    if sig == signal.SIGTERM:
        assert up.proc.returncode == 0 and "stopping" in up.text()


def test_one_dead_node_is_reported_and_the_others_keep_serving(
        launch: Callable[..., Launcher]) -> None:
    up = cluster_up(launch, 3)
    peers = re.findall(r"(local\d)\s+--peer 127\.0\.0\.1:(\d+)", up.text())
    victim = next(p for p in up.nodes if "local1" in p.cmdline())
    victim.kill()
    wait_for(lambda: "node local1 exited (signal 9)" in up.text(), 10, "the death to be reported")
    assert up.proc.poll() is None, up.text()  # cluster up carries on
    assert len(_alive(up.nodes)) == 2
    with Master() as master:  # the survivors still answer
        for name, port in peers:
            if name != "local1":
                handle = master.connect(NodeAddress(name, name, "127.0.0.1", int(port), {},
                                                    "static"))
                assert handle.name == name
    up.proc.send_signal(signal.SIGINT)
    up.stopped(15)
    wait_for(lambda: not _alive(up.nodes), 5, "the nodes to stop")


def test_a_node_that_dies_is_started_again_at_its_port_but_not_forever() -> None:
    """`tend(restart=True)` (what `cluster up --restart` calls every half second): a killed
    node comes back as a new process at its port, name and keys, and answers a master with
    them; the fourth death within the minute leaves it down. Without restart, a death is only
    reported, once."""
    from periphery_core.cluster.local import RESTARTS

    with LocalCluster(2) as local:
        first = local.addresses[0]
        for _ in range(RESTARTS):
            old = local.nodes[0].process
            local.kill(0)
            old.wait(10)
            (e,) = local.tend(restart=True)
            assert e.name == "local0" and e.code == -signal.SIGKILL and e.how == "signal 9"
            assert e.restarted is not None and e.restarted.port == first.port
            assert e.restarted.node_id != first.node_id
            assert local.nodes[0].process.pid != old.pid and local.alive() == 2
        with Master(keys=local.master_keys) as master:  # its keys still let the master in
            assert master.connect(local.addresses[0]).name == "local0"
        local.kill(0)
        local.nodes[0].process.wait(10)
        (e,) = local.tend(restart=True)
        assert e.restarted is None and f"ended {RESTARTS + 1} times" in e.left_down
        assert describe(e.event(local.alive())) == (
            f"node local0 exited (signal 9), left down: it ended {RESTARTS + 1} times within "
            "60 s; 1 local node still running")
        assert local.alive() == 1 and local.tend(restart=True) == []
        local.kill(1)
        local.nodes[1].process.wait(10)
        (e,) = local.tend(restart=False)
        assert e.name == "local1" and e.restarted is None and not e.left_down
        assert describe(e.event(0)) == "node local1 exited (signal 9); 0 local nodes still running"
        assert local.tend(restart=False) == [] and local.alive() == 0


def test_watched_nodes_are_started_again_and_said_and_stop_ends_the_watch() -> None:
    """`watch` (what the app, `run --local` and `serve --local` call): a node killed is started
    again at its port from the watching thread and published as one event whose line names
    where; `stop` ends the watch before it stops the nodes, so none of them is started again or
    reported, and no node outlives it."""
    published: list[NodeExited] = []
    with LocalCluster(2, secure=False) as local:
        local.watch(published.append, every_s=0.1)
        port, old = local.addresses[1].port, local.nodes[1].process
        local.kill(1)
        wait_for(lambda: published, 30, "the watch to report the killed node")
        (e,) = published
        assert e.name == "local1" and e.how == "signal 9"
        assert e.restarted_at == f"127.0.0.1:{port}" and e.running == 2
        assert describe(e) == (f"node local1 exited (signal 9); started again at 127.0.0.1:"
                               f"{port}, id {local.addresses[1].node_id[:12]}")
        assert local.nodes[1].process.pid != old.pid and local.alive() == 2
        pids = [n.process.pid for n in local.nodes]
    assert len(published) == 1  # stopping is no death to report
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)
    assert not [t for t in threading.enumerate() if t.name == "local-nodes-watch"]


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_killed_python_process_takes_its_local_cluster_with_it(
        launch: Callable[..., Launcher], thread: str) -> None:
    script = textwrap.dedent(f"""
        import threading, time
        from periphery_core.cluster.local import LocalCluster
        cluster = LocalCluster(2, secure=False)
        if {thread == "worker"}:  # as the app does; the thread ends at once
            worker = threading.Thread(target=cluster.start)
            worker.start()
            worker.join()
        else:
            cluster.start()
        print("started", flush=True)
        time.sleep(600)
    """)
    owner = launch(sys.executable, "-c", script)
    owner.wait_for("started", 2)
    if thread == "worker":  # the starting thread is gone, the nodes must not be
        # A fixed wait on purpose: what is checked is that nothing happens, and no event says
        # "nothing will". A wrongly armed parent-death signal went out as the thread ended,
        # before "started" was printed, so a node it stops is gone within this second.
        time.sleep(1.0)
        assert len(_alive(owner.nodes)) == 2, "the nodes stopped when their starting thread ended"
    owner.proc.kill()
    wait_for(lambda: not _alive(owner.nodes), 5, "the nodes to exit after their owner's SIGKILL")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_node_arms_the_parent_death_signal_when_asked(launch: Callable[..., Launcher]) -> None:
    """The signal, not the watchdog, stops it: its launcher lives on, only the thread ends."""
    script = textwrap.dedent("""
        import os, subprocess, sys, threading, time
        def start():
            node = subprocess.Popen(
                [sys.executable, "-m", "periphery_core.cli.node", "--name", "n", "--port", "0",
                 "--insecure", "--no-advertise", "--parent-pid", str(os.getpid())],
                stdout=subprocess.PIPE, text=True,
                env={**os.environ, "PERIPHERY_NODE_PDEATHSIG": "1"})
            node.stdout.readline()  # ready: the signal is armed
        worker = threading.Thread(target=start)
        worker.start()
        worker.join()
        print("thread ended", flush=True)
        time.sleep(600)
    """)
    owner = launch(sys.executable, "-c", script)
    owner.wait_for("thread ended", 1)
    wait_for(lambda: not _alive(owner.nodes), 5, "the parent-death signal to stop the node")
    assert owner.proc.poll() is None


def test_a_node_whose_launcher_is_gone_does_not_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "periphery_core.cli.node", "--port", "0", "--insecure",
         "--no-advertise", "--parent-pid", "1"],  # not this node's parent: as if it had died
        capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 1 and "ready" not in result.stdout


def test_a_local_cluster_that_fails_to_start_leaves_nothing_behind() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = LocalCluster(2, start_timeout=0.01)  # no node is ready that fast
    try:
        with pytest.raises(PeripheryError, match="did not start"):
            cluster.start()
        assert cluster.keys_dir is None and cluster.nodes == []
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        assert not _alive(left)
    finally:
        cluster.stop()
        for p in psutil.Process().children(recursive=True):
            if p.pid not in before:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
