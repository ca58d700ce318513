"""Legion's HTTP plumbing without Ray: error responses in OpenAI's shape, the exception
handlers, the request-log middleware, and the one server-sent-events writer that both
streaming routes use. ``serve_app`` assembles them into the app.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from legion import metrics
from legion.arbitration.arbiter import Event
from legion.errors import ErrorCode, InternalError, LegionError, NotReady
from legion.logging_setup import log_context, valid_request_id
from legion.messages import Candidate, TaskResult
from legion.service.api import ChatChunks, candidate_response, sse_event, task_response
from legion.service.responses import ResponsesEvents
from legion.service.tools import ToolDef
from legion.streaming import relay

log = logging.getLogger("legion.serve")


def error_response(
    status: int, code: str, message: str, details: dict | None = None, headers: dict | None = None
) -> JSONResponse:
    # OpenAI's error shape, so the official client surfaces ``message``.
    body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def legion_response(exc: LegionError) -> JSONResponse:
    """The HTTP response of a ``LegionError``: its status, Retry-After and WWW-Authenticate."""
    headers = {}
    if "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    if exc.code == ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.http_status, exc.code.value, exc.message, exc.details, headers)


def retry_shortly(message: str) -> JSONResponse:
    """503 with Retry-After: a part that comes back by itself is unavailable right now."""
    return legion_response(NotReady(message, details={"retry_after_s": 5}))


def add_error_handlers(api: FastAPI) -> None:
    """Every error in Legion's shape: ours, FastAPI's own, and a broken SQLite store."""

    @api.exception_handler(LegionError)
    async def _legion_error(_: Request, exc: LegionError) -> JSONResponse:
        return legion_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # An unreadable body, an unknown route, a wrong method.
        messages = {
            400: "the request body could not be read: send UTF-8 JSON",
            404: f"no route {request.url.path}: see /docs for the API",
            405: f"{request.method} is not allowed on {request.url.path}: see /docs for the API",
        }
        code = {400: "invalid_json", 404: ErrorCode.NOT_FOUND.value}.get(exc.status_code, "invalid_request")
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, code, message, headers=exc.headers)

    @api.exception_handler(sqlite3.Error)
    async def _store_unavailable(_: Request, exc: sqlite3.Error) -> JSONResponse:
        # A route that reads a SQLite store (sessions, cache stats) while its file is broken or locked.
        log.error("SQLite store unavailable: %s", exc)
        return retry_shortly("Legion's state store is unavailable right now; retry shortly")

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        lines = []
        for e in errors:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            lines.append(f"{loc}: {e.get('msg')}")
        return error_response(422, ErrorCode.INVALID_REQUEST.value, "; ".join(lines), {"errors": lines})


class RequestLog:
    """Tag everything logged for a request with its id and route; log and count its status.

    The id is the client's ``X-Request-Id`` if it sent a valid one, else the one Serve's proxy
    generated; the proxy returns it in the response's ``X-Request-Id`` header. A plain ASGI
    middleware (Starlette's ``BaseHTTPMiddleware`` runs every request through a task group and
    a response stream, which cost a millisecond or more per request here). The latency logged
    and observed is the time to the response's start, as the client sees its headers.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        rid = rid or uuid.uuid4().hex
        if not valid_request_id(rid):
            response = error_response(
                400,
                ErrorCode.INVALID_REQUEST.value,
                "X-Request-Id must be 1-128 characters of letters, digits and . _ : = / + -; "
                "send a different one or none (the server then makes one)",
            )
            await response(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                ms = round((time.perf_counter() - t0) * 1000, 2)
                # The route's template (not the raw path), so session ids do not become labels.
                route = getattr(scope.get("route"), "path", "unmatched")
                metrics.request_done(route, status, ms / 1000)
                log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"status": status, "latency_ms": ms},
                )
            await send(message)

        with log_context(request_id=rid, route=scope["path"]):
            await self.app(scope, receive, send_logged)


class TaskEvents:
    """``/v1/tasks`` as server-sent events: ``candidate`` (each fan-out answer as it arrives; its
    ``group`` is the answer's own key then, before equivalent answers are joined), ``trace``
    (every other step), ``result`` (the JSON of ``/v1/tasks``, with the final groups), then
    ``done``; a failure is an ``error`` event (``{"error": {"code", "message"}}``) before ``done``."""

    def start(self) -> list[str]:
        return []

    def event(self, item: Event) -> str | None:
        if isinstance(item, Candidate):
            return sse_event("candidate", candidate_response(item))
        return sse_event("trace", item)

    def result(self, result: TaskResult) -> list[str]:
        return [sse_event("result", task_response(result))]

    def error(self, exc: LegionError) -> str:
        return sse_event("error", {"error": exc.to_dict()})

    def done(self) -> str:
        return sse_event("done", {})


class ChatEvents:
    """``/v1/chat/completions`` as OpenAI's ``data:`` chunks: the role first, each candidate as
    it arrives, the answer at the end, then ``[DONE]``; a failure is a ``data: {"error"}``
    chunk before ``[DONE]``."""

    def __init__(self, chat_id: str, model: str, tools: list[ToolDef] | None = None):
        self._chunks = ChatChunks(chat_id, model, tools)

    @staticmethod
    def _data(chunk) -> str:
        return f"data: {chunk.model_dump_json()}\n\n"

    def start(self) -> list[str]:
        return [self._data(self._chunks.start())]

    def event(self, item: Event) -> str | None:
        return self._data(self._chunks.candidate(item)) if isinstance(item, Candidate) else None

    def result(self, result: TaskResult) -> list[str]:
        return [self._data(c) for c in self._chunks.answer(result)]

    def error(self, exc: LegionError) -> str:
        return f"data: {json.dumps({'error': exc.to_dict()})}\n\n"

    def done(self) -> str:
        return "data: [DONE]\n\n"


async def write_events(
    run: Callable[[Callable[[Event], None]], Awaitable[TaskResult]],
    events: TaskEvents | ChatEvents | ResponsesEvents,
    failure: Callable[[Exception], LegionError] | None = None,
) -> AsyncIterator[str]:
    """The one SSE writer: ``run(emit)``'s events as they happen, then its result, then the
    end; an error at any point (the stream has started: a status can no longer be sent)
    becomes an error event before the end. ``failure`` names a non-Legion error."""
    for chunk in events.start():
        yield chunk
    try:
        async with aclosing(relay(run)) as items:  # a client gone mid-stream cancels the work
            async for item in items:
                if isinstance(item, TaskResult):
                    for chunk in events.result(item):
                        yield chunk
                elif (chunk := events.event(item)) is not None:
                    yield chunk
    except LegionError as exc:
        yield events.error(exc)
    except Exception as exc:
        yield events.error(failure(exc) if failure is not None else internal_failure(exc))
    yield events.done()


def internal_failure(exc: Exception) -> LegionError:
    log.error("streamed task failed", exc_info=exc)
    return InternalError("the task failed inside Legion; retry it")
