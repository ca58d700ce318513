"""``TaskPipeline``: what happens to a task between the HTTP route and the Arbiter.

screen (the injection guard) -> retrieve and quote documents -> look the task up in the result
cache, sharing one run among identical requests in flight -> arbitrate -> store the result ->
remember the conversation's turns. No Ray here: the pipeline reaches the Arbiter and the
retriever through the ``Arbitrate`` and ``Retrieve`` protocols (``actors.remote`` in a running
Legion); the cache and the history are SQLite files every replica shares.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from legion import metrics
from legion.arbitration import adaptation
from legion.arbitration.arbiter import Event
from legion.config import LegionConfig
from legion.errors import InvalidRequest, LegionError, NotFound
from legion.logging_setup import current_request_id
from legion.messages import Retrieval, RetrievalInfo, Source, TaskRequest, TaskResult, TraceEvent
from legion.service.api import (
    ChatBody,
    SessionInfo,
    TaskBody,
    answer_turn,
    chat_request,
    client_keeps_history,
    session_turns,
    task_request,
)
from legion.service.guard import InjectionGuard
from legion.state.cache import CacheStats, ResultCache
from legion.state.history import ConversationStore, Turn, check_session_id, history_budget_chars
from legion.state.vectorstore import quote_chunks

log = logging.getLogger(__name__)


class Arbitrate(Protocol):
    """The Arbiter as the pipeline sees it."""

    async def run(self, req: TaskRequest, on_event: Callable[[Event], None] | None = None) -> TaskResult:
        """The answer to ``req``; ``on_event`` gets its candidates and trace events as they happen.
        Raises ``LegionError`` for every failure a client should hear about."""
        ...


class Retrieve(Protocol):
    """The document store as the pipeline sees it."""

    async def search(self, query: str, collection: str) -> Retrieval:
        """The chunks that match ``query``; raises ``LegionError`` when the store cannot answer."""
        ...


@dataclass
class Prepared:
    """A task after screening, retrieval and the cache lookup, before (or instead of) the Arbiter."""

    req: TaskRequest
    cache: str = "bypass"  # the X-Legion-Cache header: hit, miss or bypass
    key: str | None = None
    hit: TaskResult | None = None
    sources: list[Source] = field(default_factory=list)
    retrieval: RetrievalInfo | None = None
    context: dict = field(default_factory=dict)  # what went into the agents' context, for the trace
    flags: list[dict] = field(default_factory=list)  # injection patterns found in the user's text
    session: str | None = None  # the conversation to remember the turns in
    chat: ChatBody | None = None  # a chat request: its tool results are remembered as such
    t0: float = field(default_factory=time.perf_counter)


class TaskPipeline:
    """One replica's way from a request body to a stored, remembered answer."""

    def __init__(
        self,
        cfg: LegionConfig,
        arbiter: Arbitrate,
        retriever: Retrieve,
        *,
        cache: ResultCache | None = None,
        history: ConversationStore | None = None,
    ):
        self.cfg = cfg
        self.arbiter = arbiter
        self.retriever = retriever
        self.cache = cache
        self.history = history
        self.guard = InjectionGuard(cfg.security.guard_patterns)
        self._inflight: dict[str, asyncio.Future] = {}  # cache key -> the run answering it now
        # arbiter.adapt: its stored factors are part of a task with choices' cache key.
        self._adaptation = adaptation.from_config(cfg) if cache is not None else None

    @classmethod
    def from_config(cls, cfg: LegionConfig, arbiter: Arbitrate, retriever: Retrieve) -> TaskPipeline:
        """With the result cache and the conversation history the config turns on."""
        return cls(
            cfg,
            arbiter,
            retriever,
            cache=ResultCache.from_config(cfg) if cfg.cache.enabled else None,
            history=ConversationStore.from_config(cfg) if cfg.history.enabled else None,
        )

    def _cache_key(self, req: TaskRequest) -> str:
        """``req``'s result-cache key; with ``arbiter.adapt`` on, a task with choices' key holds the
        adaptation's factors as stored now (the Arbiter weighs the profile by them)."""
        adapted = (
            self._adaptation.factors() if self._adaptation is not None and req.choices is not None else None
        )
        return ResultCache.key(req, self.cfg, adapted)

    # ------------------------------------------------------------------ entry points
    async def prepare_task(self, body: TaskBody) -> Prepared:
        """``POST /v1/tasks``: validate, screen, retrieve, look up."""
        req = task_request(body, self.cfg)
        return await self.prepare(req, use_cache=body.cache, use_rag=body.use_rag, collection=body.collection)

    async def prepare_chat(self, body: ChatBody, session: str | None) -> Prepared:
        """``POST /v1/chat/completions``: the chat as a task, with the session's stored turns
        as context unless the client sends the conversation itself."""
        req = chat_request(body, self.cfg)
        turns = [] if client_keeps_history(body) else await self._recall(session, req, body.use_rag)
        if turns:
            req = chat_request(body, self.cfg, history=turns)
        prep = await self.prepare(
            req,
            use_cache=body.cache,
            use_rag=body.use_rag,
            collection=body.collection,
            session=session,
            turns=len(turns),
        )
        prep.chat = body
        return prep

    async def prepare(
        self,
        req: TaskRequest,
        *,
        use_cache: bool = True,
        use_rag: bool | None = None,
        collection: str | None = None,
        session: str | None = None,
        turns: int = 0,
    ) -> Prepared:
        """Retrieval into the context first (the cache key covers the context), then the lookup."""
        prep = Prepared(req=req, flags=self._screen(req), session=session)
        if self.cfg.rag.enabled if use_rag is None else use_rag:
            name = collection or self.cfg.rag.collection
            quoted, prep.sources, prep.retrieval = await self._retrieve(req.task, name)
            if quoted:
                req.context = f"{quoted}\n\n{req.context}" if req.context else quoted
        if turns or prep.retrieval is not None:
            prep.context = {"history_turns": turns, "retrieved_chunks": len(prep.sources)}
        if self.cache is not None and use_cache:
            try:
                prep.key = await asyncio.to_thread(self._cache_key, req)
                prep.hit = await asyncio.to_thread(self.cache.get, prep.key)
            except sqlite3.Error as exc:  # a broken cache must not stop answers
                log.warning("result cache lookup failed, answering without it: %s", exc)
                prep.key = None
                return prep
            prep.cache = "hit" if prep.hit is not None else "miss"
            metrics.cache_lookup(prep.hit is not None)
        return prep

    async def complete(self, prep: Prepared, on_event: Callable[[Event], None] | None = None) -> TaskResult:
        """The cached result, or the Arbiter's (stored when every agent answered), remembered in
        the session's history; ``on_event`` gets the Arbiter's candidates and trace events as
        they happen (none on a cache hit)."""
        if prep.hit is not None:
            result = prep.hit.model_copy(
                update={"id": prep.req.id, "cached": True, "latency_ms": self._since(prep)}
            )
        else:
            result = await (
                self._run_once(prep, on_event)
                if prep.key is not None
                else self._arbitrate(prep.req, on_event)
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
        await self._remember(prep, result)
        return result

    async def session(self, session_id: str) -> SessionInfo:
        """The stored turns of a conversation; ``NotFound`` when there are none."""
        if self.history is None:
            raise NotFound("conversation history is off: set history.enabled: true")
        sid = check_session_id(session_id)
        turns = await asyncio.to_thread(self.history.turns, sid)
        if not turns:
            raise NotFound(
                f"no conversation with session id {sid!r}: chat with 'user' or X-Session-Id set to it first"
            )
        return SessionInfo(id=sid, turns=turns)

    async def cache_stats(self) -> CacheStats | None:
        return None if self.cache is None else await asyncio.to_thread(self.cache.stats)

    # ------------------------------------------------------------------ steps
    def _screen(self, req: TaskRequest) -> list[dict]:
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

    async def _retrieve(self, query: str, collection: str) -> tuple[str, list[Source], RetrievalInfo]:
        """Quoted chunks for the agents, their sources, and whether retrieval worked (never raises)."""
        limit = self.cfg.rag.timeout_s
        try:
            got = await asyncio.wait_for(self.retriever.search(query, collection), limit)
        except TimeoutError:
            reason = f"retrieval took longer than rag.timeout_s={limit}s"
            return "", [], RetrievalInfo(used=False, collection=collection, reason=reason)
        except LegionError as exc:
            return "", [], RetrievalInfo(used=False, collection=collection, reason=exc.message)
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

    async def _arbitrate(self, req: TaskRequest, on_event: Callable[[Event], None] | None) -> TaskResult:
        req.request_id = req.request_id or current_request_id()  # on to the Arbiter and the agents
        req.timeout_s = req.timeout_s or self.cfg.serve.request_timeout_s
        return await self.arbiter.run(req, on_event)

    async def _run_once(self, prep: Prepared, on_event: Callable[[Event], None] | None) -> TaskResult:
        """Run a cache miss on the Arbiter, once per key at a time: identical requests that
        arrive while it runs share its answer instead of each reaching the agents."""
        leader = self._inflight.get(prep.key)
        if leader is not None:
            try:
                shared: TaskResult = await asyncio.shield(leader)
            except asyncio.CancelledError:
                if not leader.cancelled():
                    raise  # this request itself was cancelled
                return await self._arbitrate(prep.req, on_event)  # the leader's client went away
            result = shared.model_copy(
                update={
                    "id": prep.req.id,
                    "latency_ms": self._since(prep),
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
            result = await self._arbitrate(prep.req, on_event)
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

    async def _recall(self, session: str | None, req: TaskRequest, use_rag: bool | None) -> list[Turn]:
        """The session's recent turns that fit the agents' context."""
        if session is None or self.history is None:
            return []
        rag = self.cfg.rag.enabled if use_rag is None else use_rag
        other = len(req.context) + (self.cfg.rag.max_context_chars if rag else 0)
        budget = history_budget_chars(self.cfg, req.task, other, req.max_tokens)
        try:
            return await asyncio.to_thread(
                self.history.recent, session, max_turns=self.cfg.history.max_turns, max_chars=budget
            )
        except sqlite3.Error as exc:  # a broken history file must not stop answers
            log.warning("conversation history unavailable, answering without it: %s", exc)
            return []

    async def _remember(self, prep: Prepared, result: TaskResult) -> None:
        session = prep.session
        if session is None or self.history is None:
            return
        if prep.chat is not None:  # calls and tool results kept as what they are
            turns = session_turns(prep.chat, answer_turn(result, prep.chat.tools))
        else:
            turns = [
                Turn(role="user", content=prep.req.task),
                Turn(role="assistant", content=result.answer, task_id=result.id),
            ]
        try:
            await asyncio.to_thread(self.history.append, session, turns)
        except sqlite3.Error as exc:
            log.error("could not store the turns of session %s: %s", session, exc)

    @staticmethod
    def _since(prep: Prepared) -> float:
        return round((time.perf_counter() - prep.t0) * 1000, 2)
