"""``AgentActor``: the Ray shell around one ``legion.agent.Agent`` (one llama.cpp model).

A threaded actor: ``health`` and ``stats`` answer while a generation runs; the engine's own
lock serialises access to the model, which is built inside the actor and never pickled.
"""

from __future__ import annotations

import os

import ray

from legion.agent import Agent
from legion.config import AgentConfig
from legion.messages import AgentHealth, GenerateRequest, Generation


class AgentActor:
    def __init__(self, config: dict):
        self._agent = Agent(AgentConfig(**config))

    def generate(self, req: GenerateRequest, load_timeout_s: float = 120.0) -> Generation:
        return self._agent.generate(req, timeout_s=load_timeout_s)

    def score(self, context: str, continuations: list[str], load_timeout_s: float = 120.0):
        return self._agent.score(context, continuations, timeout_s=load_timeout_s)

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
