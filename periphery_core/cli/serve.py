"""`periphery serve`: a model on the cluster behind an HTTP endpoint (OpenAI-compatible for a
language model, named tensors at /v1/infer for any other)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from periphery_core.cli.cluster import keys_options
from periphery_core.cli.common import cli, handle_errors
from periphery_core.cli.deploy import deploy_options, deployed, where_to_run
from periphery_core.cli.generate import shape_words
from periphery_core.errors import PeripheryError


@cli.command()
@deploy_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (another than loopback needs --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free one).")
@click.option("--api-key", default=None, envvar="PERIPHERY_API_KEY",
              help="Every request must send 'Authorization: Bearer KEY' (or set "
                   "$PERIPHERY_API_KEY).")
@click.option("--insecure-http", is_flag=True,
              help="Listen on a non-loopback address without an API key (--insecure, which "
                   "also drops the nodes' keys, allows it too).")
@click.option("--max-concurrent", default=8, show_default=True,
              help="Requests running at once (sequences, for a language model); more get "
                   "HTTP 429.")
@click.option("--name", default=None, help="The model's name for clients (default: its "
                                           "folder's).")
@click.option("--optimize/--exact", default=True, show_default=True,
              help="Graph optimizations on the nodes (fast), or off (bit-exact).")
@keys_options
@handle_errors
def serve(model: Path, plan_path: Path | None, nodes: int | None, shards: int | None,
          replicas: int | None,
          peers: tuple[str, ...],
          local: bool, device: str, mdns: bool, host: str, port: int, api_key: str | None,
          insecure_http: bool, max_concurrent: int, name: str | None, optimize: bool,
          keys: Path | None, insecure: bool) -> None:
    """Serve a model over HTTP. A language model: POST /v1/chat/completions and
    /v1/completions (streamed or not); point an OpenAI client's base_url at
    http://HOST:PORT/v1. Any other model: POST /v1/infer with named tensors (JSON, or msgpack
    for large ones). Both: GET /v1/models, /health and /metrics."""
    from periphery_core.cli.render import err_console
    from periphery_core.generate.decoder import recognize
    from periphery_core.model import load_model
    from periphery_core.serve.endpoint import Endpoint, listen, service_for

    if max_concurrent < 1:
        raise PeripheryError("--max-concurrent must be at least 1")
    # before any deploy: fail fast. --insecure (no keys anywhere) lets HTTP go without one too
    sock = listen(host, port, api_key, insecure_http or insecure)
    loaded = load_model(model)
    spec = recognize(loaded)
    where = where_to_run(loaded, plan_path, shards, replicas, nodes,
                         peers=() if local else peers)
    with deployed(loaded, spec, where, peers, local, mdns, optimize, keys, insecure,
                  device) as pipeline:
        service = service_for(pipeline, loaded, spec, max_concurrent, name)
        try:
            endpoint = Endpoint(service, sock, api_key)
            what = (f"{spec.describe()}; point an OpenAI client's base_url there"
                    if spec is not None else "POST /v1/infer takes its inputs by name")
            err_console.print(f"serving {service.name} over {shape_words(pipeline.plan)} at "
                              f"{endpoint.url} ({what})" + ("" if api_key else "; no API key"),
                              highlight=False)
            # Ctrl-C or a TERM: finish up. The handler takes no lock: it runs in this thread
            # between two bytecodes, and an Event.set there deadlocked once against this
            # thread's own Event.wait, which held the same lock when the signal came.
            stopping: list[int] = []

            def stop(signum: int, frame: object) -> None:
                stopping.append(signum)

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT,
                                                                   signal.SIGTERM)}
            try:
                endpoint.start()
                while not stopping and endpoint.running:
                    time.sleep(0.2)
            finally:
                endpoint.stop()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            err_console.print("stopped", highlight=False)
        finally:
            service.close()
            sock.close()
