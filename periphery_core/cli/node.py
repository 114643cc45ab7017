"""`periphery-node`: run a node daemon on this host.

Prints one line per event; the first stdout line, `periphery-node ready control=... data=...`,
tells a launcher (the local cluster) where the node listens.
"""

from __future__ import annotations

import logging
import platform
import signal
import sys
from pathlib import Path

import click

from periphery_core.cli.main import handle_errors, run_click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", default=None, help="Node name (default: this host's name).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the one other hosts reach this node at).")
@click.option("--port", default=5555, show_default=True, help="Control port (0: any free port).")
@click.option("--data-port", default=0, help="Activation port (default: any free port).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--threads", default=0, help="ONNX Runtime intra-op threads (0: its default).")
@click.option("--no-advertise", is_flag=True, help="Do not advertise over mDNS.")
@click.option("--mdns-interface", "mdns_interfaces", multiple=True,
              help="Advertise only on these interface addresses (repeatable).")
@click.option("--keys", type=click.Path(path_type=Path), default=None,
              help="This host's key folder from 'periphery keys init' (default: "
                   "$PERIPHERY_KEYS or ~/.config/periphery/keys).")
@click.option("--insecure", is_flag=True,
              help="Run without authentication or encryption (trusted networks only).")
@handle_errors
def node(name: str | None, host: str, port: int, data_port: int, device: str, threads: int,
         no_advertise: bool, mdns_interfaces: tuple[str, ...], keys: Path | None,
         insecure: bool) -> None:
    """Run a Periphery node: receive a shard, run it, stream activations to the next stage."""
    from periphery_core.cluster.keys import keyring_or_insecure
    from periphery_core.cluster.node import NodeConfig, NodeDaemon

    ring = keyring_or_insecure(keys, insecure)

    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        from periphery_core.errors import PeripheryError

        raise PeripheryError(f"device '{device}' is not cpu, cuda or cuda:N")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    daemon = NodeDaemon(NodeConfig(
        name=name or platform.node(), host=host, port=port, data_port=data_port,
        device=device, threads=threads, advertise=not no_advertise,
        mdns_interfaces=mdns_interfaces or None, keys=ring,
    ))
    try:
        daemon.start()
    except Exception as exc:  # most often: the port is taken
        from periphery_core.errors import PeripheryError

        raise PeripheryError(f"cannot listen on {host}:{port}: {exc}") from None

    def on_signal(signum: int, _frame: object) -> None:
        daemon._stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"periphery-node ready id={daemon.node_id} control={daemon.control_endpoint} "
          f"data={daemon.data_endpoint}", flush=True)
    try:
        daemon.serve_forever()
    finally:
        daemon.stop()


def main() -> None:
    run_click(node, "periphery-node")


if __name__ == "__main__":
    main()
