"""The README's run command (`legion serve`, `legion ask`) and the Serve config file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.integration.conftest import _free_port, stop_serve

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_file_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    import serve_app

    data = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema(**data)
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    assert getattr(__import__(module), attr) is serve_app.app
    from ray.serve import Application

    assert isinstance(serve_app.app(app.args), Application)


def test_legion_serve_and_ask_end_to_end(tmp_path):
    port = _free_port()
    cfg = tmp_path / "legion.yaml"
    cfg.write_text(
        "agents:\n"
        "  - name: solo\n    num_cpus: 1.0\n    sampling: {max_tokens: 8}\n"
        f"serve:\n  port: {port}\n  app_name: clitest\n  max_replicas: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    legion = [sys.executable, "-m", "legion_cli"]
    proc = subprocess.Popen(
        [*legion, "serve", "--config", str(cfg), "--no-dashboard"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "legion serve never became healthy"
            time.sleep(1)
        out = subprocess.run(
            [*legion, "ask", "What is the capital of France?", "--url", url],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "solo" in out.stdout and "plurality" in out.stdout
        bad = subprocess.run(
            [*legion, "ask", "hi", "--url", url, "--strategy", "nope"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bad.returncode == 1 and "unknown strategy" in bad.stderr
    finally:
        log = stop_serve(proc)
    assert f"serving at {url}" in log
    assert proc.returncode == 0, log


def test_bad_config_fails_at_start_naming_the_field(tmp_path):
    cfg = tmp_path / "legion.yaml"
    cfg.write_text("agents:\n  - name: a\n    num_cpus: 500\n")
    out = subprocess.run(
        [sys.executable, "-m", "legion_cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "agents.0.num_cpus" in out.stderr and "256" in out.stderr
