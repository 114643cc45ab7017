"""The OpenAI-compatible HTTP face of a `TextService` or a `TensorService` (Starlette; uvicorn
runs it).

Routes: for a language model `POST /v1/chat/completions` and `POST /v1/completions` (with
`"stream": true` as server-sent events, ending `data: [DONE]`); for any other model `POST
/v1/infer` (serve.tensors); for both `GET /v1/models`, `GET /health`, `GET /metrics`.

- With an API key, every request carries `Authorization: Bearer KEY` (compared in constant
  time), else 401.
- A body over `MAX_BODY` bytes is 413, one that is not JSON or not a valid request is 400 with
  where it is wrong, a request beyond the concurrency limit is 429; errors have the OpenAI shape
  (`{"error": {"message", "type", "code"}}`).
- Generation runs in a worker thread; a client that goes away mid-request cancels its sequence
  at the next step, and the sequence's caches are freed on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from periphery_core.errors import ClusterBusy, PeripheryError
from periphery_core.generate.engine import Generation, Sampling
from periphery_core.generate.service import TextService
from periphery_core.progress import CancelToken
from periphery_core.serve.metrics import ServeMetrics
from periphery_core.serve.schema import ChatRequest, CompletionRequest, first_error
from periphery_core.serve.tensors import MSGPACK, TensorService, decode_request, encode_reply

MAX_BODY = 1 << 20
MAX_INFER_BODY = 256 << 20  # tensors: msgpack carries them raw
log = logging.getLogger(__name__)


class _Refused(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status)


def _finish(result: Generation) -> str:
    return "length" if result.finish == "length" else "stop"


def build_app(service: TextService | TensorService, api_key: str | None = None) -> Starlette:
    """The ASGI app serving `service`."""
    text = service if isinstance(service, TextService) else None
    metrics = ServeMetrics(service)
    pool = ThreadPoolExecutor(max_workers=service.max_concurrent + 2,
                              thread_name_prefix="serve")

    def authorised(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return hmac.compare_digest(token.strip().encode(), api_key.encode()) \
            and scheme.lower() == "bearer"

    def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                if not authorised(request):
                    raise _Refused(401, "a valid API key is needed: send Authorization: "
                                        "Bearer KEY", "invalid_request_error",
                                   "invalid_api_key")
                response: Response = await handler(request)
            except _Refused as exc:
                response = _error(exc.status, exc.message, exc.kind, exc.code)
            except Exception as exc:  # a bug, not the client's doing: say what, keep serving
                log.exception("%s failed", request.url.path)
                response = _error(500, f"the server failed: {type(exc).__name__}",
                                  "server_error")
            metrics.count(request.url.path, response.status_code)
            return response

        return endpoint

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Refused(413, f"the body is over {limit} bytes", "invalid_request_error")
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise _Refused(413, f"the body is over {limit} bytes",
                                   "invalid_request_error")
        except ClientDisconnect:
            raise _Refused(400, "the client went away", "invalid_request_error") from None
        return bytes(data)

    async def body_of(request: Request, model: type[Any]) -> Any:
        data = await read_body(request, MAX_BODY)
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refused(400, f"the body is not JSON: {exc}", "invalid_request_error") \
                from None
        try:
            return model.model_validate(parsed)
        except ValidationError as exc:
            raise _Refused(400, first_error(exc), "invalid_request_error") from None

    def prepared(ids: list[int], sampling: Sampling) -> None:
        try:
            assert text is not None
            text.check(ids, sampling)
        except PeripheryError as exc:
            raise _Refused(400, exc.message, "invalid_request_error") from None

    def in_slot(work: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `work` in a worker thread holding one of the service's slots: taken now, so that
        a full server answers 429 before anything starts, and given back when `work` ends."""
        try:
            service.take_slot()
        except ClusterBusy as exc:
            raise _Refused(429, exc.message, "rate_limit_exceeded", "busy") from None

        def held() -> Any:
            try:
                return work()
            finally:
                service.give_back()

        return asyncio.get_running_loop().run_in_executor(pool, held)

    def chunk_id(kind: str) -> str:
        return f"{kind}-{uuid.uuid4().hex[:24]}"

    async def stream(request: Request, ids: list[int], sampling: Sampling,
                     shape: Callable[[str | None, str | None], dict[str, Any]]) -> Response:
        """Server-sent events: one chunk per piece of text, then the finish, then [DONE]."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = CancelToken()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            assert text is not None
            try:
                result = text.generate(ids, sampling, on_text=lambda t: put("text", t),
                                       cancel=cancel)
            except BaseException as exc:  # the client hears why, in the stream
                put("error", exc)
            else:
                put("done", result)

        in_slot(work)

        async def events() -> AsyncIterator[str]:
            try:
                yield f"data: {json.dumps(shape(None, None))}\n\n"
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield f"data: {json.dumps(shape(value, None))}\n\n"
                    elif kind == "done":
                        yield f"data: {json.dumps(shape(None, _finish(value)))}\n\n"
                        break
                    else:
                        message = value.message if isinstance(value, PeripheryError) \
                            else f"generation failed: {type(value).__name__}"
                        yield "data: " + json.dumps({"error": {
                            "message": message, "type": "server_error", "param": None,
                            "code": None}}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancel.cancel()  # a client gone mid-stream: the sequence stops, caches freed

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def complete(request: Request, ids: list[int], sampling: Sampling) -> Generation:
        """Generate without streaming; a client that goes away cancels the sequence."""
        assert text is not None
        cancel = CancelToken()
        task = in_slot(lambda: text.generate(ids, sampling, cancel=cancel))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                cancel.cancel()
        try:
            return task.result()
        except PeripheryError as exc:
            raise _Refused(500, exc.message, "server_error") from None

    async def chat_completions(request: Request) -> Response:
        assert text is not None
        body: ChatRequest = await body_of(request, ChatRequest)
        try:
            ids = text.chat_ids(body.conversation())
        except PeripheryError as exc:
            raise _Refused(400, exc.message, "invalid_request_error") from None
        sampling = body.sampling()
        prepared(ids, sampling)
        created, cid = int(time.time()), chunk_id("chatcmpl")
        if body.stream:
            def shape(text: str | None, finish: str | None) -> dict[str, Any]:
                delta: dict[str, Any] = {}
                if text is None and finish is None:
                    delta = {"role": "assistant", "content": ""}
                elif text is not None:
                    delta = {"content": text}
                return {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": service.name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return await stream(request, ids, sampling, shape)
        result = await complete(request, ids, sampling)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": service.name,
            "choices": [{"index": 0, "finish_reason": _finish(result),
                         "message": {"role": "assistant", "content": result.text}}],
            "usage": _usage(result)})

    async def completions(request: Request) -> Response:
        assert text is not None
        body: CompletionRequest = await body_of(request, CompletionRequest)
        ids = text.text_ids(body.text())
        sampling = body.sampling()
        prepared(ids, sampling)
        created, cid = int(time.time()), chunk_id("cmpl")
        if body.stream:
            def shape(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"id": cid, "object": "text_completion", "created": created,
                        "model": service.name,
                        "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                     "finish_reason": finish}]}

            return await stream(request, ids, sampling, shape)
        result = await complete(request, ids, sampling)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": service.name,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": _finish(result)}],
            "usage": _usage(result)})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": service.name, "object": "model", "created": 0, "owned_by": "periphery"}]})

    async def health(request: Request) -> Response:
        pipeline = service.pipeline
        ok = pipeline.deployed
        plan = pipeline.plan
        return JSONResponse({
            "status": "ok" if ok else "unavailable", "model": service.name,
            "stages": len(plan.stages) if plan is not None else 0,
            "in_flight": service.in_flight,
            "reason": pipeline.failed}, status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        assert isinstance(service, TensorService)
        data = await read_body(request, MAX_INFER_BODY)
        kind = request.headers.get("content-type", "application/json")
        try:
            feeds = decode_request(data, kind)
            service.check(feeds)
        except PeripheryError as exc:
            raise _Refused(400, exc.message, "invalid_request_error") from None
        try:
            outputs = await in_slot(lambda: service.infer(feeds))
        except PeripheryError as exc:  # a node failed on it: its one line
            raise _Refused(500, exc.message, "server_error") from None
        packed = MSGPACK in (kind + request.headers.get("accept", "")).lower()
        return Response(encode_reply(outputs, packed),
                        media_type=MSGPACK if packed else "application/json")

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        metrics.close()
        pool.shutdown(wait=False, cancel_futures=True)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _error(405, f"{request.method} is not served at {request.url.path}",
                          "invalid_request_error")
        what = ("/v1/chat/completions, /v1/completions" if text is not None else "/v1/infer")
        return _error(404, f"nothing at {request.url.path}: this server answers {what}, "
                           "/v1/models, /health and /metrics", "invalid_request_error")

    routes = [
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
        Route("/metrics", guarded(metrics_text), methods=["GET"]),
    ]
    if text is not None:
        routes += [Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
                   Route("/v1/completions", guarded(completions), methods=["POST"])]
    else:
        routes.append(Route("/v1/infer", guarded(infer), methods=["POST"]))
    app = Starlette(lifespan=lifespan, routes=routes,
                    exception_handlers={404: not_found, 405: not_found})
    app.state.metrics = metrics
    return app


def _usage(result: Generation) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens}
