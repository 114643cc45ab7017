"""`periphery-node`: run a node daemon on this host.

Prints one line per event; the first stdout line, `periphery-node ready control=... data=...
state=...`, tells a launcher (the local cluster) where the node listens and works (its private
folder, which holds its socket for processes on this host: the launcher removes it should the
node be killed before it could).

A launcher passes `--parent-pid` so that its nodes never outlive it, however it ends (SIGKILL
included). Two mechanisms, both ending in the same clean stop (the SIGTERM path):

- the watchdog, everywhere: a thread sees the node re-parented (os.getppid() no longer the
  launcher's pid; a dead parent's pid is never anyone's parent again) within a quarter of a
  second and stops the node. Should the clean stop stall (a long inference, a hung mDNS
  unregister), it ends the process outright `_HARD_EXIT_AFTER` seconds later.
- Linux's parent-death signal, when the launcher asks for it with PERIPHERY_NODE_PDEATHSIG=1:
  prctl(PR_SET_PDEATHSIG, SIGTERM), then os.getppid() checked against --parent-pid, for a
  launcher that died before prctl ran. The kernel sends it when the *thread* that started the
  node ends, not the process, so a launcher sets the variable only from its main thread (the
  app starts local nodes from worker threads that end long before it does).

A node whose launcher is already gone when it starts exits at once (code 1).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from periphery_core.cli.common import handle_errors, run_click
from periphery_core.wire.protocol import MAX_WORKERS

if TYPE_CHECKING:
    from periphery_core.cluster.node import NodeConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", default=None, help="Node name (default: this host's name).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the one other hosts reach this node at).")
@click.option("--port", type=click.IntRange(0, 65535), default=5555, show_default=True,
              help="Control port (0: any free port).")
@click.option("--data-port", default=0, help="Activation port (default: any free port).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="ONNX Runtime intra-op threads (0: its default).")
@click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=None, metavar="N",
              help="Requests the stage computes at once (default: 1 on a CPU, 4 on CUDA); on a "
                   "CPU the threads are shared out among them.")
@click.option("--kv-budget", default=None, metavar="SIZE",
              help="Most KV cache a language model's stage may hold here, e.g. 8GiB "
                   "(default: a quarter of the memory it lives in, the GPU's with cuda).")
@click.option("--no-advertise", is_flag=True, help="Do not advertise over mDNS.")
@click.option("--mdns-interface", "mdns_interfaces", multiple=True,
              help="Advertise only on these interface addresses (repeatable).")
@click.option("--keys", type=click.Path(path_type=Path), default=None,
              help="This host's key folder from 'periphery keys init' (default: "
                   "$PERIPHERY_KEYS, else keys/ in the config folder: "
                   "$PERIPHERY_CONFIG_DIR or ~/.config/periphery).")
@click.option("--insecure", is_flag=True,
              help="Run without authentication or encryption (trusted networks only).")
@click.option("--parent-pid", type=int, default=None,
              help="Exit when this process (the launcher) exits.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The node's own working folder, made private (0700) (default: a fresh "
                   "private temporary folder, removed on exit).")
@click.option("--no-recalibrate", is_flag=True,
              help="Measure this host's speed once, at start, not again while it is idle "
                   "(a short benchmark that would disturb a latency measurement).")
@handle_errors
def node(name: str | None, host: str, port: int, data_port: int, device: str, threads: int,
         workers: int | None, kv_budget: str | None, no_advertise: bool,
         mdns_interfaces: tuple[str, ...],
         keys: Path | None, insecure: bool, parent_pid: int | None, state_dir: Path | None,
         no_recalibrate: bool) -> None:
    """Run a Periphery node: receive a shard, run it, stream activations to the next stage."""
    from periphery_core.cluster.keys import keyring_or_insecure
    from periphery_core.cluster.node import NodeConfig

    stop = threading.Event()  # set by a signal or by the parent watchdog
    if parent_pid is not None:
        _guard_parent(parent_pid, stop)
    ring = keyring_or_insecure(keys, insecure)
    from periphery_core.runtime.gpu import parse_device

    parse_device(device)  # one clear line for a device that is not cpu, cuda or cuda:N
    budget = _kv_budget(kv_budget)
    # Work in a private folder of the node's own, never where it was started: nothing a shard
    # or ONNX Runtime might resolve against the working folder can reach the user's files.
    own = _enter_state_dir(state_dir)
    try:
        _serve(NodeConfig(
            name=name or platform.node(), host=host, port=port, data_port=data_port,
            device=device, threads=threads, workers=workers or 0, kv_budget=budget,
            advertise=not no_advertise,
            mdns_interfaces=mdns_interfaces or None, keys=ring,
            private_parent=Path.cwd(),  # its sockets for this host live in its state folder
            recalibrate=not no_recalibrate,
        ), stop)
    finally:
        if own is not None:
            os.chdir("/")
            shutil.rmtree(own, ignore_errors=True)


def _kv_budget(text: str | None) -> int:
    """--kv-budget in bytes (0: the default); one clear line for what is not a size."""
    if text is None:
        return 0
    from periphery_core.errors import PeripheryError
    from periphery_core.units import parse_bytes

    try:
        budget = parse_bytes(text)
    except ValueError as exc:
        raise PeripheryError(f"--kv-budget: {exc}") from None
    if budget <= 0:
        raise PeripheryError("--kv-budget must be more than 0 bytes")
    return budget


def _serve(config: NodeConfig, stop: threading.Event) -> None:
    from periphery_core.cluster.node import NodeDaemon

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    daemon = NodeDaemon(config)
    try:
        if stop.is_set():
            return
        daemon.start()
    except Exception as exc:  # most often: the port is taken
        from periphery_core.errors import PeripheryError

        raise PeripheryError(f"cannot listen on {config.host}:{config.port}: {exc}") from None

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def relay() -> None:  # a signal or the watchdog ends serve_forever
        stop.wait()
        daemon.halt()

    threading.Thread(target=relay, daemon=True, name="stop-relay").start()
    print(f"periphery-node ready id={daemon.node_id} control={daemon.control_endpoint} "
          f"data={daemon.data_endpoint} state={Path.cwd()}", flush=True)
    try:
        daemon.serve_forever()
    finally:
        daemon.stop()


def _enter_state_dir(state_dir: Path | None) -> Path | None:
    """chdir into the node's private folder; returns it when it is temporary (to remove)."""
    from periphery_core.errors import PeripheryError

    try:
        if state_dir is None:
            folder = Path(tempfile.mkdtemp(prefix="periphery-node-"))  # made 0700
            temporary = True
        else:
            folder = state_dir.resolve()
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            folder.chmod(0o700)
            temporary = False
        os.chdir(folder)
    except OSError as exc:
        raise PeripheryError(f"cannot use {state_dir} as the node's state folder: "
                             f"{exc.strerror}") from None
    return folder if temporary else None


_HARD_EXIT_AFTER = 3.0  # seconds a node whose launcher is gone gets to stop cleanly


def _guard_parent(parent_pid: int, stop: threading.Event) -> None:
    """Arm the parent-death signal (if asked) and the watchdog; exit if the parent is gone."""
    if os.environ.get("PERIPHERY_NODE_PDEATHSIG") == "1" and sys.platform.startswith("linux"):
        import contextlib
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):  # no prctl: the watchdog alone
            ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the launcher died before this node started
        sys.exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, stop), daemon=True,
                     name="parent-watchdog").start()


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    while os.getppid() == parent_pid:  # (not stop: a signal may be the parent-death one)
        time.sleep(0.25)
    logging.getLogger("periphery.node").warning(
        "the process that started this node (pid %d) is gone: stopping", parent_pid)
    stop.set()
    time.sleep(_HARD_EXIT_AFTER)
    logging.getLogger("periphery.node").warning("the node did not stop in time: exiting")
    os._exit(1)


def main() -> None:
    run_click(node, "periphery-node")


if __name__ == "__main__":
    main()
