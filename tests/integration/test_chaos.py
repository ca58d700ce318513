"""Fault tolerance under load: agents killed at random, the Arbiter killed, an ingress replica
killed. Every request gets an answer or a clear error, and the audit log holds each one.

These tests run their own Serve app (``/chaos``, own actors that restart without limit) on the
session's cluster, so the kills never touch the session app the other tests use.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time

import httpx
import pytest
import ray

from legion.service.audit import AuditLog
from tests.integration.conftest import wait_healthy

pytestmark = pytest.mark.chaos

log = logging.getLogger(__name__)

CHAOS_APP = "legionchaos"
PREFIX = "/chaos"
CHAOS_S = float(os.environ.get("LEGION_CHAOS_S", "20"))
KILL_EVERY_S = float(os.environ.get("LEGION_CHAOS_KILL_EVERY_S", "3"))
CLEAR_ERRORS = {503, 504}  # NOT_READY / NO_CANDIDATES / TIMEOUT: JSON bodies that say what to do


@pytest.fixture(scope="module")
def chaos(legion_url, legion_config):
    from ray import serve

    from legion.config import AgentConfig, config_from_dict
    from serve_app import build_app

    agent = {
        "num_cpus": 0.05,  # the session's agents hold the cores; these share them
        "n_ctx": 512,
        "n_parallel": 2,
        "max_restarts": -1,
        "sampling": {"max_tokens": 4},
    }
    if "max_replicas" in AgentConfig.model_fields:
        agent["max_replicas"] = 1  # kill the agents, not a pool that grows around them
    data = legion_config.model_dump(mode="json")
    data["agents"] = [{"name": "alpha", **agent}, {"name": "beta", **agent, "role_prompt": "Be brief.\n\n"}]
    data["serve"].update(app_name=CHAOS_APP, ingress_num_cpus=0)
    data["arbiter"].update(agent_timeout_s=60, num_cpus=0)
    data["security"] = {"audit_file": "chaos-audit.db"}
    cfg = config_from_dict(data)
    serve.run(build_app(cfg), name=CHAOS_APP, route_prefix=PREFIX)
    url = f"{legion_url}{PREFIX}"
    wait_healthy(url, transport_errors_ok=True)
    yield url, cfg, AuditLog(cfg.data_path / "chaos-audit.db")
    from actors import stop_actors

    serve.delete(CHAOS_APP)
    stop_actors(cfg)
    for a in _named(f"{CHAOS_APP}-agent-"):  # pool replicas too
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)


def _named(prefix: str) -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _ask(url: str, i: int, max_tokens: int = 4) -> httpx.Response:
    body = {"task": f"Name a number bigger than {i}.", "max_tokens": max_tokens, "cache": False}
    return httpx.post(f"{url}/v1/tasks", json=body, timeout=300)


def _clear(r: httpx.Response) -> bool:
    """An answer, or an error a client can act on (status, JSON message)."""
    if r.status_code == 200:
        return "answer" in r.json()
    return r.status_code in CLEAR_ERRORS and bool(r.json()["error"]["message"])


def _assert_audited(audit: AuditLog, responses: list[httpx.Response]) -> None:
    for r in responses:
        entry = audit.find(r.headers["x-request-id"])
        assert entry is not None and entry.status == r.status_code, (r.status_code, r.text[:200])


def _wait_in_flight(limit_s: float = 120) -> None:
    """Until some agent of the chaos app is generating."""
    agents = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in _named(f"{CHAOS_APP}-agent-")]
    deadline = time.monotonic() + limit_s
    while True:
        for h in agents:
            try:
                if ray.get(h.stats.remote(), timeout=10)["in_flight"] > 0:
                    return
            except Exception:  # a restarting agent: look at the others
                pass
        assert time.monotonic() < deadline, "no task ever reached an agent"
        time.sleep(0.02)


def test_random_agent_kills_every_task_answered_or_clear(chaos):
    url, _, audit = chaos
    rng = random.Random(6)
    responses: list[httpx.Response] = []
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                r = _ask(url, i)
            except httpx.TransportError as exc:  # a dropped connection is not a clear error
                with lock:
                    failures.append(f"transport: {exc!r}")
                continue
            with lock:
                responses.append(r)
            i += 2

    clients = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in clients:
        t.start()
    kills: list[str] = []
    t_end = time.monotonic() + CHAOS_S
    try:
        while time.monotonic() < t_end:
            time.sleep(KILL_EVERY_S)
            victim = rng.choice(_named(f"{CHAOS_APP}-agent-"))
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
            kills.append(victim["name"])
    finally:
        stop.set()
        for t in clients:
            t.join()

    statuses = [r.status_code for r in responses]
    missing = sum(1 for r in responses if r.status_code == 200 and r.json()["missing_agents"])
    log.warning(
        "chaos: %d kills in %.0f s, %d requests: %d answered (%d with agents missing), %d clear errors, "
        "%d other failures",
        len(kills),
        CHAOS_S,
        len(responses),
        statuses.count(200),
        missing,
        sum(1 for s in statuses if s in CLEAR_ERRORS),
        len(failures),
    )
    assert failures == []
    assert [(r.status_code, r.text[:200]) for r in responses if not _clear(r)] == []
    assert len(kills) >= 3 and len(responses) >= len(kills)
    assert missing >= 1  # kills landed on work in flight, and the answers came without those agents
    _assert_audited(audit, responses)
    wait_healthy(url, transport_errors_ok=True)  # every agent restarted, reloaded its model and rejoined
    r = _ask(url, 10_000)
    assert r.status_code == 200 and r.json()["missing_agents"] == []


@pytest.mark.parametrize("restarts", [True, False], ids=["restarted", "gone"])
def test_arbiter_killed_mid_request_loses_no_request(chaos, restarts):
    """The ingress sends the task again once the Arbiter is back (or re-creates a gone one)."""
    url, cfg, audit = chaos
    from actors import arbiter_actor_name

    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", _ask(url, 1, max_tokens=48)))
    t.start()
    _wait_in_flight()
    arbiter = ray.get_actor(arbiter_actor_name(cfg), namespace=cfg.ray_namespace)
    ray.kill(arbiter, no_restart=not restarts)
    t.join()
    r = out["r"]
    assert r.status_code == 200, r.text
    assert r.json()["answer"] is not None
    resent = next(e for e in r.json()["trace"] if e["step"] == "arbiter_restarted")
    assert resent["data"]["resent"] >= 1
    after = _ask(url, 2)
    assert after.status_code == 200, after.text
    _assert_audited(audit, [r, after])


def test_replica_killed_under_load_fails_requests_at_most_once(chaos):
    url, _, _ = chaos
    replicas = _named(f"SERVE_REPLICA::{CHAOS_APP}#")
    assert len(replicas) == 1
    first: dict[int, httpx.Response | Exception] = {}

    def send(i: int) -> None:
        try:
            first[i] = _ask(url, 100 + i, max_tokens=32)
        except httpx.TransportError as exc:
            first[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    _wait_in_flight()
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    for t in threads:
        t.join()
    failed = [i for i, r in first.items() if isinstance(r, Exception) or r.status_code != 200]
    log.warning("replica kill: %d of %d requests in flight failed: %s", len(failed), len(first), first)
    # The one retry each failed request gets succeeds (Serve replaces the replica meanwhile).
    for i in failed:
        retry = _ask(url, 100 + i)
        assert retry.status_code == 200, retry.text
    later = [_ask(url, 200 + i) for i in range(2)]
    assert [r.status_code for r in later] == [200, 200]
    assert _named(f"SERVE_REPLICA::{CHAOS_APP}#") != replicas
