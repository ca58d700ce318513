"""``AgentActor``: the Ray shell around one ``legion.agent.Agent`` (one llama.cpp model).

A threaded actor: each call waits on the engine's scheduler, which decodes the concurrent
calls together in one batch; ``health`` and ``stats`` answer meanwhile. The model is built
inside the actor and never pickled.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

from legion import metrics
from legion.agent import Agent
from legion.config import AgentConfig
from legion.logging_setup import configure_logging, log_context
from legion.messages import AgentHealth, ChoiceScores, CompletionRequest, GenerateRequest, Generation

log = logging.getLogger(__name__)


def _cancelled() -> bool:
    """Whether the caller cancelled the actor call running on this thread: ``ray.cancel`` on a
    threaded actor's running call sets a flag the call reads here. The Arbiter cancels a call
    past its agent timeout or its task's deadline, or when the task's client goes away."""
    try:
        return ray.get_runtime_context().is_canceled()
    except Exception:  # not inside an actor call: nothing can cancel it
        return False


class AgentActor:
    def __init__(self, config: dict):
        configure_logging()  # this worker process's log format (LEGION_LOG_FORMAT)
        self._agent = Agent(AgentConfig(**config))
        # Metrics are tagged with the replica's actor name, so replicas of one agent differ.
        self._tag = ray.get_runtime_context().get_actor_name() or self._agent.cfg.name
        threading.Thread(target=self._report_engine, name="metrics", daemon=True).start()

    def _report_engine(self) -> None:
        while True:
            stats = self._agent.stats().get("engine")
            if stats:
                metrics.engine_state(self._tag, stats)
            time.sleep(2.0)

    def _logged(self, req: GenerateRequest | CompletionRequest, call):
        # Every line logged while generating carries the HTTP request's id and this agent's name.
        t0 = time.perf_counter()
        with log_context(request_id=req.request_id, agent=self._agent.cfg.name):
            out = call()
            ms = round((time.perf_counter() - t0) * 1000, 2)
            log.info("generate done", extra={"latency_ms": ms})
        return out

    def generate(self, req: GenerateRequest, load_timeout_s: float = 120.0) -> Generation:
        return self.generate_n(req.model_copy(update={"n": 1}), load_timeout_s)[0]

    def generate_n(self, req: GenerateRequest, load_timeout_s: float = 120.0) -> list[Generation]:
        gens = self._logged(
            req, lambda: self._agent.generate_n(req, timeout_s=load_timeout_s, cancelled=_cancelled)
        )
        metrics.tokens_generated(self._tag, sum(g.completion_tokens for g in gens))
        return gens

    def complete(self, req: CompletionRequest, load_timeout_s: float = 120.0) -> Generation:
        gen = self._logged(
            req, lambda: self._agent.complete(req, timeout_s=load_timeout_s, cancelled=_cancelled)
        )
        metrics.tokens_generated(self._tag, gen.completion_tokens)
        return gen

    def complete_stream(self, req: CompletionRequest, load_timeout_s: float = 120.0):
        """``complete`` as a Ray streaming generator (``.options(num_returns="streaming")``):
        the text piece by piece as it is decoded, then the ``Generation``."""
        with log_context(request_id=req.request_id, agent=self._agent.cfg.name):
            for item in self._agent.complete_stream(req, timeout_s=load_timeout_s, cancelled=_cancelled):
                if isinstance(item, Generation):
                    metrics.tokens_generated(self._tag, item.completion_tokens)
                yield item

    def score(
        self,
        task: str,
        context: str,
        continuations: list[str],
        view: str | None = None,
        load_timeout_s: float = 120.0,
    ):
        return self._agent.score(
            task, context, continuations, timeout_s=load_timeout_s, view=view, cancelled=_cancelled
        )

    def score_choices(
        self,
        task: str,
        choices: list[str],
        members: list[str] | None = None,
        context: str = "",
        load_timeout_s: float = 120.0,
    ) -> list[ChoiceScores]:
        return self._agent.score_choices(
            task, choices, members, context, timeout_s=load_timeout_s, cancelled=_cancelled
        )

    def health(self) -> AgentHealth:
        h = self._agent.health()
        h.node_id = ray.get_runtime_context().get_node_id()
        h.pid = os.getpid()
        return h

    def stats(self) -> dict:
        return self._agent.stats()

    def config(self) -> dict:
        return self._agent.cfg.model_dump(mode="json")

    def wait_loaded(self, timeout_s: float = 300.0) -> AgentHealth:
        """Block until the model has loaded (or failed to); returns the health."""
        self._agent.wait_loaded(timeout_s)
        return self.health()
