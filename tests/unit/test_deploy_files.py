"""The deployment files (cluster.yaml, deploy/) and Legion's log format, checked without Ray.

cluster.yaml goes through the validation ``ray up`` runs (the JSON schema shipped in the ray
package); the RayService's Serve config must be deploy/serve_config.yaml; the Cloud Run
script runs in dry-run mode. Docker cannot run here: the Dockerfile is checked for its
structure, and its install steps (deploy/install.sh) run in tests/integration.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from legion.config import config_from_dict, load_config
from legion.logging_setup import JsonFormatter, configure_logging, log_context, valid_request_id

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------- cluster.yaml
def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = _yaml(ROOT / "cluster.yaml")
    validate_config(cluster)  # ray-schema.json, as `ray up` checks it
    validate_config(prepare_config(copy.deepcopy(cluster)))  # and after Ray fills the defaults
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_cluster_yaml_has_a_cpu_head_gpu_workers_and_starts_the_app():
    cluster = _yaml(ROOT / "cluster.yaml")
    assert cluster["provider"]["type"] == "gcp"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["node_config"]["guestAccelerators"] for t in gpu_types)
    workers = " ".join(cluster["worker_setup_commands"])
    assert "LEGION_CUDA=1" in workers and "deploy/install.sh venv" in workers
    assert "deploy/install.sh venv" in " ".join(cluster["head_setup_commands"])
    start = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in start and "serve deploy ~/legion/deploy/serve_config.yaml" in start
    # The agents' file named in the start commands exists and is a valid Legion config.
    configs = set(re.findall(r"LEGION_CONFIG=\$HOME/legion/(\S+)", start))
    assert configs == {"deploy/legion-gpu.yaml"}
    load_config(ROOT / configs.pop())
    assert ".venv" in cluster["rsync_exclude"]


def test_gpu_config_packs_four_agents_per_gpu():
    cfg = load_config(DEPLOY / "legion-gpu.yaml")
    assert all(a.num_gpus == 0.25 and a.n_gpu_layers == -1 for a in cfg.agents)
    assert sum(a.num_gpus for a in cfg.agents) == 1.0
    assert cfg.placement.strategy == "SPREAD" and cfg.serve.host == "0.0.0.0"


# ------------------------------------------------------------------------------- KubeRay
def _rayservice() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    return by_kind["RayService"], by_kind["ConfigMap"]


def test_rayservice_serves_deploy_serve_config():
    import ray
    from ray.serve.schema import ServeDeploySchema

    svc, _ = _rayservice()
    assert svc["apiVersion"] == "ray.io/v1" and svc["metadata"]["name"]
    spec = svc["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    inner = yaml.safe_load(spec["serveConfigV2"])
    assert inner == _yaml(DEPLOY / "serve_config.yaml")
    ServeDeploySchema(**inner)
    assert spec["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_rayservice_has_a_head_and_an_autoscaled_gpu_group():
    svc, configmap = _rayservice()
    cluster = svc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"]
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "no worker group asks for a GPU"
    for g in gpu_groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # LEGION_CONFIG points into the mounted ConfigMap, which holds deploy/legion-gpu.yaml.
    env = {e["name"]: e for e in head_container["env"]}
    mount = {m["name"]: m["mountPath"] for m in head_container["volumeMounts"]}["legion-config"]
    key = Path(env["LEGION_CONFIG"]["value"]).relative_to(mount).as_posix()
    assert yaml.safe_load(configmap["data"][key]) == _yaml(DEPLOY / "legion-gpu.yaml")
    config_from_dict(yaml.safe_load(configmap["data"][key]))
    assert env["LEGION_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "legion-api-keys"


# -------------------------------------------------------------------------------- Docker
def test_dockerfile_is_multi_stage_non_root_with_a_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.M)
    assert stages == ["build", "runtime"]
    build, runtime = text.split("\nFROM ")[1:3]
    assert "ARG CUDA" in build and "install.sh build-deps" in build and "install.sh venv" in build
    assert "LEGION_CUDA=${CUDA}" in build
    assert "install.sh runtime-deps" in runtime and "COPY --from=build" in runtime
    user = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*healthz", runtime, flags=re.M)
    # Everything the build copies from the context exists (and is not filtered out).
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for line in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
            assert src.split("/")[0] not in ignored, src
    assert ".venv" in ignored and ".git" in ignored


# ----------------------------------------------------------------------------- Cloud Run
def _dry_run(**env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PROJECT_ID": "demo-project", "DRY_RUN": "1", "TAG": "t1", **env}
    full.pop("API_KEYS_FILE", None)
    return subprocess.run(
        ["bash", str(DEPLOY / "cloudrun" / "deploy.sh")], env=full, capture_output=True, text=True, timeout=60
    )


def test_cloudrun_deploy_renders_the_service_with_secrets_and_scaling():
    out = _dry_run(MIN_INSTANCES="2", MAX_INSTANCES="6", CONCURRENCY="40")
    assert out.returncode == 0, out.stderr
    commands, _, rest = out.stdout.partition("run services replace <rendered service.yaml>")
    rendered, _, after = rest.partition("\n+ ")
    assert "run.invoker" in after
    assert "secrets create legion-api-keys" in commands
    assert "secretmanager.secretAccessor" in commands
    assert "builds submit" in commands and "deploy/cloudrun/cloudbuild.yaml" in commands
    service = yaml.safe_load(rendered.split("\n", 1)[1])
    template = service["spec"]["template"]
    notes = template["metadata"]["annotations"]
    assert notes["autoscaling.knative.dev/minScale"] == "2"
    assert notes["autoscaling.knative.dev/maxScale"] == "6"
    assert notes["run.googleapis.com/execution-environment"] == "gen2"
    assert template["spec"]["containerConcurrency"] == 40
    container = template["spec"]["containers"][0]
    assert container["image"] == "us-central1-docker.pkg.dev/demo-project/legion/legion:t1"
    keys = {e["name"]: e for e in container["env"]}["LEGION_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "legion-api-keys", "key": "latest"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    build = _yaml(DEPLOY / "cloudrun" / "cloudbuild.yaml")
    assert "deploy/Dockerfile" in build["steps"][0]["args"]


def test_cloudrun_deploy_refuses_bad_scaling():
    out = _dry_run(MIN_INSTANCES="5", MAX_INSTANCES="2")
    assert out.returncode == 2 and "MIN_INSTANCES <= MAX_INSTANCES" in out.stderr
    assert _dry_run(CONCURRENCY="lots").returncode == 2


def test_checklist_names_a_command_for_every_seed_item():
    text = (DEPLOY / "CHECKLIST.md").read_text()
    for item in ("Build passes", "Model loads", "Image under 5 GB", "SQLite", "Qdrant", "Deploy succeeds"):
        assert item in text, item
    assert "100" in text and "HTTPS" in text
    # Every repository path a command mentions exists.
    for path in set(
        re.findall(r"\b((?:deploy|tests|loadtests|\.ci)/[\w./-]+\.(?:sh|py|yaml|md)|\.ci/run)\b", text)
    ):
        assert (ROOT / path).exists(), path


# ------------------------------------------------------------------- placement settings
def test_placement_and_resources_are_validated_with_the_field_named():
    from legion.errors import ConfigError

    def error(data: dict) -> str:
        with pytest.raises(ConfigError) as info:
            config_from_dict(data)
        return info.value.message

    assert "agents.0.resources" in error({"agents": [{"name": "a", "resources": {"GPU": 1}}]})
    assert "num_cpus / num_gpus" in error({"agents": [{"name": "a", "resources": {"CPU": 1}}]})
    assert "0.0001" in error({"agents": [{"name": "a", "resources": {"node_b": 0}}]})
    assert "placement.group to true" in error({"placement": {"strategy": "STRICT_PACK"}})
    assert "needs strategy PACK" in error({"placement": {"group": True}})


def test_agent_placement_options_without_a_group():
    from actors.placement import agent_placement

    cfg = config_from_dict(
        {
            "agents": [{"name": "pinned", "resources": {"node_b": 0.5}}, {"name": "free"}],
            "placement": {"strategy": "SPREAD"},
        }
    )
    assert agent_placement(cfg, cfg.agents[0]) == {
        "resources": {"node_b": 0.5},
        "scheduling_strategy": "SPREAD",
    }
    assert agent_placement(cfg, cfg.agents[1]) == {"scheduling_strategy": "SPREAD"}
    default = config_from_dict({"agents": [{"name": "free"}]})
    assert agent_placement(default, default.agents[0]) == {}


# ---------------------------------------------------------------------------------- logs
def test_json_log_lines_carry_the_request_fields():
    stream = io.StringIO()
    try:
        assert configure_logging("INFO", "json", stream=stream) == "json"
        log = logging.getLogger("legion.test")
        with log_context(request_id="req-1", route="/v1/tasks"):
            with log_context(agent="solver"):
                log.info("generated %d tokens", 3, extra={"latency_ms": 12.5})
            log.warning("outside the agent")
        log.info("no request")
    finally:
        configure_logging("INFO", "text")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "generated 3 tokens" and first["level"] == first["severity"] == "INFO"
    assert (first["request_id"], first["route"], first["agent"], first["latency_ms"]) == (
        "req-1",
        "/v1/tasks",
        "solver",
        12.5,
    )
    assert second["request_id"] == "req-1" and "agent" not in second and second["level"] == "WARNING"
    assert "request_id" not in third and third["logger"] == "legion.test"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", first["time"])


def test_configure_logging_replaces_its_handler_and_rejects_unknown_formats():
    root = logging.getLogger()
    try:
        configure_logging("INFO", "json")
        configure_logging("INFO", "json")
        ours = [h for h in root.handlers if getattr(h, "_legion", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        with pytest.raises(ValueError, match="LEGION_LOG_FORMAT must be 'text' or 'json'"):
            configure_logging("INFO", "xml")
    finally:
        configure_logging("INFO", "text")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("3f2c9a1e-6d1b-4a5e-9a0b-2f1e0c7d8b9a", True),
        ("Root=1-5759e988-bd862e3fe1be46a9", True),
        ("", False),
        ("a" * 129, False),
        ("two words", False),
        ('x"}\n{"forged": 1', False),
    ],
)
def test_request_ids(value, ok):
    assert valid_request_id(value) is ok
