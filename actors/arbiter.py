"""``ArbiterActor``: fans a task out to every agent through object refs and arbitrates.

An async actor, so one Arbiter serves many tasks at once. A slow or dead agent never blocks
the answer: the Arbiter waits at most ``agent_timeout_s`` and answers from what arrived,
naming the missing agents in the trace.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from legion.arbitration import get_strategy, normalize_answer
from legion.config import LegionConfig
from legion.errors import LegionError
from legion.messages import Candidate, GenerateRequest, TaskRequest, TaskResult, TraceEvent

log = logging.getLogger(__name__)


def _agent_error(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, LegionError):
            return cause.message
        return f"agent raised {type(cause or exc).__name__}: {cause or exc}"
    if isinstance(exc, RayActorError):
        return "agent actor died during the task (it restarts and rejoins)"
    return f"{type(exc).__name__}: {exc}"


class ArbiterActor:
    def __init__(self, config: dict, agent_actor_names: dict[str, str], namespace: str):
        self.cfg = LegionConfig(**config)
        self._names = agent_actor_names
        self._namespace = namespace
        self._handles: dict[str, ray.actor.ActorHandle] = {}

    def _agent(self, name: str):
        h = self._handles.get(name)
        if h is None:
            h = ray.get_actor(self._names[name], namespace=self._namespace)
            self._handles[name] = h
        return h

    async def run(self, req: TaskRequest) -> TaskResult:
        """Answer one task: fan out, collect within the timeout, decide, trace."""
        strategy = get_strategy(req.strategy)  # fails fast on an unknown name
        t0 = time.perf_counter()

        def now_ms() -> float:
            return round((time.perf_counter() - t0) * 1000, 2)

        trace: list[TraceEvent] = []
        roles = {a.name: a.role for a in self.cfg.agents}
        gen_req = GenerateRequest(task=req.task, max_tokens=req.max_tokens, context=req.context)
        refs: dict[str, ray.ObjectRef] = {}
        candidates: dict[str, Candidate] = {}
        for name in roles:
            try:
                refs[name] = self._agent(name).generate.remote(gen_req)
            except ValueError as exc:  # the named actor is gone
                candidates[name] = Candidate(agent=name, role=roles[name], error=str(exc))
        trace.append(TraceEvent(step="fanout", at_ms=now_ms(), data={"agents": list(refs)}))

        async def collect(name: str, ref: ray.ObjectRef) -> Candidate:
            try:
                gen = await ref
                return Candidate(
                    agent=name,
                    role=roles[name],
                    text=gen.text.strip(),
                    normalized=normalize_answer(gen.text),
                    score=round(gen.mean_logprob, 4),
                    prompt_tokens=gen.prompt_tokens,
                    completion_tokens=gen.completion_tokens,
                    latency_ms=now_ms(),
                )
            except (RayTaskError, RayActorError, GetTimeoutError) as exc:
                return Candidate(agent=name, role=roles[name], error=_agent_error(exc), latency_ms=now_ms())

        tasks = {asyncio.ensure_future(collect(n, r)): n for n, r in refs.items()}
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.cfg.arbiter.agent_timeout_s)
        else:
            done, pending = set(), set()
        for t in done:
            c = t.result()
            candidates[c.agent] = c
        for t in pending:
            name = tasks[t]
            t.cancel()
            ray.cancel(refs[name])
            candidates[name] = Candidate(
                agent=name,
                role=roles[name],
                error=f"no answer within agent_timeout_s={self.cfg.arbiter.agent_timeout_s}",
                latency_ms=now_ms(),
            )
        ordered = [candidates[n] for n in roles]
        for c in ordered:
            trace.append(
                TraceEvent(
                    step="candidate" if c.ok else "agent_failed",
                    at_ms=c.latency_ms,
                    data={"agent": c.agent, "normalized": c.normalized, "score": c.score}
                    if c.ok
                    else {"agent": c.agent, "error": c.error},
                )
            )
        missing = [c.agent for c in ordered if not c.ok]
        decision = strategy.decide(ordered)
        trace.append(
            TraceEvent(
                step="decision",
                at_ms=now_ms(),
                data={
                    "strategy": strategy.name,
                    "winner": decision.answer_key,
                    "votes": decision.votes,
                    "ranking": decision.ranking,
                    **decision.details,
                },
            )
        )
        return TaskResult(
            id=req.id,
            answer=decision.answer,
            strategy=strategy.name,
            candidates=ordered,
            votes=decision.votes,
            latency_ms=now_ms(),
            missing_agents=missing,
            trace=trace,
        )

    async def agents(self) -> list[dict]:
        """Each agent's config, health and stats (health ``None`` if it did not answer)."""
        out = []
        for a in self.cfg.agents:
            entry = {"name": a.name, "role": a.role, "config": a.model_dump(mode="json")}
            try:
                h = self._agent(a.name)
                health, stats = await asyncio.wait_for(
                    asyncio.gather(h.health.remote(), h.stats.remote()), timeout=5.0
                )
                entry["health"] = health.model_dump()
                entry["stats"] = stats
            except Exception as exc:  # an agent that is dead or restarting
                entry["health"] = {"name": a.name, "loaded": False, "error": _agent_error(exc)}
                entry["stats"] = None
            out.append(entry)
        return out

    async def ready(self) -> bool:
        return all(e["health"]["loaded"] for e in await self.agents())
