"""The OpenAI routes beyond chat: ``/v1/completions`` on one agent, ``/v1/embeddings`` with the
retrieval embedding model, ``/v1/models`` with the agents' models. No Ray here: the agents and
the embedder are reached through the ``CompleteOnAgent`` and ``Embed`` protocols
(``actors.remote`` in a running Legion).

A completion is one agent's continuation of the client's own text, not an arbitrated answer:
``logprobs`` and ``echo`` describe one model's tokens, which a vote between agents would not
have (docs/models.md).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from legion.config import LegionConfig
from legion.engine.embedding import BUNDLED_EMBEDDING_MODEL, EMBEDDING_MODEL_ALIASES
from legion.errors import LegionError
from legion.logging_setup import current_request_id
from legion.messages import CompletionRequest, Generation
from legion.service.api import (
    Completion,
    CompletionBody,
    CompletionChoice,
    EmbeddingBody,
    EmbeddingList,
    ModelList,
    Usage,
    completion_request,
    completion_response,
    embedding_response,
    embedding_texts,
    new_id,
)
from legion.service.api import models_response as _models_response

log = logging.getLogger(__name__)


class CompleteOnAgent(Protocol):
    """The agents as the completion route sees them (the Arbiter, which owns their pools)."""

    async def complete(self, agent: str, req: CompletionRequest) -> Generation:
        """``agent``'s continuation of ``req.prompt``; raises ``LegionError`` for a client's error."""
        ...

    def complete_stream(self, agent: str, req: CompletionRequest) -> AsyncIterator[str | Generation]:
        """``complete``'s text piece by piece as it is decoded, then its ``Generation``."""
        ...

    async def agents(self) -> list[dict]:
        """Every agent's entry of ``GET /v1/agents`` (its health carries its model)."""
        ...


class Embed(Protocol):
    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit-length vectors of ``texts`` and the tokens read."""
        ...


def embedding_model_name() -> str:
    """The id of the embedding model retrieval uses: the bundled all-MiniLM-L6-v2 (its package
    keeps it in a folder named ``model``, which clients asking for it by name could not guess)."""
    return BUNDLED_EMBEDDING_MODEL


class OpenAIRoutes:
    """What ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models`` do, for one replica."""

    def __init__(self, cfg: LegionConfig, agents: CompleteOnAgent, embedder: Embed):
        self.cfg = cfg
        self.agents = agents
        self.embedder = embedder
        self._embedding_model: str | None = None

    @property
    def embedding_model(self) -> str:
        if self._embedding_model is None:
            self._embedding_model = embedding_model_name()
        return self._embedding_model

    async def complete(self, body: CompletionBody) -> Completion:
        agent, req = completion_request(body, self.cfg)
        return await self._run(agent, req, body)

    def stream(self, body: CompletionBody) -> AsyncIterator[str]:
        """Server-sent events of a completion: checked now (a bad body is an HTTP error, not a
        stream), run as the stream is read: a chunk per piece of text as the agent decodes it
        (the echoed prompt first), the last one with the finish reason, then ``[DONE]``. With
        ``logprobs`` the completion comes whole in one chunk (its log-probabilities with it).
        An error after the start is an ``error`` chunk."""
        agent, req = completion_request(body, self.cfg)
        return self._events(agent, req, body)

    async def _events(self, agent: str, req: CompletionRequest, body: CompletionBody) -> AsyncIterator[str]:
        try:
            if body.logprobs is not None:
                done = await self._run(agent, req, body)
                yield f"data: {done.model_dump_json(exclude_none=True)}\n\n"
            else:
                async for chunk in self._pieces(agent, req, body):
                    yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        except Exception as exc:  # the stream has started: say what went wrong in it
            err = exc if isinstance(exc, LegionError) else None
            log.warning("streamed completion failed: %s", exc)
            message = err.message if err else "the completion failed; retry shortly"
            code = err.code.value if err else "internal_error"
            yield f"data: {json.dumps({'error': {'message': message, 'type': code, 'code': code}})}\n\n"
        yield "data: [DONE]\n\n"

    async def _pieces(
        self, agent: str, req: CompletionRequest, body: CompletionBody
    ) -> AsyncIterator[Completion]:
        req.request_id = current_request_id()
        cid, created = new_id("cmpl"), int(time.time())

        def chunk(text: str, finish: str | None = None, usage: Usage | None = None) -> Completion:
            choice = CompletionChoice(text=text, finish_reason=finish)
            return Completion(id=cid, created=created, model=body.model, choices=[choice], usage=usage)

        if body.echo:
            yield chunk(req.prompt)
        async for item in self.agents.complete_stream(agent, req):
            if isinstance(item, str):
                yield chunk(item)
                continue
            finish = "length" if item.finish_reason in ("length", "timeout") else "stop"
            usage = Usage(
                prompt_tokens=item.prompt_tokens,
                completion_tokens=item.completion_tokens,
                total_tokens=item.prompt_tokens + item.completion_tokens,
            )
            yield chunk("", finish, usage)

    async def _run(self, agent: str, req: CompletionRequest, body: CompletionBody) -> Completion:
        req.request_id = current_request_id()
        gen = await self.agents.complete(agent, req)
        return completion_response(gen, body, req.prompt, new_id("cmpl"), body.model)

    async def embed(self, body: EmbeddingBody) -> EmbeddingList:
        texts = embedding_texts(body, self.cfg, self.embedding_model, EMBEDDING_MODEL_ALIASES)
        vectors, tokens = await self.embedder.embed(texts)
        return embedding_response(vectors, tokens, body, self.embedding_model)

    async def models(self) -> ModelList:
        try:
            agents = await self.agents.agents()
        except Exception as exc:  # the Arbiter restarting: the strategies are still there
            log.warning("listing models without the agents': %s", type(exc).__name__)
            agents = []
        return _models_response(agents, self.embedding_model)
