"""Local node processes never outlive what started them, and one dead node strands no other.

`periphery cluster up` runs as a user runs it (a subprocess); it is ended with SIGTERM, with
SIGKILL, and one of its nodes is killed while it runs. A `LocalCluster` inside a Python
process that is SIGKILLed takes its nodes with it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from periphery_core.cluster.master import Master
from periphery_core.discovery import NodeAddress

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _wait(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


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


class Launcher:
    """A launcher subprocess whose output goes to a file, and its node processes."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT,
                                     env=ENV)
        self.nodes: list[psutil.Process] = []

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, marker: str, n_nodes: int, timeout: float = 60) -> str:
        def ready() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.text()}")
            return self.text() if marker in self.text() else None

        text = str(_wait(ready, timeout, marker))
        self.nodes = _nodes_of(self.proc.pid)
        assert len(self.nodes) == n_nodes, text
        return text

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
def test_cluster_up_takes_its_nodes_with_it(launch, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    up = cluster_up(launch, 2)
    up.proc.send_signal(sig)
    _wait(lambda: not _alive(up.nodes), 5, f"the nodes to exit after {sig.name}")
    up.proc.wait(10)
    if sig == signal.SIGTERM:
        assert up.proc.returncode == 0 and "stopping" in up.text()


def test_one_dead_node_is_reported_and_the_others_keep_serving(launch) -> None:  # type: ignore[no-untyped-def]
    up = cluster_up(launch, 3)
    peers = re.findall(r"(local\d)\s+--peer 127\.0\.0\.1:(\d+)", up.text())
    victim = next(p for p in up.nodes if "local1" in p.cmdline())
    victim.kill()
    _wait(lambda: "node local1 exited (signal 9)" in up.text(), 10, "the death to be reported")
    assert up.proc.poll() is None, up.text()  # cluster up carries on
    assert len(_alive(up.nodes)) == 2
    with Master() as master:  # the survivors still answer
        for name, port in peers:
            if name != "local1":
                handle = master.connect(NodeAddress(name, name, "127.0.0.1", int(port), {},
                                                    "static"))
                assert handle.name == name
    up.proc.send_signal(signal.SIGINT)
    up.proc.wait(15)
    _wait(lambda: not _alive(up.nodes), 5, "the nodes to stop")


def test_a_killed_python_process_takes_its_local_cluster_with_it(launch) -> None:  # type: ignore[no-untyped-def]
    script = textwrap.dedent("""
        import time
        from periphery_core.cluster.local import LocalCluster
        cluster = LocalCluster(2, secure=False)
        cluster.start()
        print("started", flush=True)
        time.sleep(600)
    """)
    owner = launch(sys.executable, "-c", script)
    owner.wait_for("started", 2)
    owner.proc.kill()
    _wait(lambda: not _alive(owner.nodes), 5, "the nodes to exit after their owner's SIGKILL")
