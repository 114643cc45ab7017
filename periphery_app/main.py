"""`periphery-app [MODEL] [--demo]`: the entry point of the Textual app."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo-resnet.onnx"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name (None: `sys.argv[1:]`).

    Returns:
        The parsed options: `model`, `demo`, `nodes`, `keys`, `insecure`, `device`.
    """
    parser = argparse.ArgumentParser(
        prog="periphery-app",
        description="Split an ONNX model into shards and run them as a pipeline, from a "
                    "terminal UI. Screens: 1 Model, 2 Graph, 3 Shards, 4 Cluster, 5 Dashboard, "
                    "6 Quantize; "
                    "? lists the keys.")
    parser.add_argument("model", nargs="?", type=Path, help="an .onnx model to open")
    parser.add_argument("--demo", action="store_true",
                        help="start local nodes, load the demo model (or MODEL), plan, deploy "
                             "and stream requests: the whole loop in one command")
    parser.add_argument("--nodes", type=int, default=3,
                        help="local nodes (and stages) for --demo (default: 3)")
    parser.add_argument("--keys", type=Path, default=None, metavar="DIR",
                        help="the master's key folder from 'periphery keys init', for nodes "
                             "added by address (default: $PERIPHERY_KEYS, else keys/ in the config "
                             "folder: $PERIPHERY_CONFIG_DIR or ~/.config/periphery); local "
                             "nodes get fresh keys")
    parser.add_argument("--insecure", action="store_true",
                        help="talk to nodes without keys (only on a network you trust)")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                        help="what the local nodes run their stages on (default: cpu)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    from periphery_core.errors import PeripheryError
    from periphery_core.runtime.gpu import parse_device

    try:
        parse_device(args.device)
    except PeripheryError as exc:
        parser.error(exc.message)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; returns the process exit code."""
    args = parse_args(argv)
    from periphery_app.app import PeripheryApp

    model = args.model
    if args.demo and model is None:
        model = DEMO_MODEL
    app = PeripheryApp(model, demo=args.demo, demo_nodes=args.nodes, keys_dir=args.keys,
                       insecure=args.insecure, device=args.device)
    try:
        app.run()
    finally:
        app.control.close()  # however the app ended, no node process outlives it
    return 0


if __name__ == "__main__":
    sys.exit(main())
