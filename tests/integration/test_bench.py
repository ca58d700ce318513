"""`legion bench --json` runs every stage on the real model and prints the keys the README names.

Smallest settings (one 4-token generation per measure): this checks that the benchmark works
and reports what it claims to, never how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.integration.conftest import _free_port


def test_bench_prints_every_ratio_as_json():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", LEGION_BENCH_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "legion_cli", "bench", "--json", "--rounds", "1", "--repeats", "1"]
    cmd += ["--max-tokens", "4", "--http-requests", "2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = result["actor_vs_bare_tokens_per_s_ratio"]
    assert set(ratios) == {"1", "2", "3"} and all(r > 0 for r in ratios.values())
    for k in ("1", "2", "3"):
        d = result["tokens_per_s"][k]
        assert d["bare_tokens_per_s"] > 0 and d["actor_tokens_per_s"] > 0 and d["pairs"] == 1
    assert result["requests"] == 2
    assert result["http_p50_ms"] > 0 and result["direct_p50_ms"] > 0 and result["serve_noop_post_ms_p50"] > 0
    assert isinstance(result["http_overhead_ms_p50"], float)
    b = result["batching"]
    assert b["concurrency"] == 8 and b["agent_tokens_per_s"] > 0
    assert result["fanout8_vs_single_time_ratio"] == b["fanout8_vs_single_time_ratio"] > 0
    # The llama-server comparison is there exactly when llama-server is installed.
    if "llama_server_tokens_per_s" in b:
        assert result["batched_vs_llama_server_ratio"] == b["batched_vs_llama_server_ratio"] > 0
        assert b["pairs"] == 1 and len(b["pair_ratios"]) == 1 and b["llama_server_tokens_per_s"] > 0
        assert b["llama_server_fanout8_vs_single_time_ratio"] > 0
    else:
        assert "not installed" in b["llama_server"] and "batched_vs_llama_server_ratio" not in result
    p = result["prefix_cache"]
    assert 400 <= p["prefix_tokens"] <= 600 and p["requests"] == 4
    assert p["ttft_cached_ms_p50"] > 0 and p["ttft_uncached_ms_p50"] > 0
    assert result["ttft_cached_vs_uncached_ratio"] == p["ttft_cached_vs_uncached_ratio"] > 0
    # The cached engine reused the prefix for every measured request.
    assert p["tokens_reused"] >= p["requests"] * (p["prefix_tokens"] - 32)


def test_bench_prefix_cache_alone():
    cmd = [sys.executable, "-m", "legion_cli", "bench", "--prefix-cache", "--json", "--repeats", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    p = json.loads(out.stdout.strip().splitlines()[-1])["prefix_cache"]
    assert p["requests"] == 4 and p["ttft_cached_vs_uncached_ratio"] > 0


def test_bench_constrained_alone():
    cmd = [sys.executable, "-m", "legion_cli", "bench", "--constrained", "--json", "--repeats", "1"]
    cmd += ["--max-tokens", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    c = json.loads(out.stdout.strip().splitlines()[-1])["constrained"]
    assert c["pairs"] == 1 and c["sequences"] == 8 and c["max_tokens"] == 4
    assert c["free_tokens_per_s"] > 0 and c["constrained_tokens_per_s"] > 0
    assert c["constrained_vs_free_tokens_per_s_ratio"] == c["pair_ratios"][0] > 0
