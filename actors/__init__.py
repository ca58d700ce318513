"""Thin Ray actor shells over Legion's plain classes, and the helpers that place them.

Actors are named ``<app>-agent-<name>`` and ``<app>-arbiter`` in the config's Ray namespace,
so ``ray list actors`` and the dashboard show which is which, and every ingress replica
finds the same ones (``get_if_exists``).
"""

from __future__ import annotations

import ray
from ray.util.placement_group import remove_placement_group

from actors.agent import AgentActor
from actors.arbiter import ArbiterActor
from actors.placement import (
    agent_actor_name,
    agent_group_name,
    agent_placement,
    find_agent_group,
    start_agent,
)
from actors.retriever import retriever_actor_name
from legion.config import LegionConfig

__all__ = [
    "AgentActor",
    "ArbiterActor",
    "agent_actor_name",
    "agent_group_name",
    "agent_placement",
    "arbiter_actor_name",
    "start_agent",
    "start_arbiter",
    "stop_actors",
]


def arbiter_actor_name(cfg: LegionConfig) -> str:
    return f"{cfg.serve.app_name}-arbiter"


def start_arbiter(cfg: LegionConfig):
    """Create (or find) every agent actor and the Arbiter; returns the Arbiter's handle."""
    names = {}
    for a in cfg.agents:
        start_agent(cfg, a)
        names[a.name] = agent_actor_name(cfg, a.name)
    return (
        ray.remote(ArbiterActor)
        .options(
            name=arbiter_actor_name(cfg),
            namespace=cfg.ray_namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=cfg.arbiter.num_cpus,
            max_restarts=-1,
            max_concurrency=cfg.arbiter.max_concurrency,
        )
        .remote(cfg.model_dump(mode="json"), names, cfg.ray_namespace)
    )


def stop_actors(cfg: LegionConfig) -> list[str]:
    """Kill the Arbiter, retriever and agent actors of ``cfg``'s app; returns the names it killed."""
    killed = []
    names = [arbiter_actor_name(cfg), retriever_actor_name(cfg)]
    for name in names + [agent_actor_name(cfg, a.name) for a in cfg.agents]:
        try:
            ray.kill(ray.get_actor(name, namespace=cfg.ray_namespace), no_restart=True)
            killed.append(name)
        except ValueError:
            pass
    group = find_agent_group(agent_group_name(cfg))
    if group is not None:
        remove_placement_group(group)
        killed.append(agent_group_name(cfg))
    return killed
