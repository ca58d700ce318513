"""Legion's Ray Serve ingress: the native task API and the OpenAI-compatible API.

Routes are short adapters over ``legion.service.pipeline.TaskPipeline`` and, for completions,
embeddings and models, ``legion.service.completions.OpenAIRoutes``. Each replica builds its
FastAPI app (handlers, middleware, the console's files) in ``__serve_build_asgi_app__``, from
its own config: nothing is wired at import. ``build_app(config)`` is the one builder, used by
``serve run serve_app:app``, by ``deploy/serve_config.yaml`` and by ``legion serve``.
``LegionError`` becomes an HTTP status here and nowhere else.
"""

import asyncio
import json
import logging
import time
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application

from actors import start_arbiter
from actors.remote import ArbiterClient, RetrieverClient
from actors.retriever import start_retriever
from legion import __version__
from legion.config import LegionConfig, load_config
from legion.errors import LegionError, NotReady
from legion.logging_setup import configure_logging
from legion.messages import IngestReport
from legion.profile import load_profile
from legion.service.api import (
    ERROR_RESPONSES,
    AgentList,
    ChatBody,
    ChatCompletion,
    Completion,
    CompletionBody,
    DocumentsBody,
    EmbeddingBody,
    EmbeddingList,
    ModelList,
    SessionInfo,
    TaskBody,
    TaskResponse,
    chat_response,
    documents_request,
    sse_event,
    task_response,
)
from legion.service.completions import OpenAIRoutes
from legion.service.health import HealthReport, service_health
from legion.service.http import (
    ChatEvents,
    RequestLog,
    TaskEvents,
    add_error_handlers,
    internal_failure,
    legion_response,
    retry_shortly,
    write_events,
)
from legion.service.openapi import openapi_schema
from legion.service.pipeline import Prepared, TaskPipeline
from legion.service.responses import ResponseObject, ResponsesBody, ResponsesEvents, chat_body, completed
from legion.service.security import SecurityMiddleware, SecurityPolicy
from legion.state.cache import CacheInfo
from legion.state.history import check_session_id
from legion.state.vectorstore import store_location

log = logging.getLogger("legion.serve")

UI_DIR = Path(__file__).resolve().parent / "legion" / "ui"  # the web console: static files, no build step
AGENTS_WATCH_S = 300.0  # a watch of /v1/agents ends after this; the console opens another
_SSE = {"description": "JSON, or server-sent events with stream"}


def _route(method: str, path: str, **options):
    """Mark an ingress method as the route ``method path`` (added by ``_build_api``)."""

    def mark(fn):
        fn.__legion_route__ = (method, path, options)
        return fn

    return mark


def _json(model: BaseModel, headers: dict | None = None) -> Response:
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _stream_failure(exc: Exception) -> LegionError:
    # What a client of a stream hears about an error that is not Legion's own.
    if isinstance(exc, RayActorError | RayTaskError):
        log.warning("streamed task failed: %s", type(exc).__name__)
        return NotReady("a Legion actor failed or is restarting; retry shortly")
    return internal_failure(exc)


@serve.ingress()
class LegionIngress:
    """One HTTP replica; every replica shares the same named Arbiter, agent and retriever actors."""

    def __init__(self, config: dict):
        self.cfg = LegionConfig(**config)
        configure_logging(self.cfg.log_level, self.cfg.log_format)
        self.security = SecurityPolicy(self.cfg)  # applied by SecurityMiddleware
        self.arbiter = ArbiterClient(partial(start_arbiter, self.cfg), self.cfg.arbiter.restart_wait_s)
        self.retriever = RetrieverClient(partial(start_retriever, self.cfg, store_location(self.cfg)))
        if self.cfg.rag.enabled:  # load the embedding model before the first task needs it
            self.retriever.ensure_started()
        # State lives outside the replica: SQLite files shared by every replica, one retriever actor.
        self.pipeline = TaskPipeline.from_config(self.cfg, self.arbiter, self.retriever)
        self.openai = OpenAIRoutes(self.cfg, self.arbiter, self.retriever)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return _build_api(self)

    @_route(
        "GET",
        "/healthz",
        response_model=HealthReport,
        responses={
            503: {"model": HealthReport, "description": "An agent is still loading, or none can answer."}
        },
    )
    async def healthz(self) -> JSONResponse:
        status, report = service_health(await self.arbiter.agents())
        return JSONResponse(report.model_dump(mode="json"), status_code=status)

    @_route(
        "POST",
        "/v1/tasks",
        response_model=TaskResponse,
        responses={200: {"content": {"text/event-stream": {}}, **_SSE}},
    )
    async def tasks(self, body: TaskBody) -> Response:
        prep = await self.pipeline.prepare_task(body)
        headers = {"X-Legion-Cache": prep.cache}
        if body.stream:
            return self._stream(prep, TaskEvents(), headers)
        return _json(task_response(await self.pipeline.complete(prep)), headers)

    @_route(
        "POST",
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}, **_SSE}},
    )
    async def chat(self, body: ChatBody, request: Request) -> Response:
        prep, headers = await self._prepare_chat(body, request)
        if body.stream:
            return self._stream(prep, ChatEvents(prep.req.id, body.model, body.tools), headers)
        return _json(chat_response(await self.pipeline.complete(prep), body.model, body.tools), headers)

    @_route(
        "POST",
        "/v1/responses",
        response_model=ResponseObject,
        responses={200: {"content": {"text/event-stream": {}}, **_SSE}},
    )
    async def responses(self, body: ResponsesBody, request: Request) -> Response:
        chat = chat_body(body)
        prep, headers = await self._prepare_chat(chat, request)
        if body.stream:
            return self._stream(prep, ResponsesEvents(body, chat), headers)
        done = completed(body, chat, await self.pipeline.complete(prep))
        return Response(json.dumps(done), media_type="application/json", headers=headers)

    @_route(
        "POST",
        "/v1/completions",
        response_model=Completion,
        responses={200: {"content": {"text/event-stream": {}}, **_SSE}},
    )
    async def completions(self, body: CompletionBody) -> Response:
        if body.stream:
            return StreamingResponse(self.openai.stream(body), media_type="text/event-stream")
        return _json(await self.openai.complete(body))

    @_route("POST", "/v1/embeddings", response_model=EmbeddingList)
    async def embeddings(self, body: EmbeddingBody) -> Response:
        return _json(await self.openai.embed(body))

    async def _prepare_chat(self, body: ChatBody, request: Request) -> tuple[Prepared, dict]:
        """A chat (or Responses) request prepared, with its session (``X-Session-Id`` or
        ``user``) and the headers its answer carries."""
        raw = request.headers.get("x-session-id") or body.user
        session = None if raw is None else check_session_id(raw)
        prep = await self.pipeline.prepare_chat(body, session)
        return prep, {"X-Legion-Cache": prep.cache, **({"X-Session-Id": session} if session else {})}

    def _stream(self, prep: Prepared, events: TaskEvents | ChatEvents, headers: dict) -> StreamingResponse:
        run = partial(self.pipeline.complete, prep)
        return StreamingResponse(
            write_events(run, events, _stream_failure), media_type="text/event-stream", headers=headers
        )

    @_route("GET", "/v1/agents", response_model=AgentList)
    async def agents(
        self,
        watch_s: float | None = Query(
            None,
            ge=1.0,
            le=60.0,
            description="Instead of one answer, server-sent 'agents' events every watch_s seconds "
            f"for up to {AGENTS_WATCH_S:g} s, then 'done' (one request, so one audit row, per watch).",
        ),
    ) -> Response:
        if watch_s is None:
            return _json(await self._agent_list())
        return StreamingResponse(self._watch_agents(watch_s), media_type="text/event-stream")

    async def _agent_list(self) -> AgentList:
        path = self.cfg.arbiter.profile
        profile = load_profile(path).summary(path) if path else None
        adaptation = await self.arbiter.adaptation() if self.cfg.arbiter.adapt != "off" else None
        return AgentList(agents=await self.arbiter.agents(), profile=profile, adaptation=adaptation)

    async def _watch_agents(self, every_s: float):
        end = time.monotonic() + AGENTS_WATCH_S
        try:
            while True:
                yield sse_event("agents", await self._agent_list())
                if time.monotonic() + every_s > end:
                    break
                await asyncio.sleep(every_s)
        except Exception as exc:  # the stream has started: an error event, then the end
            yield sse_event("error", {"error": _stream_failure(exc).to_dict()})
        yield sse_event("done", {})

    @_route("GET", "/v1/models", response_model=ModelList)
    async def models(self) -> Response:
        return _json(await self.openai.models())

    @_route("GET", "/v1/sessions/{session_id}", response_model=SessionInfo)
    async def session(self, session_id: str) -> Response:
        return _json(await self.pipeline.session(session_id))

    @_route("POST", "/v1/documents", response_model=IngestReport)
    async def documents(self, body: DocumentsBody) -> Response:
        docs, collection = documents_request(body, self.cfg)
        return _json(await self.retriever.ingest(docs, collection))

    @_route("GET", "/v1/cache", response_model=CacheInfo, response_model_exclude_none=True)
    async def cache_stats(self) -> CacheInfo:
        return CacheInfo.of(await self.pipeline.cache_stats())

    @_route("GET", "/ui", include_in_schema=False)
    async def ui_index(self) -> RedirectResponse:
        return RedirectResponse("ui/")  # relative, so it holds under any route prefix

    @_route("GET", "/favicon.ico", include_in_schema=False)
    async def favicon(self) -> Response:
        return Response((UI_DIR / "favicon.svg").read_bytes(), media_type="image/svg+xml")


def _build_api(ingress: LegionIngress) -> FastAPI:
    """The replica's app: its routes, Legion's error shape, the request log, the console, and
    (outermost) keys, scopes, rate and body limits and the audit record of every request."""
    api = FastAPI(
        title="Legion",
        version=__version__,
        description="Multi-agent LLM service: agents on llama.cpp in Ray actors, arbitrated answers.",
        responses=ERROR_RESPONSES,
    )
    for name in dir(ingress):
        route = getattr(getattr(type(ingress), name, None), "__legion_route__", None)
        if route is not None:
            method, path, options = route
            api.add_api_route(path, getattr(ingress, name), methods=[method], **options)
    add_error_handlers(api)

    @api.exception_handler(RayActorError)
    async def _actor_unavailable(_: Request, exc: RayActorError) -> JSONResponse:
        # The Arbiter or a retriever restarting (they come back by themselves): a 503, never a 500.
        log.warning("actor unavailable: %s", type(exc).__name__)
        return retry_shortly("a Legion actor is restarting; retry shortly")

    api.openapi = partial(openapi_schema, api, ingress.security)
    api.add_middleware(RequestLog)
    api.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    api.add_middleware(SecurityMiddleware, policy=lambda: ingress.security, error_response=legion_response)
    return api


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
