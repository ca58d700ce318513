"""Thin Ray actor shells over Legion's plain classes, and the helpers that place them.

Actors are named ``<app>-agent-<name>`` and ``<app>-arbiter`` in the config's Ray namespace,
so ``ray list actors`` and the dashboard show which is which, and every ingress replica
finds the same ones (``get_if_exists``).
"""

from __future__ import annotations

import ray
from ray.exceptions import RaySystemError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.agent import AgentActor
from actors.arbiter import ArbiterActor
from actors.retriever import retriever_actor_name
from legion.config import AgentConfig, LegionConfig

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


def agent_actor_name(cfg: LegionConfig, agent: str) -> str:
    return f"{cfg.serve.app_name}-agent-{agent}"


def arbiter_actor_name(cfg: LegionConfig) -> str:
    return f"{cfg.serve.app_name}-arbiter"


# Placement on a multi-node cluster (cfg.placement, agents[].resources).


def agent_group_name(cfg: LegionConfig) -> str:
    return f"{cfg.ray_namespace}-{cfg.serve.app_name}-agents"


def _agent_bundle(agent: AgentConfig) -> dict[str, float]:
    bundle = {"CPU": agent.num_cpus, **agent.resources}
    if agent.num_gpus:
        bundle["GPU"] = agent.num_gpus
    return bundle


def _find_group(name: str) -> PlacementGroup | None:
    # Placement group names live in the creating job's namespace (Serve replicas run in
    # "serve"), so look the group up in the whole table rather than by name.
    for pg_id, info in placement_group_table().items():
        if info.get("name") == name and info.get("state") != "REMOVED":
            return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
    return None


def _agent_group(cfg: LegionConfig) -> PlacementGroup:
    """The detached placement group holding one bundle per agent (created on first use)."""
    name = agent_group_name(cfg)
    group = _find_group(name)
    if group is not None:
        return group
    bundles = [_agent_bundle(a) for a in cfg.agents]
    try:
        # Detached: the group outlives the ingress replica that happened to create it.
        return placement_group(bundles, strategy=cfg.placement.strategy, name=name, lifetime="detached")
    except RaySystemError:  # another replica created it first
        group = _find_group(name)
        if group is None:
            raise
        return group


def agent_placement(cfg: LegionConfig, agent: AgentConfig) -> dict:
    """Ray actor options that place ``agent``: its custom resources and scheduling strategy.

    The actor waits (pending, reported as not loaded) until a node offers what it needs.
    """
    opts: dict = {"resources": dict(agent.resources)} if agent.resources else {}
    if cfg.placement.group:
        index = [a.name for a in cfg.agents].index(agent.name)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            _agent_group(cfg), placement_group_bundle_index=index
        )
    elif cfg.placement.strategy == "SPREAD":
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def start_agent(cfg: LegionConfig, agent: AgentConfig, *, name: str | None = None, extra: bool = False):
    """Create (or find) the named, detached actor for ``agent``; it loads its model itself.

    ``extra`` marks a replica an agent pool adds: it keeps the agent's custom resources but not
    its placement-group bundle, which the first replica holds.
    """
    placement = ({"resources": dict(agent.resources)} if agent.resources else {}) if extra else None
    return (
        ray.remote(AgentActor)
        .options(
            name=name or agent_actor_name(cfg, agent.name),
            namespace=cfg.ray_namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=agent.num_cpus,
            num_gpus=agent.num_gpus,
            max_restarts=agent.max_restarts,
            max_task_retries=0,
            # Every waiting call holds a thread: running sequences, the queue, and health checks.
            max_concurrency=agent.n_parallel + agent.max_queue + 4,
            **(agent_placement(cfg, agent) if placement is None else placement),
        )
        .remote(agent.model_dump(mode="json"))
    )


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
    group = _find_group(agent_group_name(cfg))
    if group is not None:
        remove_placement_group(group)
        killed.append(agent_group_name(cfg))
    return killed
