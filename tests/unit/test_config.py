"""Config validation: defaults load, bad values fail naming the field, env overrides YAML."""

import os
from pathlib import Path

import pytest
import yaml

from legion.config import LegionConfig, config_from_dict, load_config
from legion.errors import ConfigError


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert len(cfg.agents) >= 2
    assert len({a.name for a in cfg.agents}) == len(cfg.agents)
    assert all(a.num_gpus == 0 and a.n_gpu_layers == 0 for a in cfg.agents)


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"agents": [{"name": "a", "num_cpus": -1}]}, "agents.0.num_cpus", "greater than 0"),
        ({"agents": [{"name": "a", "n_ctx": 10}]}, "agents.0.n_ctx", "greater than or equal to 128"),
        ({"serve": {"port": 70000}}, "serve.port", "less than or equal to 65535"),
        ({"agents": [{"name": "Bad Name"}]}, "agents.0.name", "pattern"),
        ({"agents": [{"name": "a", "sampling": {"temperature": 3}}]}, "agents.0.sampling.temperature", "2"),
        ({"agents": [{"name": "a", "n_gpu_layers": 10}]}, "agents.0", "num_gpus"),
        ({"agents": [{"name": "a", "num_gpus": 1.5}]}, "agents.0", "whole number"),
        (
            {"agents": [{"name": "a", "prompt_template": "no task here"}]},
            "agents.0.prompt_template",
            "{task}",
        ),
        ({"agents": [{"name": "a"}, {"name": "a"}]}, "", "unique"),
        ({"serve": {"min_replicas": 3, "max_replicas": 2}}, "serve", "max_replicas"),
        ({"agents": []}, "agents", "at least 1"),
        ({"surprise": 1}, "surprise", "not permitted"),
        ({"arbiter": {"equivalence": "fuzzy"}}, "arbiter.equivalence", "'rules', 'embedding' or 'judge'"),
        ({"arbiter": {"equivalence_min_similarity": 1.5}}, "arbiter.equivalence_min_similarity", "1"),
    ],
)
def test_bad_values_name_the_field(data, field, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    msg = err.value.message
    assert field in msg
    assert fragment in msg


def test_yaml_file_and_env_override(tmp_path, monkeypatch):
    f = tmp_path / "legion.yaml"
    f.write_text("serve:\n  port: 9100\n  max_replicas: 4\nagents:\n  - name: solo\n    num_cpus: 1.0\n")
    monkeypatch.setenv("LEGION_SERVE__PORT", "9200")
    cfg = load_config(f)
    assert cfg.serve.port == 9200  # env wins over the file
    assert cfg.serve.max_replicas == 4  # the rest of the file is kept
    assert [a.name for a in cfg.agents] == ["solo"]


def test_bad_env_value_fails_naming_the_field(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEGION_SERVE__PORT", "0")
    with pytest.raises(ConfigError) as err:
        load_config()
    assert "serve.port" in err.value.message


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_an_error(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("agents: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_threads_follow_num_cpus_not_host():
    cfg = config_from_dict({"agents": [{"name": "a", "num_cpus": 0.5}, {"name": "b", "num_cpus": 3.7}]})
    assert cfg.agents[0].threads == 1
    assert cfg.agents[1].threads == 3
    cfg = config_from_dict({"agents": [{"name": "a", "num_cpus": 0.5, "n_threads": 2}]})
    assert cfg.agents[0].threads == 2


def test_gpu_fraction_is_valid_config():
    cfg = config_from_dict({"agents": [{"name": "g", "num_gpus": 0.25, "n_gpu_layers": -1}]})
    assert isinstance(cfg, LegionConfig)
    assert cfg.agents[0].num_gpus == 0.25


def test_the_example_file_loads_and_shows_every_section(monkeypatch):
    for var in list(os.environ):
        if var.startswith("LEGION_"):
            monkeypatch.delenv(var)
    example = Path(__file__).resolve().parents[2] / "legion.example.yaml"
    cfg = load_config(example)
    assert [a.name for a in cfg.agents] == ["solver", "reasoner", "critic"]
    # The README says the example shows every section: it must keep up with the config.
    assert set(yaml.safe_load(example.read_text())) == set(LegionConfig.model_fields)
    # Where the example states a value, it is the default (it documents, it does not tune).
    defaults = LegionConfig(agents=cfg.agents, arbiter=cfg.arbiter, serve=cfg.serve)
    for section in ("cache", "history", "rag", "placement", "security"):
        assert getattr(cfg, section) == getattr(defaults, section), section


def test_model_path_reads_home_as_a_shell_would(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_from_dict({"agents": [{"name": "a", "model_path": "~/models/x.gguf"}]})
    assert cfg.agents[0].model_path == str(tmp_path / "models" / "x.gguf")
