"""Serving at scale on the real model: batching through the actor, backpressure, deadlines,
and agent pools that grow under load and shrink when idle."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from ray.exceptions import RayTaskError

from legion.messages import GenerateRequest, TaskRequest
from legion.service.api import new_id
from tests.integration.conftest import TEST_APP, wait_healthy

SCALE_APP = "legionscale"


def test_concurrent_calls_to_one_agent_equal_sequential_ones(legion_url, legion_config):
    solver = ray.get_actor(f"{TEST_APP}-agent-solver", namespace=legion_config.ray_namespace)
    reqs = [
        GenerateRequest(task=t, max_tokens=12) for t in ("Name a color.", "Name a river.", "Name a tree.")
    ]
    sequential = [ray.get(solver.generate.remote(r)).text for r in reqs]
    concurrent = [g.text for g in ray.get([solver.generate.remote(r) for r in reqs])]
    assert concurrent == sequential
    stats = ray.get(solver.stats.remote())["engine"]
    assert stats["free_cells"] > 0 and stats["steps"] > 0


def test_fanout_of_n_samples(legion_url, legion_config):
    solver = ray.get_actor(f"{TEST_APP}-agent-solver", namespace=legion_config.ray_namespace)
    gens = ray.get(solver.generate_n.remote(GenerateRequest(task="Name an animal.", max_tokens=8, n=4)))
    assert len(gens) == 4
    assert len({g.text for g in gens}) == 1  # the solver is greedy: every copy agrees


def test_task_past_its_timeout_is_504_with_the_trace(legion_url, legion_config):
    arbiter = ray.get_actor(f"{TEST_APP}-arbiter", namespace=legion_config.ray_namespace)
    req = TaskRequest(id=new_id(), task="Write a long story about the sea.", strategy="plurality",
                      max_tokens=64, timeout_s=0.05)  # fmt: skip
    with pytest.raises(RayTaskError) as err:
        ray.get(arbiter.run.remote(req))
    cause = err.value.cause
    assert cause.code.value == "timeout" and cause.http_status == 504
    assert cause.details["trace"][0]["step"] == "fanout"
    # The agents stopped decoding it: nothing stays in flight.
    solver = ray.get_actor(f"{TEST_APP}-agent-solver", namespace=legion_config.ray_namespace)
    deadline = time.monotonic() + 60
    while ray.get(solver.stats.remote())["in_flight"]:
        assert time.monotonic() < deadline, "the timed-out task kept an agent busy"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scale_app(legion_url, legion_config):
    from ray import serve

    from actors import stop_actors
    from legion.config import config_from_dict
    from serve_app import build_app

    cfg = config_from_dict(
        {
            "agents": [
                {
                    "name": "worker",
                    "num_cpus": 0.3,
                    "n_parallel": 2,
                    "max_queue": 0,
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_in_flight": 1,
                    "upscale_delay_s": 0,
                    "downscale_delay_s": 2,
                    "sampling": {"max_tokens": 48, "stop": []},
                }
            ],
            "arbiter": {"autoscale_interval_s": 0.5, "agent_timeout_s": 300},
            # The subject here is the agents' own bounds and the pools' autoscaling: admission
            # (tests/unit/test_admission.py, the Locust run) would shed these bursts first.
            "serve": {"app_name": SCALE_APP, "max_replicas": 1, "ingress_num_cpus": 0, "max_queue_wait_s": 0},
            "cache": {"enabled": False},
            "data_dir": legion_config.data_dir,
        }
    )
    serve.run(build_app(cfg), name=SCALE_APP, route_prefix=f"/{SCALE_APP}")
    url = f"{legion_url}/{SCALE_APP}"
    wait_healthy(url, 300)
    yield url
    serve.delete(SCALE_APP)
    stop_actors(cfg)
    for i in range(1, 3):
        try:
            ray.kill(ray.get_actor(f"{SCALE_APP}-agent-worker-{i}", namespace=cfg.ray_namespace))
        except ValueError:
            pass


def _burst(url: str, n: int) -> list[httpx.Response]:
    out: list[httpx.Response] = []

    def ask(i: int) -> None:
        with httpx.Client(timeout=300) as c:
            out.append(c.post(f"{url}/v1/tasks", json={"task": f"Count to ten, step {i}.", "max_tokens": 48}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_saturated_agents_answer_503_with_retry_after(scale_app):
    responses = _burst(scale_app, 8)
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, [r.text for r in responses]
    shed = [r for r in responses if r.status_code == 503]
    assert shed, "8 requests at once never filled 2 sequences with no queue"
    for r in shed:
        assert int(r.headers["Retry-After"]) >= 1
        assert "saturated" in r.json()["error"]["message"]
    assert 200 in codes


def test_pool_grows_under_load_and_shrinks_when_idle(scale_app):
    def replicas() -> int:
        agents = httpx.get(f"{scale_app}/v1/agents", timeout=60).json()["agents"]
        return len(agents[0]["pool"]["replicas"])

    deadline = time.monotonic() + 240
    while replicas() != 1:  # an earlier burst may have grown it: start from one replica
        assert time.monotonic() < deadline, "the pool never settled at one replica"
        time.sleep(0.5)
    grown = False
    while not grown:
        assert time.monotonic() < deadline, "the pool never grew under load"
        _burst(scale_app, 4)
        grown = replicas() == 2
    # The second replica serves once loaded; then, idle, the pool shrinks back.
    deadline = time.monotonic() + 240
    while replicas() != 1:
        assert time.monotonic() < deadline, "the pool never shrank when idle"
        time.sleep(0.5)
    events = httpx.get(f"{scale_app}/v1/agents", timeout=60).json()["agents"][0]["pool"]["scale_events"]
    assert [e["action"] for e in events][-2:] == ["up", "down"]


def test_identical_concurrent_requests_reach_the_agents_once(client, legion_url):
    def requests_done() -> dict[str, int]:
        return {a["name"]: a["stats"]["requests"] for a in client.get("/v1/agents").json()["agents"]}

    before = requests_done()
    task = f"What is the colour of snow? ({time.time_ns()})"  # new to the cache
    out: list[httpx.Response] = []

    def ask() -> None:
        with httpx.Client(base_url=legion_url, timeout=300) as c:
            out.append(c.post("/v1/tasks", json={"task": task, "max_tokens": 8}))

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [200] * 5
    assert len({r.json()["answer"] for r in out}) == 1
    assert len({r.json()["id"] for r in out}) == 5
    after = requests_done()
    assert all(after[name] - before[name] == 1 for name in before), (before, after)
