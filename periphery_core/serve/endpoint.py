"""One HTTP endpoint serving a deployed model, running in a thread: what `periphery serve` and
the app's Cluster screen (`s`) start.

`listen` checks the address (loopback unless there is an API key or the caller says
otherwise) and binds and listens at once, so the address it reports takes connections from
then on; `start` runs uvicorn in a thread, `stop` shuts it down. The service (a `TextService`
or a `TensorService`) is the caller's to close.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any

from periphery_core.errors import PeripheryError
from periphery_core.generate.decoder import DecoderSpec
from periphery_core.generate.service import TextService
from periphery_core.model.loading import LoadedModel
from periphery_core.serve.http import build_app
from periphery_core.serve.tensors import TensorService


def service_for(pipeline: Any, loaded: LoadedModel, decoder: DecoderSpec | None,
                max_concurrent: int = 8, name: str | None = None) -> TextService | TensorService:
    """What an endpoint serves for a deployed model: a language model's text, or any other
    model's tensors; named for clients by `name`, else by its file (its folder's, for a
    generic `model.onnx`)."""
    path = loaded.path
    name = name or (path.parent.name if path.name == "model.onnx" else path.stem)
    if decoder is not None:
        return TextService(pipeline, decoder, name, max_concurrent=max_concurrent)
    return TensorService(pipeline, loaded, name, max_concurrent=max_concurrent)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
           insecure_http: bool = False) -> socket.socket:
    """A listening socket for an endpoint (port 0: any free one).

    Raises:
        PeripheryError: a non-loopback address without a key, a short key, or an address that
            cannot be bound; one line each.
    """
    if not is_loopback(host) and not api_key and not insecure_http:
        raise PeripheryError(f"--host {host} lets anyone on the network in: give "
                             "--api-key KEY (or --insecure-http to serve without one)")
    if api_key is not None and len(api_key) < 8:
        raise PeripheryError("--api-key: use at least 8 characters")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said, not left 0: asyncio turns Nagle's algorithm off only on sockets that
    # say so, and with it on, a reply's second write waited for the client's delayed ACK:
    # every request after the first on a kept-alive connection took 44 ms more.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (accepted sockets inherit it)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)  # clients told the address queue until the server accepts them
    except OSError as exc:  # taken, or not an address of this machine
        sock.close()
        raise PeripheryError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") \
            from None
    return sock


class Endpoint:
    """`service` over HTTP at `host:port` (see the module docstring)."""

    def __init__(self, service: TextService | TensorService, sock: socket.socket,
                 api_key: str | None) -> None:
        self.service = service
        self.api_key = api_key
        self._sock = sock
        self.app = build_app(service, api_key)
        self.metrics = self.app.state.metrics
        self._server: Any = None
        self._thread: threading.Thread | None = None
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    @classmethod
    def open(cls, service: TextService | TensorService, host: str = "127.0.0.1",
             port: int = 8000, api_key: str | None = None,
             insecure_http: bool = False) -> Endpoint:
        """`listen`, then serve `service` there once started."""
        return cls(service, listen(host, port, api_key, insecure_http), api_key)

    def start(self) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            # No signal handling of its own (it may run in a thread, and the caller decides
            # when to stop: `stop`).
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5,
                                lifespan="on")
        self._server = Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="http-endpoint")
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def requests(self) -> int:
        """HTTP requests answered so far."""
        return sum(self.metrics.http.values())

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        self._sock.close()
