"""Every error the server answers, in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

The one table from failure to status: a malformed or impossible request is 400 naming the field, a wrong
key 401, an unknown model 404, a full queue 429 (with Retry-After), a stopped scheduler 503, a bug 500.
Nothing a client sends crashes the server: the catch-all answers 500 and serving goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from m2rl.agent.format import RenderError
from m2rl.model.serving.request import InvalidRequest, Overloaded, SchedulerClosed
from m2rl.model.serving.weights import WeightUpdateError

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}
RETRY_AFTER_S = "1"


class ApiError(Exception):
    """An error answered with `status` and a body naming `param`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_content(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_content(status, message, param), status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages.0.role"; the union branch pydantic tried is dropped."""
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)]
    return ".".join(p for p in parts if p not in ("str", "int") and not p.startswith(("list[", "function-")))


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    fields = list(dict.fromkeys(_field(tuple(e.get("loc", ()))) for e in errors))
    problems = list(dict.fromkeys(f"{_field(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', 'invalid')}"
                                  for e in errors))
    return "invalid request: " + "; ".join(problems[:5]), (fields[0] or None) if fields else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(InvalidRequest)
    async def _impossible(request: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(RenderError)
    async def _unrenderable(request: Request, exc: RenderError) -> JSONResponse:
        return error_response(400, f"messages cannot be rendered: {exc}", "messages")

    @app.exception_handler(WeightUpdateError)
    async def _bad_weights(request: Request, exc: WeightUpdateError) -> JSONResponse:
        return error_response(400, f"weight update refused, the served weights are unchanged: {exc}", "path")

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error_response(429, f"server overloaded: {exc}; retry later", headers={"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(SchedulerClosed)
    async def _closed(request: Request, exc: SchedulerClosed) -> JSONResponse:
        return error_response(503, f"server unavailable: {exc}", headers={"Retry-After": RETRY_AFTER_S})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
