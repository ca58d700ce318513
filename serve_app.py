"""Legion's Ray Serve ingress: the native task API and the OpenAI-compatible API.

Routes are thin adapters over ``legion.api`` and the ``ArbiterActor``. ``build_app(config)``
is the one builder, used by ``serve run serve_app:app``, by ``deploy/serve_config.yaml`` and
by ``legion serve``. ``LegionError`` becomes an HTTP status here and nowhere else.
"""

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors import start_arbiter
from actors.remote import ArbiterClient
from actors.retriever import start_retriever
from legion import __version__, metrics
from legion.api import (
    ERROR_RESPONSES,
    ChatBody,
    DocumentsBody,
    TaskBody,
    candidate_response,
    chat_chunks,
    chat_request,
    chat_response,
    client_keeps_history,
    documents_request,
    model_ids,
    sse_event,
    task_request,
    task_response,
)
from legion.cache import ResultCache
from legion.config import LegionConfig, load_config
from legion.errors import (
    ErrorCode,
    InternalError,
    InvalidRequest,
    LegionError,
    NotFound,
    NotReady,
    StoreUnavailable,
)
from legion.guard import InjectionGuard
from legion.history import ConversationStore, Turn, check_session_id, history_budget_chars
from legion.logging_setup import configure_logging, current_request_id, log_context, valid_request_id
from legion.messages import Candidate, RetrievalInfo, Source, TaskRequest, TaskResult, TraceEvent
from legion.security import SecurityMiddleware, SecurityPolicy
from legion.vectorstore import quote_chunks, store_location

log = logging.getLogger("legion.serve")

api = FastAPI(
    title="Legion",
    version=__version__,
    description="Multi-agent LLM service: agents on llama.cpp in Ray actors, arbitrated answers.",
    responses=ERROR_RESPONSES,
)


def _error(
    status: int, code: str, message: str, details: dict | None = None, headers: dict | None = None
) -> JSONResponse:
    # OpenAI's error shape, so the official client surfaces ``message``.
    body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def _legion_response(exc: LegionError) -> JSONResponse:
    headers = {}
    if "retry_after_s" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after_s"])
    if exc.code == ErrorCode.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return _error(exc.http_status, exc.code.value, exc.message, exc.details, headers)


@api.exception_handler(LegionError)
async def _legion_error(_: Request, exc: LegionError) -> JSONResponse:
    return _legion_response(exc)


def _retry_shortly(message: str) -> JSONResponse:
    """503 with Retry-After: a part that comes back by itself is unavailable right now."""
    return _legion_response(NotReady(message, details={"retry_after_s": 5}))


@api.exception_handler(RayActorError)
async def _actor_unavailable(_: Request, exc: RayActorError) -> JSONResponse:
    # The Arbiter or a retriever restarting (they come back by themselves): a 503, never a 500.
    log.warning("actor unavailable: %s", type(exc).__name__)
    return _retry_shortly("a Legion actor is restarting; retry shortly")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own errors (an unreadable body, an unknown route, a wrong method) in Legion's shape.
    messages = {
        400: "the request body could not be read: send UTF-8 JSON",
        404: f"no route {request.url.path}: see /docs for the API",
        405: f"{request.method} is not allowed on {request.url.path}: see /docs for the API",
    }
    code = {400: "invalid_json", 404: ErrorCode.NOT_FOUND.value}.get(exc.status_code, "invalid_request")
    return _error(exc.status_code, code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)


def _openapi() -> dict:
    """FastAPI's schema, plus bearer authentication where this replica has API keys."""
    if api.openapi_schema is None:
        schema = get_openapi(
            title=api.title,
            version=api.version,
            description=api.description,
            routes=api.routes,
        )
        policy = _replica_security()
        if policy is not None and policy.keys.enabled:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key."}
            }
            schema["security"] = [{"bearerAuth": []}]
            for op in schema["paths"].get("/healthz", {}).values():
                op["security"] = []  # open, for load balancers
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


@api.exception_handler(sqlite3.Error)
async def _store_unavailable(_: Request, exc: sqlite3.Error) -> JSONResponse:
    # A route that reads a SQLite store (sessions, cache stats) while its file is broken or locked.
    log.error("SQLite store unavailable: %s", exc)
    return _retry_shortly("Legion's state store is unavailable right now; retry shortly")


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "invalid_json", "the request body is not valid JSON")
    lines = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        lines.append(f"{loc}: {e.get('msg')}")
    return _error(422, ErrorCode.INVALID_REQUEST.value, "; ".join(lines), {"errors": lines})


class _RequestLog:
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
            response = _error(
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


api.add_middleware(_RequestLog)


# The web console (legion/ui): static files that call the public API above; no build step.
UI_DIR = Path(__file__).resolve().parent / "legion" / "ui"


@api.get("/ui", include_in_schema=False)
async def _ui_index() -> RedirectResponse:
    return RedirectResponse("ui/")  # relative, so it holds under any route prefix


api.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")


def _replica_security() -> SecurityPolicy | None:
    # The policy of the replica serving the request, built from its config in its __init__.
    try:
        return getattr(serve.get_replica_context().servable_object, "security", None)
    except RayServeException:  # outside a replica: nothing to enforce
        return None


# Outermost: keys, scopes, rate and body limits, and the audit record of every request.
api.add_middleware(SecurityMiddleware, policy=_replica_security, error_response=_legion_response)


def _unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    return exc


@dataclass
class _Prepared:
    """A task after retrieval and the cache lookup, before (or instead of) the Arbiter."""

    req: TaskRequest
    cache: str = "bypass"  # the X-Legion-Cache header: hit, miss or bypass
    key: str | None = None
    hit: TaskResult | None = None
    sources: list[Source] = field(default_factory=list)
    retrieval: RetrievalInfo | None = None
    context: dict = field(default_factory=dict)  # what went into the agents' context, for the trace
    flags: list[dict] = field(default_factory=list)  # injection patterns found in the user's text
    t0: float = field(default_factory=time.perf_counter)


@serve.ingress(api)
class LegionIngress:
    """One HTTP replica; every replica shares the same named Arbiter and agent actors."""

    def __init__(self, config: dict):
        self.cfg = LegionConfig(**config)
        configure_logging(self.cfg.log_level, self.cfg.log_format)
        self.security = SecurityPolicy(self.cfg)  # applied by SecurityMiddleware
        self.guard = InjectionGuard(self.cfg.security.guard_patterns)
        self.arbiter = ArbiterClient(partial(start_arbiter, self.cfg), self.cfg.arbiter.restart_wait_s)
        # State lives outside the replica: SQLite files shared by every replica, one retriever actor.
        self.cache = ResultCache.from_config(self.cfg) if self.cfg.cache.enabled else None
        self._inflight: dict[str, asyncio.Future] = {}  # cache key -> the run answering it now
        self.history = ConversationStore.from_config(self.cfg) if self.cfg.history.enabled else None
        self._retriever = None
        if self.cfg.rag.enabled:  # load the embedding model before the first task needs it
            self._retriever_actor()

    async def _run(self, req, on_event: Callable[[Candidate | TraceEvent], None] | None = None):
        """The Arbiter's answer; with ``on_event``, its candidates and trace events as they happen."""
        req.request_id = req.request_id or current_request_id()  # on to the Arbiter and the agents
        req.timeout_s = req.timeout_s or self.cfg.serve.request_timeout_s
        return await self.arbiter.run(req, on_event)

    def _retriever_actor(self):
        if self._retriever is None:
            self._retriever = start_retriever(self.cfg, store_location(self.cfg))
        return self._retriever

    async def _retrieve(self, query: str, collection: str) -> tuple[str, list[Source], RetrievalInfo]:
        """Quoted chunks for the agents, their sources, and whether retrieval worked (never raises)."""
        limit = self.cfg.rag.timeout_s
        try:
            got = await asyncio.wait_for(self._retriever_actor().search.remote(query, collection), limit)
        except TimeoutError:
            reason = f"retrieval took longer than rag.timeout_s={limit}s"
            return "", [], RetrievalInfo(used=False, collection=collection, reason=reason)
        except (RayActorError, RayTaskError) as exc:
            reason = f"the retriever actor failed ({type(exc).__name__}); it restarts, retry later"
            return "", [], RetrievalInfo(used=False, collection=collection, reason=reason)
        chunks, info = got.chunks, got.info
        if self.cfg.security.guard_documents == "drop":  # chunks carrying injections never reach a prompt
            screen = self.guard.screen_chunks(chunks, lambda c: c.text)
            chunks = screen.kept
            dropped = [
                {"file": c.source, "chunk": c.chunk, "patterns": [f.pattern for f in found]}
                for c, found in screen.dropped
            ]
            info = info.model_copy(update={"dropped": dropped}) if dropped else info
        quoted, sources = quote_chunks(chunks, self.cfg.rag.max_context_chars)
        return quoted, sources, info

    def _screen_input(self, req: TaskRequest) -> list[dict]:
        """Known injection patterns in the user's text: refused (guard ``block``) or reported."""
        mode = self.cfg.security.guard_user_input
        found = [] if mode == "off" else self.guard.scan_all([req.task, req.context])
        if found and mode == "block":
            raise InvalidRequest(
                "the request reads like a prompt-injection attempt "
                f"({', '.join(f.pattern for f in found)}); rephrase it as a plain question",
                details={"guard": [f.to_dict() for f in found]},
            )
        return [f.to_dict() for f in found]

    async def _prepare(
        self,
        req: TaskRequest,
        *,
        use_cache: bool,
        use_rag: bool | None,
        collection: str | None,
        turns: int = 0,
    ) -> _Prepared:
        """Retrieval into the context first (the cache key covers the context), then the lookup."""
        prep = _Prepared(req=req, flags=self._screen_input(req))
        if self.cfg.rag.enabled if use_rag is None else use_rag:
            name = collection or self.cfg.rag.collection
            quoted, prep.sources, prep.retrieval = await self._retrieve(req.task, name)
            if quoted:
                req.context = f"{quoted}\n\n{req.context}" if req.context else quoted
        if turns or prep.retrieval is not None:
            prep.context = {"history_turns": turns, "retrieved_chunks": len(prep.sources)}
        if self.cache is not None and use_cache:
            prep.key = ResultCache.key(req, self.cfg)
            try:
                prep.hit = await asyncio.to_thread(self.cache.get, prep.key)
            except sqlite3.Error as exc:  # a broken cache must not stop answers
                log.warning("result cache lookup failed, answering without it: %s", exc)
                prep.key = None
                return prep
            prep.cache = "hit" if prep.hit is not None else "miss"
            metrics.cache_lookup(prep.hit is not None)
        return prep

    async def _complete(
        self, prep: _Prepared, on_event: Callable[[Candidate | TraceEvent], None] | None = None
    ) -> TaskResult:
        """The cached result, or the Arbiter's (stored when every agent answered); ``on_event``
        gets the Arbiter's candidates and trace events as they happen (none on a cache hit)."""
        if prep.hit is not None:
            result = prep.hit.model_copy(
                update={
                    "id": prep.req.id,
                    "cached": True,
                    "latency_ms": round((time.perf_counter() - prep.t0) * 1000, 2),
                }
            )
        else:
            result = await (
                self._run_once(prep, on_event) if prep.key is not None else self._run(prep.req, on_event)
            )
            if prep.context:
                result.trace.insert(0, TraceEvent(step="context", at_ms=0.0, data=prep.context))
        result.sources, result.retrieval = prep.sources, prep.retrieval
        dropped = prep.retrieval.dropped if prep.retrieval is not None else []
        if prep.flags or dropped:
            guard = {"user_input": prep.flags, "dropped_chunks": dropped}
            result.trace.insert(0, TraceEvent(step="guard", at_ms=0.0, data=guard))
        complete = not result.missing_agents and (prep.retrieval is None or prep.retrieval.used)
        if prep.hit is None and prep.key is not None and complete:
            try:
                await asyncio.to_thread(self.cache.put, prep.key, result)
            except sqlite3.Error as exc:
                log.warning("could not store a result in the cache: %s", exc)
        return result

    async def _run_once(
        self, prep: _Prepared, on_event: Callable[[Candidate | TraceEvent], None] | None = None
    ) -> TaskResult:
        """Run a cache miss on the Arbiter, once per key at a time: identical requests that
        arrive while it runs share its answer instead of each reaching the agents."""
        leader = self._inflight.get(prep.key)
        if leader is not None:
            try:
                shared: TaskResult = await asyncio.shield(leader)
            except asyncio.CancelledError:
                if not leader.cancelled():
                    raise  # this request itself was cancelled
                return await self._run(prep.req, on_event)  # the leader's client went away: answer alone
            result = shared.model_copy(
                update={
                    "id": prep.req.id,
                    "latency_ms": round((time.perf_counter() - prep.t0) * 1000, 2),
                    "trace": [
                        TraceEvent(step="coalesced", at_ms=0.0, data={"with": shared.id}),
                        *shared.trace,
                    ],
                },
                deep=True,
            )
            prep.key = None  # the leader stores it
            return result
        future = asyncio.get_running_loop().create_future()
        self._inflight[prep.key] = future
        try:
            result = await self._run(prep.req, on_event)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            self._inflight.pop(prep.key, None)
        future.set_result(result)
        return result.model_copy(deep=True)

    def _session_id(self, body: ChatBody, request: Request) -> str | None:
        raw = request.headers.get("x-session-id") or body.user
        return None if raw is None else check_session_id(raw)

    async def _recall(self, session: str | None, body: ChatBody, req: TaskRequest) -> list[Turn]:
        """The session's recent turns that fit the agents' context (none if the client keeps them)."""
        if session is None or self.history is None or client_keeps_history(body):
            return []
        rag = self.cfg.rag.enabled if body.use_rag is None else body.use_rag
        other = len(req.context) + (self.cfg.rag.max_context_chars if rag else 0)
        budget = history_budget_chars(self.cfg, req.task, other, req.max_tokens)
        try:
            return await asyncio.to_thread(
                self.history.recent, session, max_turns=self.cfg.history.max_turns, max_chars=budget
            )
        except sqlite3.Error as exc:  # a broken history file must not stop answers
            log.warning("conversation history unavailable, answering without it: %s", exc)
            return []

    async def _remember(self, session: str | None, req: TaskRequest, result: TaskResult) -> None:
        if session is None or self.history is None:
            return
        turns = [
            Turn(role="user", content=req.task),
            Turn(role="assistant", content=result.answer, task_id=result.id),
        ]
        try:
            await asyncio.to_thread(self.history.append, session, turns)
        except sqlite3.Error as exc:
            log.error("could not store the turns of session %s: %s", session, exc)

    @api.get("/healthz", responses={503: {"description": "Not every agent has loaded: each agent's state."}})
    async def healthz(self) -> JSONResponse:
        agents = await self.arbiter.agents()
        ready = all(a["health"]["loaded"] for a in agents)
        body = {
            "status": "ok" if ready else "loading",
            "agents": {a["name"]: a["health"] for a in agents},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.post(
        "/v1/tasks",
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}},
    )
    async def tasks(self, body: TaskBody, response: Response) -> dict:
        req = task_request(body, self.cfg)
        prep = await self._prepare(
            req, use_cache=body.cache, use_rag=body.use_rag, collection=body.collection
        )
        if body.stream:
            return StreamingResponse(
                self._task_events(prep),
                media_type="text/event-stream",
                headers={"X-Legion-Cache": prep.cache},
            )
        result = await self._complete(prep)
        response.headers["X-Legion-Cache"] = prep.cache
        return task_response(result)

    async def _task_events(self, prep: _Prepared) -> AsyncIterator[str]:
        """``/v1/tasks`` as server-sent events: ``candidate`` (each fan-out answer as it arrives),
        ``trace`` (every other step), ``result`` (the JSON of ``/v1/tasks``), then ``done``; a
        failure is an ``error`` event (``{"error": {"code", "message"}}``) before ``done``."""
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(item: Candidate | TraceEvent) -> None:
            if isinstance(item, Candidate):
                queue.put_nowait(sse_event("candidate", candidate_response(item)))
            else:
                queue.put_nowait(sse_event("trace", item.model_dump()))

        work = asyncio.ensure_future(self._complete(prep, on_event))
        work.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
            try:
                yield sse_event("result", task_response(work.result()))
            except (RayTaskError, RayActorError) as exc:
                cause = _unwrap(exc)
                if not isinstance(cause, LegionError):
                    log.warning("streamed task failed: %s", type(cause).__name__)
                    cause = NotReady("a Legion actor failed or is restarting; retry shortly")
                yield sse_event("error", {"error": cause.to_dict()})
            except LegionError as exc:
                yield sse_event("error", {"error": exc.to_dict()})
            except Exception:  # the stream has started: a 500 can no longer be sent
                log.exception("streamed task failed")
                err = InternalError("the task failed inside Legion; retry it")
                yield sse_event("error", {"error": err.to_dict()})
            yield sse_event("done", {})
        finally:
            work.cancel()  # the client went away mid-stream

    @api.get("/v1/agents")
    async def agents(self) -> dict:
        return {"agents": await self.arbiter.agents()}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "legion"} for m in model_ids()],
        }

    @api.post(
        "/v1/chat/completions",
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}},
    )
    async def chat(self, body: ChatBody, request: Request):
        session = self._session_id(body, request)
        req = chat_request(body, self.cfg)
        turns = await self._recall(session, body, req)
        if turns:
            req = chat_request(body, self.cfg, history=[(t.role, t.content) for t in turns])
        prep = await self._prepare(
            req, use_cache=body.cache, use_rag=body.use_rag, collection=body.collection, turns=len(turns)
        )
        headers = {"X-Legion-Cache": prep.cache, **({"X-Session-Id": session} if session else {})}
        if not body.stream:
            result = await self._complete(prep)
            await self._remember(session, req, result)
            return JSONResponse(chat_response(result, body.model), headers=headers)

        async def events():
            # The answer exists only once the agents have voted: errors become an SSE error event.
            try:
                result = await self._complete(prep)
                await self._remember(session, req, result)
                for chunk in chat_chunks(result, body.model):
                    yield f"data: {json.dumps(chunk)}\n\n"
            except LegionError as exc:
                yield f"data: {json.dumps({'error': exc.to_dict()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @api.get("/v1/sessions/{session_id}")
    async def session(self, session_id: str) -> dict:
        if self.history is None:
            raise NotFound("conversation history is off: set history.enabled: true")
        sid = check_session_id(session_id)
        turns = await asyncio.to_thread(self.history.turns, sid)
        if not turns:
            raise NotFound(
                f"no conversation with session id {sid!r}: chat with 'user' or X-Session-Id set to it first"
            )
        return {"id": sid, "object": "session", "turns": [t.model_dump() for t in turns]}

    @api.post("/v1/documents")
    async def documents(self, body: DocumentsBody) -> dict:
        docs, collection = documents_request(body, self.cfg)
        try:
            report = await self._retriever_actor().ingest.remote(docs, collection)
        except RayTaskError as exc:
            cause = _unwrap(exc)
            if isinstance(cause, LegionError):
                raise cause from None
            raise
        except RayActorError:
            raise StoreUnavailable("the retriever actor died while ingesting; retry the request") from None
        return report.model_dump()

    @api.get("/v1/cache")
    async def cache_stats(self) -> dict:
        if self.cache is None:
            return {"enabled": False}
        stats = await asyncio.to_thread(self.cache.stats)
        return {"enabled": True, **stats.model_dump()}


def build_app(config: LegionConfig) -> Application:
    """The Serve application for ``config``: the ingress with its autoscaling settings."""
    s = config.serve
    deployment = serve.deployment(
        LegionIngress,
        name="LegionIngress",
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
        },
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        # Our own request log line (JSON-able, with the request id, route, status and latency)
        # replaces Serve's access log line, which said the same a second time per request.
        logging_config={"enable_access_log": False},
    )
    return deployment.bind(config.model_dump(mode="json"))


def app(args: dict[str, str] | None = None) -> Application:
    """Application builder for ``serve run serve_app:app [config=FILE]`` and Serve config files."""
    return build_app(load_config((args or {}).get("config")))
