"""The start-up check and ``legion doctor`` on the real llama.cpp and the bundled model."""

from __future__ import annotations

import json
import subprocess
import sys

from legion.agent import Agent
from legion.config import AgentConfig
from legion.engine import preflight
from legion.engine.llama import bundled_model_path

SIGILL_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def test_the_check_loads_the_bundled_model_and_decodes_a_token():
    result = preflight.check_model(bundled_model_path())
    assert result.ok, result.message
    decoded = json.loads(result.output.splitlines()[-1])
    assert decoded["ok"] and decoded["text"] and "AVX2 = 1" in decoded["system_info"]
    # Whatever the host lists, the build Legion installs runs no AMX or AVX-512 kernels.
    assert "AMX_INT8 = 1" not in decoded["system_info"] and "AVX512 = 1" not in decoded["system_info"]


def test_an_agent_decodes_a_token_before_it_reports_ready():
    agent = Agent(AgentConfig(name="probe", n_ctx=256, n_parallel=2), load_in_background=False)
    health = agent.health()
    assert (health.state, health.loaded, health.error) == ("ready", True, None)
    assert agent.stats()["engine"]["tokens"] >= 1
    agent.engine().close()


def test_an_agent_whose_llama_cpp_dies_by_sigill_reports_failed_with_the_cause(monkeypatch):
    monkeypatch.setattr(preflight, "_child_command", lambda path: SIGILL_CHILD)
    agent = Agent(AgentConfig(name="doomed"), load_in_background=False)  # this process survives
    health = agent.health()
    assert health.state == "failed" and not health.loaded
    assert "SIGILL" in health.error and "legion.engine.llama_build --reinstall" in health.error


def test_an_agent_with_a_file_that_is_no_model_reports_failed(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model\n")
    health = Agent(AgentConfig(name="bad", model_path=str(bad)), load_in_background=False).health()
    assert health.state == "failed" and str(bad) in health.error and "exit status" in health.error


def test_legion_doctor_reports_the_build_cpu_and_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "legion_cli", "doctor", "--json"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    assert report["versions"]["llama-cpp-python"] == "0.3.36"
    assert "avx2" in report["cpu"]["flags"].split()
    assert "FMA = 1" in report["llama.cpp system info"]["features"]
    # One check per model of the default line-up (Gemma 3 270M and SmolLM2-135M-Instruct).
    checks = report["checks"]
    assert len(checks) == 2 and all(c["ok"] and "decoded" in c["detail"] for c in checks)

    cfg = tmp_path / "legion.yaml"
    cfg.write_text(f"agents:\n  - name: gone\n    model_path: {tmp_path / 'missing.gguf'}\n")
    bad = subprocess.run(
        [sys.executable, "-m", "legion_cli", "doctor", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1
    assert "[FAIL]" in bad.stdout and "missing.gguf does not exist" in bad.stdout
