"""``arbiter.free_text_profile``: free text is weighed by a profile fitted on generated candidates
(``legion calibrate --candidates``), tasks with choices by ``arbiter.profile``; the default line-up
ships both. The Arbiter and the strategies are the real ones; the agents are test_arbiter's
scripted stand-in (no model)."""

from __future__ import annotations

import asyncio

import pytest

from legion.arbitration.arbiter import Arbiter
from legion.config import SHIPPED_FREE_TEXT_PROFILE, SHIPPED_PROFILE, ConfigError, config_from_dict
from legion.messages import TaskRequest
from legion.profile import check_agents, load_profile
from tests.unit.test_arbiter import ScriptedAgents, by_agent
from tests.unit.test_choices import ChoiceAgents
from tests.unit.test_panel import write_profile

AGENTS = [{"name": "x"}, {"name": "y"}, {"name": "z"}]


def arbiter(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict({"agents": AGENTS, "data_dir": str(tmp_path)})
    paths = {
        key: str(write_profile(tmp_path / f"{key}.json", cfg.panel, weights))
        for key, weights in extra.items()
    }
    cfg = config_from_dict(
        {"agents": AGENTS, "arbiter": {"agent_timeout_s": 30.0, **paths}, "data_dir": str(tmp_path)}
    )
    # x says paris, y and z rome; every agent scores paris above rome.
    table = {"paris": -1.0, "rome": -3.0}
    agents = ScriptedAgents(
        by_agent({"x": "paris", "y": "rome", "z": "rome"}), loglik=dict.fromkeys("xyz", table)
    )
    return Arbiter(cfg, agents)


def learned_answer(a: Arbiter) -> str:
    r = asyncio.run(a.run(TaskRequest(id="t", task="Capital of France?", strategy="learned", max_tokens=8)))
    return r.answer


def test_free_text_is_weighed_by_the_free_text_profile_and_choices_by_the_profile(tmp_path):
    # The choices profile trusts the agents' scores (paris); the free-text one reads them the
    # other way round (negative weights: rome).
    only = arbiter(tmp_path / "one", profile=[1.0, 1.0, 1.0])
    assert learned_answer(only) == "paris"  # no free-text profile: arbiter.profile serves both
    both = arbiter(tmp_path / "two", profile=[1.0, 1.0, 1.0], free_text_profile=[-1.0, -1.0, -1.0])
    assert learned_answer(both) == "rome"
    # A task with choices keeps arbiter.profile: every agent scores paris higher, weights +1.
    scored = Arbiter(both.cfg, ChoiceAgents({m: [0.0, -2.0] for m in "xyz"}))
    req = TaskRequest(id="c", task="Capital of France?", strategy="learned", choices=["paris", "rome"])
    r = asyncio.run(scored.run(req))
    assert r.choice.index == 0 and r.choice.probability_source == "profile"


def test_the_default_line_up_ships_a_free_text_profile_fitted_for_its_members():
    cfg = config_from_dict({})
    assert cfg.arbiter.profile == str(SHIPPED_PROFILE)
    assert cfg.arbiter.free_text_profile == str(SHIPPED_FREE_TEXT_PROFILE)
    check_agents(load_profile(cfg.arbiter.free_text_profile), cfg.panel)
    own = config_from_dict({"agents": AGENTS})
    assert own.arbiter.free_text_profile is None and own.arbiter.text_profile is None


def test_a_free_text_profile_for_other_members_is_a_config_error_naming_it(tmp_path):
    other = config_from_dict({"agents": [{"name": "w"}], "data_dir": str(tmp_path)}).panel
    path = write_profile(tmp_path / "other.json", other)
    with pytest.raises(ConfigError, match=r"arbiter\.free_text_profile"):
        config_from_dict(
            {"agents": AGENTS, "arbiter": {"free_text_profile": str(path)}, "data_dir": str(tmp_path)}
        )
