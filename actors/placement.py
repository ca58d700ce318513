"""Where agent actors land and how one starts: the actor names, the placement group and
scheduling options from ``cfg.placement`` and ``agents[].resources``, and ``start_agent``.
Agent pools (``actors.pool``) start their extra replicas through it.
"""

from __future__ import annotations

import ray
from ray.exceptions import RaySystemError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.agent import AgentActor
from legion.config import AgentConfig, LegionConfig


def agent_actor_name(cfg: LegionConfig, agent: str) -> str:
    return f"{cfg.serve.app_name}-agent-{agent}"


# Placement on a multi-node cluster (cfg.placement, agents[].resources).


def agent_group_name(cfg: LegionConfig) -> str:
    return f"{cfg.ray_namespace}-{cfg.serve.app_name}-agents"


def _agent_bundle(agent: AgentConfig) -> dict[str, float]:
    bundle = {"CPU": agent.num_cpus, **agent.resources}
    if agent.num_gpus:
        bundle["GPU"] = agent.num_gpus
    return bundle


def find_agent_group(name: str) -> PlacementGroup | None:
    # Placement group names live in the creating job's namespace (Serve replicas run in
    # "serve"), so look the group up in the whole table rather than by name.
    for pg_id, info in placement_group_table().items():
        if info.get("name") == name and info.get("state") != "REMOVED":
            return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
    return None


def _agent_group(cfg: LegionConfig) -> PlacementGroup:
    """The detached placement group holding one bundle per agent (created on first use)."""
    name = agent_group_name(cfg)
    group = find_agent_group(name)
    if group is not None:
        return group
    bundles = [_agent_bundle(a) for a in cfg.agents]
    try:
        # Detached: the group outlives the ingress replica that happened to create it.
        return placement_group(bundles, strategy=cfg.placement.strategy, name=name, lifetime="detached")
    except RaySystemError:  # another replica created it first
        group = find_agent_group(name)
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
