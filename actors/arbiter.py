"""``ArbiterActor``: the Ray shell around ``legion.arbitration.arbiter.Arbiter``.

An async actor, so one Arbiter serves many tasks at once. It owns one ``AgentPool`` per agent
(every ingress replica reaches the agents through it), hands them to the Arbiter as
``RayAgents``, and runs the pools' autoscaling loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing

from actors.pool import AgentPool
from actors.remote import RayAgents
from legion import metrics
from legion.arbitration.admission import TaskAdmission
from legion.arbitration.arbiter import Arbiter, Event
from legion.config import LegionConfig
from legion.logging_setup import configure_logging
from legion.messages import CompletionRequest, Generation, TaskRequest, TaskResult

log = logging.getLogger(__name__)


class ArbiterActor:
    def __init__(self, config: dict, agent_actor_names: dict[str, str], namespace: str):
        self.cfg = LegionConfig(**config)
        configure_logging(self.cfg.log_level, self.cfg.log_format)  # this worker's log format
        # One pool of replicas per agent; every ingress replica reaches them through this Arbiter.
        self._pools = {
            a.name: AgentPool(self.cfg, a, agent_actor_names[a.name], namespace) for a in self.cfg.agents
        }
        # The embedding model (torch) loads only in equivalence: embedding, in the background from
        # the start; if it cannot load, answers group by the rules and the trace says why.
        wait = self.cfg.serve.max_queue_wait_s
        self._arbiter = Arbiter(
            self.cfg,
            RayAgents(self._pools),
            embedder=self._load_embedder,
            # Until it has measured tasks, one in flight per agent: a panel task keeps every agent busy.
            admission=TaskAdmission(wait, cold_limit=len(self.cfg.agents)) if wait > 0 else None,
        )
        if self.cfg.arbiter.equivalence == "embedding":  # load it while the agents load theirs
            threading.Thread(
                target=self._arbiter.load_equivalence_model, name="load-embedder", daemon=True
            ).start()
        self._autoscaler: asyncio.Task | None = None

    def _load_embedder(self):
        from legion.engine.embedding import Embedder

        return Embedder(threads=max(1, math.floor(self.cfg.arbiter.num_cpus)))

    def _ensure_autoscaler(self) -> None:
        if self._autoscaler is None or self._autoscaler.done():
            self._autoscaler = asyncio.get_running_loop().create_task(self._autoscale_loop())

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.arbiter.autoscale_interval_s)
            for name, pool in self._pools.items():
                try:
                    await asyncio.to_thread(pool.autoscale)
                    metrics.pool_size(name, pool.size)
                except Exception:  # autoscaling must never take the Arbiter down
                    log.exception("autoscaling agent %s failed", name)
            await self._report_health()

    async def _report_health(self) -> None:
        """Record whether each agent answers its health check with a loaded model
        (``legion_agent_up``, which the agent-down alert watches)."""

        async def loaded(pool: AgentPool) -> bool:
            try:
                return bool((await asyncio.wait_for(pool.health.remote(), timeout=5.0)).loaded)
            except Exception:  # dead, restarting, or not answering
                return False

        ups = await asyncio.gather(*(loaded(p) for p in self._pools.values()))
        for name, up in zip(self._pools, ups, strict=True):
            metrics.agent_up(name, up)

    async def run(self, req: TaskRequest) -> TaskResult:
        """``Arbiter.run``: the answer, or its errors (503 overloaded, 504 with the trace)."""
        self._ensure_autoscaler()
        return await self._arbiter.run(req)

    async def run_stream(self, req: TaskRequest) -> AsyncIterator[Event | TaskResult]:
        """``run`` as a Ray streaming generator (``.options(num_returns="streaming")``): each
        fan-out ``Candidate`` as it arrives, every other ``TraceEvent``, then the ``TaskResult``.
        Errors are ``run``'s, raised after the items already yielded; a cancelled caller stops
        the agents' work too."""
        self._ensure_autoscaler()
        async with aclosing(self._arbiter.stream(req)) as items:
            async for item in items:
                yield item

    async def agents(self) -> list[dict]:
        """``Arbiter.describe_agents``: each agent's config, pool, trust, health, stats."""
        self._ensure_autoscaler()
        return await self._arbiter.describe_agents()

    async def adaptation(self) -> dict | None:
        """``Arbiter.adaptation_summary``: where ``arbiter.adapt`` stands (None: off)."""
        return await asyncio.to_thread(self._arbiter.adaptation_summary)

    async def complete(self, agent: str, req: CompletionRequest) -> Generation:
        """``agent``'s completion of a raw prompt (``POST /v1/completions``), on the replica of
        its pool with the least work."""
        self._ensure_autoscaler()
        return await self._arbiter.agents.complete(agent, req)

    async def complete_stream(self, agent: str, req: CompletionRequest) -> AsyncIterator[str | Generation]:
        """``complete`` as a Ray streaming generator: the text as it is decoded, then the ``Generation``."""
        self._ensure_autoscaler()
        async with aclosing(self._arbiter.agents.complete_stream(agent, req)) as items:
            async for item in items:
                yield item

    async def ready(self) -> bool:
        return all(e["health"]["state"] == "ready" for e in await self.agents())
