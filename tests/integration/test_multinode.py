"""Legion on a real multi-node Ray cluster started on this machine with ``ray start``.

A head node and a second node that offers a custom resource (``legion_node_b``) are separate
``ray start --block`` processes with their own ports and temp dir, so they never touch the
test session's cluster. ``legion serve`` joins them through ``RAY_ADDRESS``. The test checks
that agents land where their resources say, that a task is answered, that Legion keeps
answering from the head when the second node is stopped (the agents that lived there are
reported missing), and that an agent not pinned to the lost node restarts on a node that
joins later. A second test runs the placement-group path on the session's cluster.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.integration.conftest import _free_port

RAY = str(Path(sys.executable).with_name("ray"))
NODE_B = "legion_node_b"
log = logging.getLogger(__name__)


def _wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


class _Node:
    """One ``ray start --block`` process (a Ray node); stopping it stops the node's processes."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        # Ray gives a raylet 30 s to register with the GCS; on a machine shared with other work
        # that can run out, and `ray start` exits: start it again (its processes exit with it).
        for attempt in range(3):
            if self._start(args, env):
                log.info("ray node %s started", name)
                return
            log.warning("ray start %s failed (attempt %d):\n%s", name, attempt + 1, self.log.read_text())
        raise AssertionError(f"ray start {name} failed 3 times:\n{self.log.read_text()}")

    def _start(self, args: list[str], env: dict[str, str]) -> bool:
        ports = {
            "--node-manager-port": _free_port(),
            "--object-manager-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
            "--metrics-export-port": _free_port(),
        }
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--object-store-memory=100000000"]
        cmd += [f"{k}={v}" for k, v in ports.items()] + args
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(1)
        self.stop()
        return False

    def stop(self) -> None:
        """SIGTERM, as a node shutting down gets; the node's raylet and workers exit with it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _agents(client: httpx.Client) -> dict[str, dict]:
    return {a["name"]: a["health"] for a in client.get("/v1/agents").json()["agents"]}


def _task(client: httpx.Client, request_id: str | None = None) -> dict:
    headers = {"X-Request-Id": request_id} if request_id else {}
    body = {"task": "What is the capital of France?", "max_tokens": 8}
    r = client.post("/v1/tasks", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == (request_id or r.headers["x-request-id"]) != ""
    return r.json()


def _json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # Ray's own lines
        if isinstance(record, dict):
            out.append(record)
    return out


def test_two_nodes_place_agents_and_survive_losing_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # a private throwaway cluster
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # a stopped node leaves at once
    # Unix socket paths under the temp dir must stay short: pytest's tmp_path is too deep.
    temp_dir = Path(tempfile.mkdtemp(prefix="lgmn", dir="/tmp"))
    port, http_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    cfg = tmp_path / "legion.yaml"
    # The head offers 1 CPU: the ingress, the Arbiter and alpha (0.5) fit there; gamma (1 CPU)
    # does not, and beta needs the resource only node B offers.
    cfg.write_text(
        f"""
agents:
  - {{name: alpha, num_cpus: 0.5, sampling: {{max_tokens: 8}}}}
  - {{name: beta, num_cpus: 0.5, resources: {{{NODE_B}: 1}}, sampling: {{max_tokens: 8}}}}
  - {{name: gamma, num_cpus: 1.0, sampling: {{max_tokens: 8}}}}
placement: {{strategy: SPREAD}}
arbiter: {{agent_timeout_s: 8}}
serve: {{app_name: multinode, port: {http_port}, max_replicas: 1, proxy_location: HeadOnly}}
cache: {{enabled: false}}
data_dir: {tmp_path / "data"}
"""
    )
    nodes: list[_Node] = []
    legion = None
    try:
        head = _Node(
            "head",
            [
                "--head",
                f"--port={port}",
                f"--temp-dir={temp_dir}",
                "--num-cpus=1",
                "--include-dashboard=false",
            ],
            env,
            tmp_path,
        )
        nodes.append(head)
        legion_log = (tmp_path / "legion.log").open("w")
        legion = subprocess.Popen(
            [sys.executable, "-m", "legion_cli", "serve", "--config", str(cfg), "--no-dashboard"],
            # JSON logs: every process's lines reach this process's stdout (Ray forwards them).
            env={**env, "RAY_ADDRESS": address, "LEGION_LOG_FORMAT": "json"},
            stdout=legion_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def serving() -> bool:
            assert legion.poll() is None, (tmp_path / "legion.log").read_text()
            return "serving at" in (tmp_path / "legion.log").read_text()

        _wait_for("legion serve", serving, 180)
        log.info("legion serve is up")
        # Node B joins after Legion has started, so the ingress and the Arbiter are on the head.
        node_b_args = [f"--address={address}", "--num-cpus=2", f'--resources={{"{NODE_B}": 1}}']
        node_b = _Node("node_b", node_b_args, env, tmp_path)
        nodes.append(node_b)
        url = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            _wait_for("all agents loaded", lambda: client.get("/healthz").status_code == 200, 180)
            health = _agents(client)
            log.info("agents loaded: %s", health)
            head_node, b_node = health["alpha"]["node_id"], health["beta"]["node_id"]
            assert head_node and b_node and head_node != b_node, health
            assert health["gamma"]["node_id"] == b_node, health  # no room left on the head

            first = _task(client, request_id="multinode-first-1")
            assert first["missing_agents"] == [], first
            answered = {c["agent"] for c in first["candidates"] if not c.get("error")}
            assert answered == {"alpha", "beta", "gamma"}, first

            # The request id went ingress -> Arbiter -> every agent, on both nodes, and each
            # logged it in a JSON line.
            def tagged() -> set[str]:
                lines = _json_lines(tmp_path / "legion.log")
                return {r.get("agent") for r in lines if r.get("request_id") == "multinode-first-1"}

            _wait_for("the agents' JSON log lines", lambda: {"alpha", "beta", "gamma"} <= tagged(), 60)
            bad = client.post("/v1/tasks", json={"task": "hi"}, headers={"X-Request-Id": "a b"})
            assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]

            node_b.stop()
            log.info("node B stopped")
            after = _task(client)  # answered by alpha on the head
            assert after["missing_agents"] == ["beta", "gamma"], after
            ok = [c for c in after["candidates"] if not c.get("error")]
            assert [c["agent"] for c in ok] == ["alpha"] and after["answer"] == ok[0]["text"], after
            lost = _agents(client)
            assert lost["alpha"]["loaded"] and lost["alpha"]["node_id"] == head_node, lost
            assert not lost["beta"]["loaded"] and not lost["gamma"]["loaded"], lost

            # A plain node joins: gamma (placed by resources only) restarts there; beta stays
            # missing until a node offering legion_node_b comes back.
            nodes.append(_Node("node_c", [f"--address={address}", "--num-cpus=1"], env, tmp_path))

            def gamma_back() -> dict | None:
                h = _agents(client)
                return h if h["gamma"]["loaded"] else None

            back = _wait_for("gamma to restart on node C", gamma_back, 180, every_s=2)
            log.info("gamma restarted: %s", back["gamma"])
            assert back["gamma"]["node_id"] not in (head_node, b_node), back
            assert not back["beta"]["loaded"], back
            again = _task(client)
            assert again["missing_agents"] == ["beta"], again
    finally:
        if legion is not None and legion.poll() is None:
            legion.send_signal(signal.SIGINT)
            try:
                legion.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(legion.pid, signal.SIGKILL)
                legion.wait()
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_placement_group_holds_the_agents(ray_cluster):
    """``placement.group``: agents run inside one detached group, which goes with the actors."""
    from ray.util.placement_group import placement_group_table

    from actors import agent_group_name, start_agent, stop_actors
    from legion.config import config_from_dict

    # A tiny CPU share: the session's agents have reserved most of the session cluster.
    cfg = config_from_dict(
        {
            "agents": [{"name": "grouped", "num_cpus": 0.01, "sampling": {"max_tokens": 4}}],
            "serve": {"app_name": "pgtest"},
            "placement": {"group": True, "strategy": "STRICT_PACK"},
        }
    )
    name = agent_group_name(cfg)

    def group() -> dict | None:
        found = [g for g in placement_group_table().values() if g["name"] == name and g["state"] != "REMOVED"]
        return found[0] if found else None

    actor = start_agent(cfg, cfg.agents[0])
    try:
        health = ray_cluster.get(actor.wait_loaded.remote(120), timeout=180)
        assert health.loaded, health
        info = group()
        assert info["state"] == "CREATED" and info["strategy"] == "STRICT_PACK", info
        assert info["bundles"] == {0: {"CPU": 0.01}}, info
        assert info["bundles_to_node_id"][0] == health.node_id
    finally:
        killed = stop_actors(cfg)
    assert name in killed
    assert group() is None
