"""A local cluster: N `periphery-node` processes on loopback, started and stopped cleanly.

This is the embedded default the README's main command and the app's demo use. Each node is a
real process; its first stdout line says where it listens. Each is started with
`--parent-pid`, so it stops by itself when the process that started it ends, however that
ends (SIGKILL included): local nodes never outlive their launcher. Started from the main
thread, the nodes also get Linux's parent-death signal (PERIPHERY_NODE_PDEATHSIG=1, armed by
the node itself: no preexec_fn, which is unsafe in a threaded process); from any other thread
they rely on the watchdog alone, since that signal fires when the starting *thread* ends. See
`periphery_core.cli.node` for both mechanisms.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from periphery_core.cluster.events import NodeExited
from periphery_core.cluster.keys import KeyRing, init_cluster_keys, load_keyring
from periphery_core.discovery import NodeAddress
from periphery_core.errors import PeripheryError

log = logging.getLogger("periphery.local")

if TYPE_CHECKING:
    from periphery_core.cluster.master import Master

_READY = re.compile(r"periphery-node ready id=(\w+) control=tcp://([^:]+):(\d+) data=(\S+)"
                    r"(?: state=(\S+))?")


RESTARTS = 3  # times `tend` starts one node again within RESTART_WINDOW_S, at most
RESTART_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class NodeExit:
    """A local node process that ended, as `LocalCluster.tend` found it."""

    name: str
    code: int  # its exit code (negative: the signal that ended it)
    restarted: NodeAddress | None = None  # where it listens again, when started again
    left_down: str = ""  # why it was not started again, when asked to restart it

    @property
    def how(self) -> str:
        return f"signal {-self.code}" if self.code < 0 else f"exit code {self.code}"

    def event(self, running: int) -> NodeExited:
        """As a cluster event (whose `describe` is the line a user reads), `running` being the
        local nodes running after it."""
        at = self.restarted
        return NodeExited(self.name, self.how, f"{at.host}:{at.port}" if at else "",
                          at.node_id if at else "", self.left_down, running, time.time())


@dataclass(frozen=True, slots=True)
class LocalNode:
    process: subprocess.Popen
    address: NodeAddress
    data_endpoint: str
    state_dir: Path | None = None  # its private folder (its sockets for this host are in it)


class LocalCluster:
    """Start `n` node processes on 127.0.0.1; use as a context manager."""

    def __init__(self, n: int, *, advertise: bool = False, threads: int | None = None,
                 log_dir: Path | None = None, start_timeout: float = 30.0,
                 secure: bool = True, device: str = "cpu", recalibrate: bool = True,
                 workers: int | None = None) -> None:
        """Args:
            threads: ONNX Runtime threads per node; None: this machine's cores shared out
                (cores // n, at least 1), so one local stage uses every core as plain ONNX
                Runtime would, and n stages do not fight over them.
            secure: give the master and every node a fresh CurveZMQ keypair (in a temporary
                folder removed on stop), each allowing all the others; `master_keys` is the
                master's key ring. False runs them --insecure.
            device: every node's `--device` (`cuda:N`: all on GPU N).
            recalibrate: False starts the nodes `--no-recalibrate` (benchmarks that time
                requests on an otherwise idle host).
            workers: every node's `--workers` (None: the node's default for its device);
                on a CPU each node's threads are shared out among them.
        """
        if n < 1:
            raise PeripheryError("a local cluster needs at least one node")
        self.secure = secure
        self.device = device
        self.recalibrate = recalibrate
        self.workers = workers
        self.keys_dir: Path | None = None
        self.master_keys: KeyRing | None = None
        self.n = n
        self.advertise = advertise
        self.threads = threads or max(1, (os.cpu_count() or 1) // n)
        self.log_dir = log_dir
        self.start_timeout = start_timeout
        self.nodes: list[LocalNode] = []
        self._ended: set[int] = set()  # pids `tend` has reported
        self._restarts: dict[int, list[float]] = {}  # node index -> when it was restarted
        self._watcher: threading.Thread | None = None  # `watch`'s thread, while it runs
        self._stopping = threading.Event()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> list[NodeAddress]:
        """Start the nodes and wait until each listens; on any failure none is left running."""
        procs: list[subprocess.Popen] = []
        self._stopping.clear()
        try:
            self._start(procs)
            for i, proc in enumerate(procs):
                self.nodes.append(self._await_ready(i, proc))
        except BaseException:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            self.nodes = []
            self._remove_keys()
            raise
        return [n.address for n in self.nodes]

    def _start(self, procs: list[subprocess.Popen]) -> None:
        if self.secure:
            self.keys_dir = Path(tempfile.mkdtemp(prefix="periphery-keys-"))
            init_cluster_keys(self.keys_dir, ["master"], [f"local{i}" for i in range(self.n)])
            self.master_keys = load_keyring(self.keys_dir / "master")
        for i in range(self.n):
            procs.append(self._spawn(i, port=0))

    def _spawn(self, i: int, port: int) -> subprocess.Popen:
        """Start node i's process (port 0: any free port)."""
        on_main_thread = threading.current_thread() is threading.main_thread()
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PERIPHERY_NODE_PDEATHSIG": "1" if on_main_thread else "0"}
        cmd = [sys.executable, "-m", "periphery_core.cli.node", "--name", f"local{i}",
               "--host", "127.0.0.1", "--port", str(port), "--threads", str(self.threads),
               "--device", self.device, "--parent-pid", str(os.getpid())]
        if self.keys_dir is not None:
            cmd += ["--keys", str(self.keys_dir / f"local{i}")]
        else:
            cmd.append("--insecure")
        if not self.recalibrate:
            cmd.append("--no-recalibrate")
        if self.workers:
            cmd += ["--workers", str(self.workers)]
        if self.advertise:
            cmd += ["--mdns-interface", "127.0.0.1"]
        else:
            cmd.append("--no-advertise")
        if self.log_dir is None:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env=env)
        # the node keeps its copy of the file; a restarted node's lines follow its first's
        with open(self.log_dir / f"node{i}.log", "a" if port else "w") as log:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def _await_ready(self, i: int, proc: subprocess.Popen) -> LocalNode:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()  # type: ignore[union-attr]
                                                             ), daemon=True)
        reader.start()
        reader.join(self.start_timeout)
        m = _READY.search(line[0]) if line else None
        if m is None:
            raise PeripheryError(f"local node {i} did not start (exit code {proc.poll()})")
        node_id, host, port, data, state = m.groups()
        props = {"data": data}
        if self.keys_dir is not None:
            props["key"] = load_keyring(self.keys_dir / f"local{i}").public.decode()
        address = NodeAddress(node_id=node_id, name=f"local{i}", host=host, port=int(port),
                              properties=props, source="static")
        return LocalNode(proc, address, data, Path(state) if state else None)

    @property
    def addresses(self) -> list[NodeAddress]:
        return [n.address for n in self.nodes]

    def alive(self) -> int:
        """Node processes still running."""
        return sum(n.process.poll() is None for n in self.nodes)

    def tend(self, restart: bool) -> list[NodeExit]:
        """Look once at the node processes: each that ended since the last look is reported
        and, with `restart`, started again at its port with its name and keys (`restart`), as
        a service manager would; one that ended RESTARTS times within RESTART_WINDOW_S is left
        down (it would only die again)."""
        out = []
        for i, node in enumerate(self.nodes):
            code = node.process.poll()
            if code is None or node.process.pid in self._ended:
                continue
            self._ended.add(node.process.pid)
            name = node.address.name
            if not restart:
                out.append(NodeExit(name, code))
                continue
            now = time.monotonic()
            recent = [t for t in self._restarts.get(i, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= RESTARTS:
                out.append(NodeExit(name, code, left_down=f"it ended {len(recent) + 1} times "
                                    f"within {RESTART_WINDOW_S:.0f} s"))
                continue
            self._restarts[i] = [*recent, now]
            try:
                out.append(NodeExit(name, code, restarted=self.restart(i)))
            except PeripheryError as exc:
                out.append(NodeExit(name, code, left_down=exc.message))
        return out

    def watch(self, publish: Callable[[NodeExited], None], restart: bool = True,
              every_s: float = 0.5) -> None:
        """Tend the nodes from a thread of its own until `stop`: each node that ends is
        started again (with `restart`, within `tend`'s budget) and published as a `NodeExited`
        event (on a master's bus: the app's log and the CLI's stderr say it). What a command
        or the app that owns its local nodes calls, so that a node lost to a crash or the OOM
        killer comes back, and a pipeline that recovered without it spreads back over it."""
        if self._watcher is not None:
            raise PeripheryError("the local nodes are already watched")

        def loop() -> None:
            while not self._stopping.wait(every_s):
                for e in self.tend(restart):
                    try:
                        publish(e.event(self.alive()))
                    except Exception:  # a subscriber's bug must not stop the tending
                        log.exception("node exit not published")

        self._watcher = threading.Thread(target=loop, name="local-nodes-watch", daemon=True)
        self._watcher.start()

    def kill(self, i: int) -> None:
        """SIGKILL node i (for failure tests)."""
        self.nodes[i].process.kill()

    def restart(self, i: int) -> NodeAddress:
        """Start node i again at its address (killing it first if it still runs), as a service
        manager restarts a node that died: a new process, so a new node id, with the same
        name, port and keys. Returns its new address once it listens."""
        old = self.nodes[i]
        if old.process.poll() is None:
            old.process.kill()
        old.process.wait()
        if old.process.stdout is not None:
            old.process.stdout.close()
        self._remove_state(old)
        proc = self._spawn(i, port=old.address.port)
        try:
            self.nodes[i] = self._await_ready(i, proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return self.nodes[i].address

    @staticmethod
    def _remove_state(node: LocalNode) -> None:
        # A node removes its own folder as it stops; one that was killed could not.
        if node.state_dir is not None and node.state_dir.name.startswith("periphery-node-"):
            shutil.rmtree(node.state_dir, ignore_errors=True)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()  # no node is started again from here on
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(self.start_timeout + timeout)  # (a restart under way finishes first)
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            if node.process.stdout is not None:
                node.process.stdout.close()
            self._remove_state(node)
        self.nodes = []
        self._remove_keys()

    def _remove_keys(self) -> None:
        if self.keys_dir is not None:
            shutil.rmtree(self.keys_dir, ignore_errors=True)
            self.keys_dir = None

    def master(self, **kwargs: Any) -> Master:
        """A master holding this cluster's keys, connected to every node."""
        from periphery_core.cluster.master import Master

        m = Master(keys=self.master_keys, **kwargs)
        try:
            for a in self.addresses:
                m.connect(a)
        except BaseException:
            m.close()
            raise
        return m
