"""Legion's metrics reach the Prometheus endpoint Ray exposes on the node."""

from __future__ import annotations

import re
import time

import httpx
import ray


def _metrics_text() -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_requests_tokens_and_arbitration_are_exported(client):
    r = client.post("/v1/tasks", json={"task": "Name a planet.", "max_tokens": 8, "cache": False})
    assert r.status_code == 200
    bad = client.post("/v1/tasks", json={"task": ""})
    assert bad.status_code == 422
    wanted = [
        ("ray_legion_requests_total", {"route": "/v1/tasks", "status": "200"}),
        ("ray_legion_requests_total", {"route": "/v1/tasks", "status": "422"}),
        ("ray_legion_request_latency_s_count", {"route": "/v1/tasks"}),
        ("ray_legion_tokens_generated_total", {}),
        ("ray_legion_arbitration_rounds_total", {"strategy": "plurality"}),
        ("ray_legion_agreement_rate_count", {"strategy": "plurality"}),
        ("ray_legion_batch_occupancy", {}),
        ("ray_legion_queue_depth", {}),
    ]
    deadline = time.monotonic() + 120  # Ray exports on an interval
    while True:
        text = _metrics_text()
        missing = [
            (n, lab)
            for n, lab in wanted
            if not re.search(rf"^{n}{{", text, re.M)
            or (lab and _value(text, n, **lab) <= 0 and not n.endswith(("occupancy", "depth")))
        ]
        if not missing:
            break
        assert time.monotonic() < deadline, f"never exported: {missing}"
        time.sleep(2)
    assert _value(text, "ray_legion_tokens_generated_total") > 0
