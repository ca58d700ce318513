"""The agents in this process, as the Arbiter reaches them (``legion.arbitration.arbiter.Agents``).

Serving reaches agents through Ray (``actors.remote.RayAgents``); an evaluation runs the same
``Arbiter`` over plain ``Agent`` objects here, so what it measures is the serving code path
minus the transport. ``LocalAgents`` can remember answers: a request it has answered before
(same agent, same request, so the same prompt, sampling and seed) is answered again from
memory, so that several strategies deciding over one fan-out pay for it once. It counts the
tokens every request would have cost, remembered or not: a strategy's budget is what it asks
for, not what the memory saved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from legion.agent import Agent
from legion.engine.llama import ScoredContinuation
from legion.messages import AgentHealth, ChoiceScores, GenerateRequest, Generation


class LocalAgents:
    """``Agents`` over in-process ``Agent`` objects, by name."""

    def __init__(self, agents: Mapping[str, Agent], remember: bool = True):
        self._agents = dict(agents)
        self._remember = remember
        self._generated: dict[tuple[str, str], Generation] = {}
        self._scored: dict[tuple[str, str, str, str, tuple[str, ...]], list[ScoredContinuation]] = {}

    def saturated(self) -> bool:
        return False

    async def status(self, agent: str) -> tuple[AgentHealth, dict]:
        a = self._agents[agent]
        return a.health(), a.stats()

    def pool_info(self, agent: str) -> dict:
        return {"replicas": 1, "min_replicas": 1, "max_replicas": 1, "in_process": True}

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        key = (agent, req.model_dump_json())
        gen = self._generated.get(key) if self._remember else None
        if gen is None:
            gen = await asyncio.to_thread(self._agents[agent].generate, req)
            if self._remember:
                self._generated[key] = gen
        return gen

    async def score(
        self, agent: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        key = (agent, view or "", task, context, tuple(continuations))
        got = self._scored.get(key) if self._remember else None
        if got is None:
            got = await asyncio.to_thread(self._agents[agent].score, task, context, continuations, None, view)
            if self._remember:
                self._scored[key] = got
        return got

    async def score_choices(
        self, agent: str, task: str, choices: list[str], members: list[str], context: str = ""
    ) -> list[ChoiceScores]:
        return await asyncio.to_thread(self._agents[agent].score_choices, task, choices, members, context)
