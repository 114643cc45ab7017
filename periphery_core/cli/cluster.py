"""`periphery cluster up|ls` and `periphery keys init`: the cluster from the command line, and
how the commands that deploy find their nodes (`connect_nodes`)."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from periphery_core.cli.common import (
    F,
    cli,
    device_option_for,
    handle_errors,
    json_option,
    local_only,
    workers_option_for,
)
from periphery_core.discovery import NodeAddress
from periphery_core.errors import PeripheryError


@cli.group()
def cluster() -> None:
    """Start a local cluster or list the nodes on the network."""


@cluster.command("up")
@click.option("--nodes", "-n", default=3, show_default=True, help="Node processes to start.")
@click.option("--advertise/--no-advertise", default=True, show_default=True,
              help="Advertise the nodes over mDNS (on the loopback interface).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads per node (default: the cores shared out among them).")
@click.option("--insecure", is_flag=True, help="Start the nodes without keys.")
@click.option("--restart", is_flag=True,
              help="Start a node that dies again at its port, with its name and keys (up to "
                   "3 times a minute each), as a service manager would.")
@device_option_for("the nodes")
@workers_option_for("the nodes")
@handle_errors
def cluster_up(nodes: int, advertise: bool, threads: int | None, insecure: bool,
               restart: bool, device: str, workers: int | None) -> None:
    """Start N periphery-node processes on this machine; Ctrl-C or SIGTERM stops them cleanly.

    Unless --insecure, the nodes get fresh keys; the master's key folder is printed, for
    'periphery run --keys' and 'periphery cluster ls --keys' while the cluster is up. The nodes
    never outlive this command, however it ends; a node that dies is reported and the others
    keep serving, and with --restart it is started again at its address (a master serving on
    the cluster takes it back into its pipeline).
    """
    # Ctrl-C, SIGTERM and SIGHUP (unless ignored, as under nohup) stop the nodes, remove the
    # keys and exit 0 after "stopping". SIGKILL cannot be caught: the nodes' parent watchdog
    # and parent-death signal stop them then (see periphery_core.cli.node).
    from periphery_core.cli.render import console, err_console
    from periphery_core.cluster.events import describe
    from periphery_core.cluster.local import LocalCluster

    local_only(True, device, workers)

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # leave the with-block below: the nodes stop cleanly

    previous = {sig: signal.signal(sig, on_term) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        with LocalCluster(nodes, advertise=advertise, threads=threads,
                          secure=not insecure, device=device, workers=workers) as local:
            for n in local.nodes:
                console.print(f"{n.address.name}  --peer {n.address.host}:{n.address.port}  "
                              f"id {n.address.node_id[:12]}")
            if local.keys_dir is not None:
                console.print(f"master keys: --keys {local.keys_dir / 'master'}")
            console.print(f"{nodes} nodes up; Ctrl-C stops them")
            try:
                while True:
                    for e in local.tend(restart):
                        err_console.print(describe(e.event(local.alive())), soft_wrap=True,
                                          highlight=False)
                    if not local.alive():
                        raise PeripheryError("every local node has exited")
                    time.sleep(0.5)
            except KeyboardInterrupt:
                console.print("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _gather(peers: tuple[str, ...], mdns: bool, timeout: float, interfaces: tuple[str, ...],
            want: int | None = None) -> list[NodeAddress]:
    """Static peers, then nodes found over mDNS: all found within `timeout`, or as soon as
    `want` nodes are known in all."""
    from periphery_core.discovery.combined import discovery_for

    discovery = discovery_for(peers, mdns=mdns, interfaces=interfaces)
    discovery.start()
    try:
        return discovery.wait_for(want, timeout)
    finally:
        discovery.stop()


peer_option = click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
                           help="A node by address, for networks without multicast (repeatable).")


def keys_options(fn: F) -> F:
    fn = click.option("--insecure", is_flag=True,
                      help="Talk to nodes without authentication or encryption.")(fn)
    return click.option("--keys", type=click.Path(path_type=Path), default=None,
                        help="This master's key folder from 'periphery keys init' (default: "
                             "$PERIPHERY_KEYS, else keys/ in the config folder: "
                             "$PERIPHERY_CONFIG_DIR or ~/.config/periphery).")(fn)


@cli.group()
def keys() -> None:
    """Create the cluster's CurveZMQ keys."""


@keys.command("init")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--master", "masters", multiple=True, required=True,
              help="A master host: may deploy to and control the nodes (repeatable).")
@click.option("--node", "nodes", multiple=True, required=True,
              help="A node host: may only send activations to other nodes and results to "
                   "masters (repeatable).")
@handle_errors
def keys_init(folder: Path, masters: tuple[str, ...], nodes: tuple[str, ...]) -> None:
    """Write one key folder per host into FOLDER, trusting the others by role.

    Copy FOLDER/<host> to each host and pass it with --keys (or set PERIPHERY_KEYS). Each
    secret key is readable by its owner only; keep it so.
    """
    from periphery_core.cluster.keys import init_cluster_keys

    for path in init_cluster_keys(folder, masters, nodes):
        click.echo(f"wrote {path}  (secret: {path / (path.name + '.key_secret')})")


@cluster.command("ls")
@peer_option
@click.option("--mdns/--no-mdns", default=True, show_default=True, help="Browse mDNS.")
@click.option("--mdns-interface", "interfaces", multiple=True,
              help="Browse only on these interface addresses.")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to browse.")
@click.option("--write-devices", type=click.Path(path_type=Path), default=None,
              help="Write the nodes' measured speed, memory and link as a devices file for "
                   "'periphery plan --devices'.")
@keys_options
@json_option
@handle_errors
def cluster_ls(peers: tuple[str, ...], mdns: bool, interfaces: tuple[str, ...], timeout: float,
               write_devices: Path | None, keys: Path | None, insecure: bool,
               as_json: bool) -> None:
    """List nodes (mDNS and --peer) with device, speed and link figures."""
    from periphery_core.cli.render import print_json, render_nodes
    from periphery_core.cluster.keys import keyring_or_insecure
    from periphery_core.cluster.master import Master

    ring = keyring_or_insecure(keys, insecure)
    addresses = _gather(peers, mdns, timeout, interfaces)
    rows: list[dict[str, Any]] = []
    with Master(keys=ring) as master:
        for a in addresses:
            try:
                h = master.connect(a)
            except PeripheryError as exc:  # unreachable, or a key not trusted: list, go on
                rows.append({"address": f"{a.host}:{a.port}", "error": exc.message})
                continue
            rows.append({"name": h.name, "id": h.node_id, "address": f"{a.host}:{a.port}",
                         "source": a.source, "device": h.device, "cores": h.cores,
                         "workers": h.workers, "memory": h.memory, "speed": h.speed,
                         "rtt_s": h.rtt_s, "bandwidth": h.bandwidth})
        if write_devices is not None:
            _write_devices(write_devices, master.devices())
    if as_json:
        print_json(rows)
        return
    render_nodes(rows)


def _write_devices(path: Path, devices: list) -> None:
    import json

    import tomli_w

    table = {"device": [
        {"name": d.name, "speed": round(d.speed, 3), "bandwidth": float(d.bandwidth),
         **({"memory": d.memory_bytes} if d.memory_bytes else {}),
         **({"workers": d.workers} if d.workers != 1 else {})} for d in devices]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(table) if path.suffix.lower() == ".toml"
                    else json.dumps(table, indent=1) + "\n")


def connect_nodes(master: Any, cluster_ctx: Any, peers: tuple[str, ...], mdns: bool, k: int,
                  names: Sequence[str] = ()) -> list[Any]:
    """Connect K nodes for the stages: the local cluster's, then --peer, then mDNS; in the
    order of `names` (a plan's devices) when every one is found."""
    from periphery_core.cli.render import err_console

    addresses = list(cluster_ctx.addresses) if cluster_ctx else []
    if len(addresses) < k:
        addresses += _gather(peers, mdns and len(peers) < k, 2.0, (), want=k - len(addresses))
    handles: list[Any] = []
    for a in addresses:
        if len(handles) == k:
            break
        try:
            handles.append(master.connect(a))
        except PeripheryError as exc:  # one bad candidate must not end the run
            err_console.print(f"skipping node {a.host}:{a.port}: {exc.message}",
                              soft_wrap=True)
    if len(handles) < k:
        raise PeripheryError(
            f"the plan needs {k} nodes but {len(handles)} nodes were found: start "
            "nodes with 'periphery-node', pass --peer HOST:PORT, or use --local")
    by_name = {h.name: h for h in handles}
    if names and all(n in by_name for n in names):  # the plan's devices first, in its order
        return [by_name[n] for n in names] + [h for h in handles if h.name not in names]
    return handles
