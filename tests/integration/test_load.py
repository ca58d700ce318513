"""A short headless Locust run against the real app: the public API holds without failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_locust_run_has_no_failures(legion_url, tmp_path):
    sys.path.insert(0, str(ROOT / "loadtests"))
    from run import agent_tokens, summarize

    before = agent_tokens(legion_url)
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
         "-u", "8", "-r", "4", "-t", "15s", "--host", legion_url, "--csv", str(tmp_path / "locust"),
         "--only-summary"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "LEGION_THINK_S": "0.1,0.5", "LEGION_MAX_TOKENS": "8"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    line, failures = summarize(tmp_path / "locust_stats.csv", 8)
    assert failures == 0, line
    requests = int(line.split("requests=")[1].split()[0])
    assert requests > 0, line
    assert agent_tokens(legion_url) > before  # novel tasks reached the agents and were counted
    # Every kind of request in the mix was exercised.
    for route in ("/v1/tasks (repeated)", "/v1/chat/completions (stream)"):
        assert route in line, line
