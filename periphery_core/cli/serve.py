"""`periphery serve`: a language model on the cluster behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from periphery_core.cli.cluster import keys_options, peer_option
from periphery_core.cli.common import cli, handle_errors
from periphery_core.cli.generate import deployed_decoder
from periphery_core.errors import PeripheryError


def _server(config: Any) -> Any:
    """uvicorn's server, without its signal handling (which raises the signal again once it
    has shut down): `serve` stops it itself, then stops the nodes it started."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="A plan file for the model (default: plan --shards K stages).")
@click.option("--shards", "-k", type=int, default=None, help="Stages to plan (default 2).")
@peer_option
@click.option("--local", is_flag=True, help="Start one local node process per stage.")
@click.option("--mdns/--no-mdns", default=True, show_default=True,
              help="Find nodes over mDNS when --peer and --local give too few.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback needs --api-key).")
@click.option("--port", default=8000, show_default=True, help="Port (0: any free one).")
@click.option("--api-key", default=None, envvar="PERIPHERY_API_KEY",
              help="Every request must send 'Authorization: Bearer KEY' (or set "
                   "$PERIPHERY_API_KEY).")
@click.option("--insecure-http", is_flag=True,
              help="Listen on a non-loopback address without an API key.")
@click.option("--max-concurrent", default=8, show_default=True,
              help="Sequences generating at once; more get HTTP 429.")
@click.option("--name", default=None, help="The model's name for clients (default: its "
                                           "folder's).")
@click.option("--optimize/--exact", default=True, show_default=True,
              help="Graph optimizations on the nodes (fast), or off (bit-exact).")
@keys_options
@handle_errors
def serve(model: Path, plan_path: Path | None, shards: int | None, peers: tuple[str, ...],
          local: bool, mdns: bool, host: str, port: int, api_key: str | None,
          insecure_http: bool, max_concurrent: int, name: str | None, optimize: bool,
          keys: Path | None, insecure: bool) -> None:
    """Serve a model over HTTP. A language model: POST /v1/chat/completions and
    /v1/completions (streamed or not); point an OpenAI client's base_url at
    http://HOST:PORT/v1. Any other model: POST /v1/infer with named tensors (JSON, or msgpack
    for large ones). Both: GET /v1/models, /health and /metrics."""
    import uvicorn

    from periphery_core.cli.render import err_console
    from periphery_core.generate.decoder import recognize
    from periphery_core.generate.service import TextService
    from periphery_core.model import load_model
    from periphery_core.serve.http import build_app
    from periphery_core.serve.tensors import TensorService

    if not _loopback(host) and not api_key and not insecure_http:
        raise PeripheryError(f"--host {host} lets anyone on the network generate: give "
                             "--api-key KEY (or --insecure-http to serve without one)")
    if api_key is not None and len(api_key) < 8:
        raise PeripheryError("--api-key: use at least 8 characters")
    if max_concurrent < 1:
        raise PeripheryError("--max-concurrent must be at least 1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)  # clients told the address queue until the server accepts them
    except OSError as exc:  # taken, or not an address of this machine
        sock.close()
        raise PeripheryError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") \
            from None
    loaded = load_model(model)
    spec = recognize(loaded)
    label = name or (loaded.path.parent.name if loaded.path.name == "model.onnx"
                     else loaded.path.stem)
    with deployed_decoder(loaded, spec, plan_path, shards, peers, local, mdns, optimize, keys,
                          insecure) as (pipeline, k):
        service: TextService | TensorService = (
            TextService(pipeline, spec, label, max_concurrent=max_concurrent)
            if spec is not None else
            TensorService(pipeline, loaded, label, max_concurrent=max_concurrent))
        try:
            app = build_app(service, api_key)
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
            what = (f"{spec.describe()}; point an OpenAI client's base_url there"
                    if spec is not None else "POST /v1/infer takes its inputs by name")
            err_console.print(
                f"serving {label} over {k} stages at http://{shown}:{bound[1]}/v1 ({what})"
                + ("" if api_key else "; no API key"), highlight=False)
            config = uvicorn.Config(app, log_level=os.environ.get("PERIPHERY_HTTP_LOG",
                                                                  "warning"),
                                    timeout_graceful_shutdown=5)
            server = _server(config)

            def stop(signum: int, frame: object) -> None:  # Ctrl-C or a TERM: finish up
                server.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT,
                                                                   signal.SIGTERM)}
            try:
                server.run(sockets=[sock])
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            err_console.print("stopped", highlight=False)
        finally:
            service.close()
            sock.close()
