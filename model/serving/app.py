"""The FastAPI app of `m2rl serve`: OpenAI-compatible routes over one `Service`.

    POST /v1/completions        text or token-id prompts -> text, token ids, raw log-probs (SSE with stream)
    POST /v1/chat/completions   M2-rendered chat -> content, reasoning_content, tool_calls (SSE with stream)
    GET  /v1/models             the served model
    POST /v1/weights            {"path": checkpoint dir or .safetensors file, "version": int} -> new weights
    POST /v1/weights/upload, /init_collective, /collective_update, /ipc_update: weights pushed by the learner
                                (HTTP buckets, torch.distributed broadcast, CUDA IPC; weight_transfer.py)
    GET  /metrics               Prometheus text
    GET  /health                200 while the scheduler runs, else 503 (never needs the API key)

Every response carries the served weights' version in `X-Policy-Version`; generation bodies also carry
`policy_version` (the weights that sampled their first token). A client that disconnects, or closes a
stream, cancels its request: its rows of the running batch are freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from m2rl.model.serving import weight_transfer
from m2rl.model.serving.chat import ChatCompletion
from m2rl.model.serving.completions import Completion
from m2rl.model.serving.errors import error_response, install_error_handlers
from m2rl.model.serving.metrics import CONTENT_TYPE
from m2rl.model.serving.protocol import ChatCompletionRequest, CompletionRequest, WeightUpdateRequest
from m2rl.model.serving.service import Service
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Message, Receive, Scope, Send

VERSION_HEADER = "X-Policy-Version"
PUBLIC_PATHS = frozenset({"/health"})
ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/weights", "/metrics",
                       "/health", *weight_transfer.ENDPOINTS})
SSE_PING_S = 15  # a comment line on idle streams, so proxies do not time them out

T = TypeVar("T")


def build_app(service: Service, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.scheduler.start()
        try:
            yield
        finally:
            await service.scheduler.stop()

    app = FastAPI(title="m2rl serve", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    _add_routes(app, service)
    # Outermost first: the key is checked before anything else runs; every answer is counted.
    app.add_middleware(_Observe, service=service)
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.scheduler.running:
            return error_response(503, "the scheduler is not running")
        return JSONResponse({"status": "ok", "policy_version": service.policy_version})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "m2rl",
                "root": service.model_path or service.model_name,
                "max_model_len": service.scheduler.config.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        completion = Completion(service, body)
        if body.stream:
            # The background task frees the rows even if the stream never started (client gone at once).
            return EventSourceResponse(completion.chunks(), ping=SSE_PING_S, background=BackgroundTask(completion.cancel))
        answer = await _unless_disconnected(request, completion.response())
        return JSONResponse(answer.model_dump(exclude_none=True)) if answer is not None else Response(status_code=499)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        chat = ChatCompletion(service, body)
        if body.stream:
            return EventSourceResponse(chat.chunks(), ping=SSE_PING_S, background=BackgroundTask(chat.cancel))
        answer = await _unless_disconnected(request, chat.response())
        return JSONResponse(answer.model_dump(exclude_none=True)) if answer is not None else Response(status_code=499)

    @app.post("/v1/weights")
    async def weights(body: WeightUpdateRequest) -> dict[str, Any]:
        started = time.monotonic()
        try:
            version = await service.update_weights(body.path, body.version)
        except Exception:
            service.metrics.weight_updates.labels(result="refused").inc()
            raise
        service.metrics.weight_updates.labels(result="applied").inc()
        return {"policy_version": version, "path": body.path, "seconds": round(time.monotonic() - started, 4)}

    weight_transfer.add_weight_routes(app, service)


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` while the client stays connected; if it disconnects first, cancel the work (which cancels
    the request in the scheduler) and return None. The body was read already, so the next ASGI message is
    the disconnect."""
    task: asyncio.Task[T] = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (shutdown)
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(BaseException):  # the work's own ending no longer matters to anyone
        await task
    return None


class _RequireKey:
    """`Authorization: Bearer <key>` on every path but /health (401 otherwise), compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                          "authorization")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Observe:
    """Counts each request by endpoint and status, times it to its last byte, and stamps the policy version."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started, status = time.monotonic(), 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((VERSION_HEADER.lower().encode(), str(self.service.policy_version).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(endpoint=endpoint, status=str(status or 499)).inc()
            metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - started)

