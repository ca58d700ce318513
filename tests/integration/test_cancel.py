"""Cancellation through Ray: a call the Arbiter cancels (``ray.cancel`` on its object ref, as
``RayAgents`` does past an agent timeout, a task's deadline or a gone client) stops its decode
inside the agent actor, and the engine's sequences are free again. The real actor, the real
engine on the bundled model."""

from __future__ import annotations

import time

import pytest

from actors.placement import start_agent
from legion.config import config_from_dict
from legion.errors import Cancelled
from legion.messages import GenerateRequest


def _engine_stats(ray, handle) -> dict:
    return ray.get(handle.stats.remote()).get("engine") or {}


def _until(ray, handle, ok, what: str, limit_s: float = 300) -> dict:
    """Poll the agent's engine counters until ``ok`` holds (a safety bound, not a timing claim)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        st = _engine_stats(ray, handle)
        if st and ok(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"{what}: the engine never got there: {_engine_stats(ray, handle)}")


def test_a_call_cancelled_by_its_caller_stops_its_decode_in_the_agent(ray_cluster, tmp_path):
    ray = ray_cluster
    cfg = config_from_dict(
        {"agents": [{"name": "cancelme", "n_ctx": 1024, "num_cpus": 0.5}], "data_dir": str(tmp_path)}
    )
    handle = start_agent(cfg, cfg.agents[0], name="legion-test-cancelme")
    try:
        assert ray.get(handle.wait_loaded.remote()).loaded
        req = GenerateRequest(task="Tell a long story about a dragon and a knight.", max_tokens=400)
        ref = handle.generate_n.remote(req)
        _until(ray, handle, lambda st: st["active_seqs"] >= 1, "decoding")
        ray.cancel(ref)
        # Ray's own error, or the agent's Cancelled when the call saw the flag first.
        with pytest.raises((ray.exceptions.TaskCancelledError, Cancelled)):
            ray.get(ref)
        st = _until(
            ray, handle, lambda st: st["cancelled"] == 1 and st["active_seqs"] == 0, "the decode stopped"
        )
        assert st["free_seqs"] == cfg.agents[0].n_parallel and st["tokens"] < 400
        # The agent serves on as before.
        (g,) = ray.get(handle.generate_n.remote(GenerateRequest(task="Say hello.", max_tokens=4)))
        assert g.completion_tokens >= 1
    finally:
        ray.kill(handle)
