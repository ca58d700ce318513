"""Legion's Ray Serve ingress: the native task API and the OpenAI-compatible API.

Routes are thin adapters over ``legion.api`` and the ``ArbiterActor``. ``build_app(config)``
is the one builder, used by ``serve run serve_app:app``, by ``deploy/serve_config.yaml`` and
by ``legion serve``. ``LegionError`` becomes an HTTP status here and nowhere else.
"""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import Application

from actors import start_arbiter
from legion import __version__
from legion.api import (
    ChatBody,
    TaskBody,
    chat_chunks,
    chat_request,
    chat_response,
    model_ids,
    task_request,
    task_response,
)
from legion.config import LegionConfig, load_config
from legion.errors import ErrorCode, LegionError

log = logging.getLogger("legion.serve")

api = FastAPI(
    title="Legion",
    version=__version__,
    description="Multi-agent LLM service: agents on llama.cpp in Ray actors, arbitrated answers.",
)


def _error(status: int, code: str, message: str, details: dict | None = None) -> JSONResponse:
    # OpenAI's error shape, so the official client surfaces ``message``.
    body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status)


@api.exception_handler(LegionError)
async def _legion_error(_: Request, exc: LegionError) -> JSONResponse:
    return _error(exc.http_status, exc.code.value, exc.message, exc.details)


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


def _unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    return exc


@serve.ingress(api)
class LegionIngress:
    """One HTTP replica; every replica shares the same named Arbiter and agent actors."""

    def __init__(self, config: dict):
        self.cfg = LegionConfig(**config)
        self.arbiter = start_arbiter(self.cfg)

    async def _run(self, req):
        try:
            return await self.arbiter.run.remote(req)
        except RayTaskError as exc:
            cause = _unwrap(exc)
            if isinstance(cause, LegionError):
                raise cause from None
            raise
        except RayActorError:
            raise LegionError(
                "the Arbiter restarted while handling this request; retry it",
                code=ErrorCode.NOT_READY,
            ) from None

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        agents = await self.arbiter.agents.remote()
        ready = all(a["health"]["loaded"] for a in agents)
        body = {
            "status": "ok" if ready else "loading",
            "agents": {a["name"]: a["health"] for a in agents},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.post("/v1/tasks")
    async def tasks(self, body: TaskBody) -> dict:
        result = await self._run(task_request(body, self.cfg))
        return task_response(result)

    @api.get("/v1/agents")
    async def agents(self) -> dict:
        return {"agents": await self.arbiter.agents.remote()}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "legion"} for m in model_ids()],
        }

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatBody):
        req = chat_request(body, self.cfg)
        if not body.stream:
            return chat_response(await self._run(req), body.model)

        async def events():
            # The answer exists only once the agents have voted: errors become an SSE error event.
            try:
                result = await self._run(req)
                for chunk in chat_chunks(result, body.model):
                    yield f"data: {json.dumps(chunk)}\n\n"
            except LegionError as exc:
                yield f"data: {json.dumps({'error': exc.to_dict()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(config: LegionConfig) -> Application:
    """The Serve application for ``config``: the ingress with its autoscaling settings."""
    s = config.serve
    deployment = serve.deployment(
        LegionIngress,
        name="LegionIngress",
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    )
    return deployment.bind(config.model_dump(mode="json"))


def app(args: dict[str, str] | None = None) -> Application:
    """Application builder for ``serve run serve_app:app [config=FILE]`` and Serve config files."""
    return build_app(load_config((args or {}).get("config")))
