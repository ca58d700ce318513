"""One real local Ray cluster and one real Legion app per test session.

The app runs the bundled GGUF model in real agent actors behind the real Serve HTTP proxy;
tests drive it with httpx and the ``openai`` client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

TEST_APP = "legiontest"


def stop_serve(proc) -> str:
    """Stop a ``legion serve`` subprocess as Ctrl+C would (SIGKILL after 120 s); its output."""
    proc.send_signal(signal.SIGINT)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    return log


def wait_healthy(url: str, limit_s: float = 300, *, transport_errors_ok: bool = False) -> None:
    """Poll ``url``/healthz until 200; fail after ``limit_s``. With ``transport_errors_ok`` a
    refused or dropped connection (a proxy restarting) counts as not healthy yet."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
                return
        except httpx.TransportError:
            if not transport_errors_ok:
                raise
        assert time.monotonic() < deadline, f"{url} never became healthy"
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster
    # Four logical CPUs on a 2-core machine: room for the extra apps some tests start. Agents
    # take their thread counts from their own num_cpus, so this changes placement, not threads.
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", namespace="legiontests")
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def legion_config(tmp_path_factory):
    from legion.config import config_from_dict

    return config_from_dict(
        {
            "agents": [
                {"name": "solver", "num_cpus": 0.6, "sampling": {"max_tokens": 16}},
                {
                    "name": "reasoner",
                    "role": "reasoner",
                    "role_prompt": "Answer with a short, factual answer.\n\n",
                    "num_cpus": 0.6,
                    "sampling": {"max_tokens": 16, "temperature": 0.3, "seed": 1},
                },
                {
                    "name": "critic",
                    "role": "critic",
                    "role_prompt": "Question: How many legs does a spider have?\nAnswer: eight\n\n",
                    "num_cpus": 0.6,
                    "sampling": {"max_tokens": 16, "temperature": 0.6, "seed": 2},
                },
            ],
            # Admission sheds by measured work; a slow CI host must not shed the tests' own bursts
            # (tests/unit/test_admission.py and the Locust run measure it).
            "serve": {
                "app_name": TEST_APP,
                "port": _free_port(),
                "max_replicas": 1,
                "max_tokens_limit": 64,
                "max_queue_wait_s": 600,
            },
            "arbiter": {"agent_timeout_s": 300},
            "data_dir": str(tmp_path_factory.mktemp("legion-data")),
        }
    )


@pytest.fixture(scope="session")
def legion_url(ray_cluster, legion_config):
    from ray import serve

    from serve_app import build_app

    cfg = legion_config
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix="/")
    url = f"http://127.0.0.1:{cfg.serve.port}"
    deadline = time.monotonic() + 300
    while True:
        r = httpx.get(f"{url}/healthz", timeout=30)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, f"agents never loaded: {r.text}"
        time.sleep(0.5)
    yield url
    from actors import stop_actors

    serve.delete(cfg.serve.app_name)
    stop_actors(cfg)


@pytest.fixture()
def client(legion_url):
    with httpx.Client(base_url=legion_url, timeout=300) as c:
        yield c
