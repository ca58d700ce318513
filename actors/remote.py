"""Calls across Ray, seen from the plain classes: what an actor raised (Ray's wrapper taken off,
in this one place), the agents as the Arbiter sees them, and the ingress's clients of the
Arbiter and the retriever actors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from actors.pool import AgentPool
from legion.arbitration.arbiter import Event, describe_failure
from legion.engine.llama import ScoredContinuation
from legion.errors import AgentGone, AgentUnavailable, InternalError, NotReady, StoreUnavailable
from legion.messages import (
    AgentHealth,
    ChoiceScores,
    CompletionRequest,
    Document,
    GenerateRequest,
    Generation,
    IngestReport,
    Retrieval,
    TaskRequest,
    TaskResult,
    TraceEvent,
)

log = logging.getLogger(__name__)

_AGENT_DIED = "agent actor died during the task (it restarts and rejoins)"


def unwrap(exc: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's ``RayTaskError``; any other one as it is."""
    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    return exc


async def resolve(ref: ray.ObjectRef) -> Any:
    """The value of ``ref``; raises what the actor raised (a ``RayActorError`` when it died)."""
    try:
        return await ref
    except RayTaskError as exc:
        raise unwrap(exc) from None


async def _relay(gen) -> AsyncIterator[Any]:
    """The values of a Ray streaming generator's refs as they come; a caller that goes away
    cancels the remote generator (its actor stops the work)."""
    try:
        async for ref in gen:
            yield await resolve(ref)
    except (asyncio.CancelledError, GeneratorExit):
        ray.cancel(gen)
        raise


def agent_error(exc: BaseException) -> str:
    """One line on why a call to an agent's actor failed."""
    return describe_failure(AgentUnavailable(_AGENT_DIED) if isinstance(exc, RayActorError) else unwrap(exc))


class RayAgents:
    """``legion.arbitration.arbiter.Agents`` over Ray: one ``AgentPool`` of actors per agent."""

    def __init__(self, pools: Mapping[str, AgentPool]):
        self._pools = pools

    def saturated(self) -> bool:
        return all(pool.saturated() for pool in self._pools.values())

    async def status(self, agent: str) -> tuple[AgentHealth, dict]:
        pool = self._pools[agent]
        try:
            health, stats = await asyncio.gather(pool.health.remote(), pool.stats.remote())
        except (ActorDiedError, ValueError) as exc:  # restarts used up, or the named actor is gone
            raise AgentGone(agent_error(exc)) from None
        except Exception as exc:  # restarting, or it broke: it may come back
            raise AgentUnavailable(agent_error(exc)) from None
        return health, stats

    def pool_info(self, agent: str) -> dict:
        return self._pools[agent].info()

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        return await self._call(agent, "generate", req)

    async def score(
        self, agent: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        return await self._call(agent, "score", task, context, continuations, view)

    async def score_choices(
        self, agent: str, task: str, choices: list[str], members: list[str], context: str = ""
    ) -> list[ChoiceScores]:
        return await self._call(agent, "score_choices", task, choices, members, context)

    async def complete(self, agent: str, req: CompletionRequest) -> Generation:
        return await self._call(agent, "complete", req)

    async def complete_stream(self, agent: str, req: CompletionRequest) -> AsyncIterator[str | Generation]:
        try:
            gen, release = self._pools[agent].stream("complete_stream", req)
        except ValueError as exc:  # the named actor is gone
            raise AgentUnavailable(str(exc)) from None
        try:
            async for item in _relay(gen):
                yield item
        except RayActorError:
            raise AgentUnavailable(_AGENT_DIED) from None
        finally:
            release()

    async def _call(self, agent: str, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self._pools[agent], method).remote(*args)
        except ValueError as exc:  # the named actor is gone
            raise AgentUnavailable(str(exc)) from None
        try:
            return await resolve(ref)
        except RayActorError:
            raise AgentUnavailable(_AGENT_DIED) from None
        except asyncio.CancelledError:
            ray.cancel(ref)  # past the agent's deadline, or the task is gone: stop its work
            raise


class ArbiterClient:
    """The ingress's way to the ``ArbiterActor`` (``legion.service.pipeline.Arbitrate``).

    A task the Arbiter lost by dying, or sent while it restarts, goes again (running a task
    twice is harmless) until it answers or ``restart_wait_s`` passes; a gone Arbiter is
    created again with ``start``. A streamed task whose caller goes away is cancelled.
    """

    def __init__(self, start: Callable[[], Any], restart_wait_s: float):
        self._start = start
        self._handle = start()
        self._restart_wait_s = restart_wait_s

    async def run(self, req: TaskRequest, on_event: Callable[[Event], None] | None = None) -> TaskResult:
        wait_s = min(self._restart_wait_s, req.timeout_s or self._restart_wait_s)
        deadline = time.monotonic() + wait_s
        lost = 0
        while True:
            try:
                if on_event is None:
                    result = await resolve(self._handle.run.remote(req))
                else:
                    result = await self._streamed(req, on_event)
                break
            except RayActorError as exc:
                if time.monotonic() >= deadline:
                    raise NotReady(
                        f"the Arbiter is restarting and was not back within {wait_s:g} s; retry shortly",
                        details={"retry_after_s": 5},
                    ) from None
                log.warning("Arbiter unavailable (%s); sending task %s again", type(exc).__name__, req.id)
                lost += 1
                if isinstance(exc, ActorDiedError):
                    self._handle = self._start()
                await asyncio.sleep(0.5)
        if lost:
            result.trace.insert(0, TraceEvent(step="arbiter_restarted", at_ms=0.0, data={"resent": lost}))
        return result

    async def _streamed(self, req: TaskRequest, on_event: Callable[[Event], None]) -> TaskResult:
        gen = self._handle.run_stream.options(num_returns="streaming").remote(req)
        try:
            async for ref in gen:
                item = await resolve(ref)
                if isinstance(item, TaskResult):
                    return item
                on_event(item)
        except asyncio.CancelledError:
            ray.cancel(gen)  # the client went away: the Arbiter stops the agents' work
            raise
        raise InternalError("the Arbiter's stream ended without a result; retry the task")

    async def agents(self) -> list[dict]:
        """Each agent's config, pool, health, stats and trust weight."""
        return await self._handle.agents.remote()

    async def adaptation(self) -> dict | None:
        """Where ``arbiter.adapt`` stands (None: off)."""
        return await self._handle.adaptation.remote()

    async def complete(self, agent: str, req: CompletionRequest) -> Generation:
        """One agent's completion of a raw prompt, through the Arbiter's pool of it."""
        return await resolve(self._handle.complete.remote(agent, req))

    async def complete_stream(self, agent: str, req: CompletionRequest) -> AsyncIterator[str | Generation]:
        """``complete``'s text piece by piece as the agent decodes it, then the ``Generation``."""
        gen = self._handle.complete_stream.options(num_returns="streaming").remote(agent, req)
        async for item in _relay(gen):
            yield item


class RetrieverClient:
    """The ingress's way to the retriever actor (``legion.service.pipeline.Retrieve``), started with
    ``start`` on first use."""

    def __init__(self, start: Callable[[], Any]):
        self._start = start
        self._handle = None

    def ensure_started(self):
        if self._handle is None:
            self._handle = self._start()
        return self._handle

    async def search(self, query: str, collection: str) -> Retrieval:
        try:
            return await self.ensure_started().search.remote(query, collection)
        except (RayActorError, RayTaskError) as exc:
            raise StoreUnavailable(
                f"the retriever actor failed ({type(exc).__name__}); it restarts, retry later"
            ) from None

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """The embedding model's vectors of ``texts`` and the tokens it read."""
        try:
            return await resolve(self.ensure_started().embed.remote(texts))
        except RayActorError:
            raise StoreUnavailable("the retriever actor failed; it restarts, retry shortly") from None

    async def ingest(self, documents: list[Document], collection: str) -> IngestReport:
        try:
            return await resolve(self.ensure_started().ingest.remote(documents, collection))
        except RayActorError:
            raise StoreUnavailable("the retriever actor died while ingesting; retry the request") from None
