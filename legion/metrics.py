"""Legion's Prometheus metrics, recorded through Ray's metrics system.

Ray exports them from every node's metrics agent (the Prometheus endpoint Ray exposes, and the
Ray dashboard's metrics view), named ``ray_legion_*``. Each process creates its metric objects
on first use; outside a Ray worker or driver every function here is a no-op, so the plain core
stays usable without Ray.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
_RATIO_BOUNDARIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

_lock = threading.Lock()
_metrics: dict[str, Any] = {}

_DEFS = {
    "requests": ("counter", "legion_requests", "HTTP requests by route and status.", ("route", "status")),
    "latency": (
        "histogram",
        "legion_request_latency_s",
        "HTTP request latency in seconds.",
        ("route",),
        _LATENCY_BOUNDARIES_S,
    ),
    "tokens": ("counter", "legion_tokens_generated", "Completion tokens generated.", ("agent",)),
    "tokens_per_s": (
        "gauge",
        "legion_agent_tokens_per_s",
        "Decode tokens/s of an agent replica.",
        ("agent",),
    ),
    "occupancy": (
        "gauge",
        "legion_batch_occupancy",
        "Mean sequences per decode step of an agent replica.",
        ("agent",),
    ),
    "active": ("gauge", "legion_active_sequences", "Sequences being decoded now.", ("agent",)),
    "queue": ("gauge", "legion_queue_depth", "Requests waiting for a free sequence.", ("agent",)),
    "queue_limit": (
        "gauge",
        "legion_queue_limit",
        "Requests an agent replica lets wait (max_queue) before answering 503.",
        ("agent",),
    ),
    "cache": ("counter", "legion_cache_lookups", "Result cache lookups by outcome.", ("outcome",)),
    "tasks": ("counter", "legion_arbitrated_tasks", "Tasks the Arbiter decided, by strategy.", ("strategy",)),
    "rounds": (
        "counter",
        "legion_arbitration_rounds",
        "Rounds of agent calls per arbitrated task, by strategy.",
        ("strategy",),
    ),
    "agreement": (
        "histogram",
        "legion_agreement_rate",
        "Share of answering agents whose first answer matched the decision.",
        ("strategy",),
        _RATIO_BOUNDARIES,
    ),
    "member_votes": (
        "counter",
        "legion_member_votes",
        "Panel members' first answers by whether they matched the decision (agreed, disagreed, failed).",
        ("agent", "view", "outcome"),
    ),
    "agents_asked": (
        "histogram",
        "legion_agents_asked",
        "Panel members (views of agents) a task's first round asked, by fanout (all, adaptive).",
        ("fanout",),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0],
    ),
    "agents_skipped": (
        "counter",
        "legion_agents_skipped",
        "Panel members adaptive fan-out did not ask because the vote was settled.",
        (),
    ),
    "replicas": ("gauge", "legion_agent_replicas", "Replicas in an agent's pool.", ("agent",)),
    "up": (
        "gauge",
        "legion_agent_up",
        "1 if the agent answered its last health check with a loaded model, else 0.",
        ("agent",),
    ),
}


def _get(key: str):
    import ray

    if not ray.is_initialized():
        return None
    with _lock:
        m = _metrics.get(key)
        if m is not None:
            return m
        from ray.util import metrics as rm

        kind, name, desc, tags, *rest = _DEFS[key]
        if kind == "counter":
            m = rm.Counter(name, description=desc, tag_keys=tags)
        elif kind == "gauge":
            m = rm.Gauge(name, description=desc, tag_keys=tags)
        else:
            m = rm.Histogram(name, description=desc, boundaries=rest[0], tag_keys=tags)
        _metrics[key] = m
        return m


def _record(key: str, value: float, **tags: str) -> None:
    try:
        m = _get(key)
        if m is None:
            return
        kind = _DEFS[key][0]
        if kind == "counter":
            if value > 0:
                m.inc(value, tags=tags)
        elif kind == "gauge":
            m.set(value, tags=tags)
        else:
            m.observe(value, tags=tags)
    except Exception:  # metrics must never cost a request
        log.debug("metric %s not recorded", key, exc_info=True)


def request_done(route: str, status: int, latency_s: float) -> None:
    _record("requests", 1, route=route, status=str(status))
    _record("latency", latency_s, route=route)


def tokens_generated(agent: str, n: int) -> None:
    _record("tokens", n, agent=agent)


def engine_state(agent: str, stats: dict) -> None:
    """Gauges from ``LlamaEngine.stats()`` of one replica."""
    _record("tokens_per_s", float(stats.get("tokens_per_s", 0.0)), agent=agent)
    _record("occupancy", float(stats.get("mean_batch_occupancy", 0.0)), agent=agent)
    _record("active", float(stats.get("active_seqs", 0)), agent=agent)
    _record("queue", float(stats.get("queue_depth", 0)), agent=agent)
    if "max_queue" in stats:
        _record("queue_limit", float(stats["max_queue"]), agent=agent)


def cache_lookup(hit: bool) -> None:
    _record("cache", 1, outcome="hit" if hit else "miss")


def arbitration(strategy: str, rounds: int, agreement: float | None) -> None:
    """One decided task: its rounds, and the agreement (``None`` when no agent answered)."""
    _record("tasks", 1, strategy=strategy)
    _record("rounds", rounds, strategy=strategy)
    if agreement is not None:
        _record("agreement", agreement, strategy=strategy)


def agents_asked(fanout: str, asked: int, panel: int) -> None:
    """One task's first round: how many members it asked, and (adaptive) how many it skipped."""
    _record("agents_asked", asked, fanout=fanout)
    if panel > asked:
        _record("agents_skipped", panel - asked)


def member_votes(outcomes: dict[str, str]) -> None:
    """Each panel member's outcome in one decided task (``agreed``, ``disagreed``, ``failed``),
    by agent and view (a member ``<agent>/<view>``; an agent without views is its own view)."""
    for member, outcome in outcomes.items():
        agent, _, view = member.partition("/")
        _record("member_votes", 1, agent=agent, view=view or agent, outcome=outcome)


def pool_size(agent: str, replicas: int) -> None:
    _record("replicas", float(replicas), agent=agent)


def agent_up(agent: str, up: bool) -> None:
    _record("up", 1.0 if up else 0.0, agent=agent)
