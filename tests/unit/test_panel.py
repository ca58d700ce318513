"""The panel: an agent's views as members (``AgentConfig.members``), the config's ``panel`` and
``owner``, the profile checked against the members, and ``PanelAgents`` routing each member's
call to its agent in its voice (no Ray, no model; the agents behind ``PanelAgents`` are a
recording stand-in, the routing is the subject)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from legion.arbitration.arbiter import Arbiter, PanelAgents
from legion.config import AgentConfig, LegionConfig, config_from_dict
from legion.engine.llama import ScoredContinuation, model_file, packaged_model_path
from legion.errors import ConfigError, ModelLoadError
from legion.evaluation.calibrate import FitResult, make_profile
from legion.messages import AgentHealth, GenerateRequest, Generation, TaskRequest
from legion.profile import check_agents, load_profile, view_of

SMOL = "smollm2-135m-instruct"


def write_profile(path: Path, members, weights=None) -> Path:
    """The profile ``legion calibrate`` would write for ``members`` (agent configs) with these
    ``weights`` (default 1 each), as its JSON file at ``path``."""
    names = [m.name for m in members]
    w = np.asarray(weights if weights is not None else [1.0] * len(names), dtype=float)
    result = FitResult(
        weights=w,
        l2=0.01,
        cv=[{"l2": 0.01, "log_loss": 1.0, "accuracy": 0.5}],
        train_accuracy=0.5,
        single_accuracy=dict.fromkeys(names, 0.5),
    )
    prof = make_profile(
        result,
        members,
        method="conditional_logit",
        data=["train.jsonl"],
        items_per_file={"train.jsonl": 60},
        excluded=0,
        folds=3,
    )
    path.write_text(json.dumps(prof.model_dump(mode="json")), encoding="utf-8")
    return path


def two_agents(tmp_path, **arbiter) -> LegionConfig:
    """Agent ``a`` speaks as views ``x`` and ``y``; agent ``b`` has no views (it is one member)."""
    return config_from_dict(
        {
            "agents": [
                {"name": "a", "views": [{"name": "x"}, {"name": "y", "scoring": "per_token", "few_shot": 2}]},
                {"name": "b"},
            ],
            "arbiter": arbiter,
            "data_dir": str(tmp_path),
        }
    )


# ---------------------------------------------------------------- members


def test_a_view_is_the_agents_config_with_the_views_fields_over_it():
    agent = AgentConfig(
        name="a",
        role="solver",
        role_prompt="Answer briefly.\n",
        model=SMOL,
        n_ctx=1024,
        num_cpus=0.9,
        sampling={"temperature": 0.7, "seed": 4, "top_k": 20},
        views=[
            {"name": "plain"},
            {"name": "cold", "sampling": {"temperature": 0.3}},
            {
                "name": "critic",
                "role": "critic",
                "role_prompt": "Check the answer.\n",
                "few_shot": 3,
                "few_shot_seed": 9,
                "prompt_form": "cloze",
                "scoring": "pmi",
            },
        ],
    )
    plain, cold, critic = agent.members()
    assert [m.name for m in agent.members()] == ["a/plain", "a/cold", "a/critic"]
    assert all(m.views == [] for m in (plain, cold, critic))
    # A view that sets nothing is the agent itself under another name.
    assert plain.model_dump(exclude={"name", "views"}) == agent.model_dump(exclude={"name", "views"})
    # A view's sampling is merged field by field: only temperature changes.
    assert cold.sampling.temperature == 0.3
    assert cold.sampling.model_dump(exclude={"temperature"}) == agent.sampling.model_dump(
        exclude={"temperature"}
    )
    assert agent.sampling.temperature == 0.7  # the agent's own sampling is untouched
    # The fields a view sets replace the agent's; the engine's fields stay the agent's.
    assert (critic.role, critic.role_prompt, critic.few_shot, critic.few_shot_seed) == (
        "critic",
        "Check the answer.\n",
        3,
        9,
    )
    assert (critic.prompt_form, critic.scoring) == ("cloze", "pmi")
    assert (critic.model, critic.n_ctx, critic.num_cpus) == (agent.model, agent.n_ctx, agent.num_cpus)
    assert critic.sampling == agent.sampling
    assert agent.view_of("a/critic") == critic
    with pytest.raises(KeyError):
        agent.view_of("a/nobody")


def test_an_agent_without_views_is_its_one_member():
    agent = AgentConfig(name="solo", scoring="per_byte")
    assert agent.members() == [agent] and agent.members()[0] is agent
    assert agent.view_of("solo") is agent


def test_a_chat_view_drops_the_completion_stops_and_template():
    completion = AgentConfig(name="a", prompt_template="Q: {task}\nA:", views=[{"name": "c"}])
    base = AgentConfig(
        name="a",
        prompt_template="Q: {task}\nA:",
        views=[{"name": "c"}, {"name": "chat", "prompt_format": "chat"}],
    )
    c, chat = base.members()
    assert c.sampling.stop == completion.sampling.stop and c.sampling.stop  # the completion stops
    assert c.prompt_template == "Q: {task}\nA:"
    assert chat.prompt_format == "chat" and chat.sampling.stop == []
    # The chat member has no template of its own: the field's default, which chat ignores.
    assert chat.prompt_template == AgentConfig.model_fields["prompt_template"].default
    # Stops the agent set itself, or the view's own, hold for a chat view.
    own = AgentConfig(
        name="a",
        sampling={"stop": ["END"]},
        views=[
            {"name": "chat", "prompt_format": "chat"},
            {"name": "chat2", "prompt_format": "chat", "sampling": {"stop": ["###"]}},
        ],
    )
    assert [m.sampling.stop for m in own.members()] == [["END"], ["###"]]


def test_the_members_survive_the_configs_round_trip_to_the_actors():
    # Each actor rebuilds its config from the dump it is handed (actors/agent.py: AgentConfig(
    # **agent.model_dump(mode="json")); the Arbiter and the ingress: LegionConfig(**dump)): its
    # members must be the ones the config validated, or a chat view decodes with other stops.
    cfg = config_from_dict(
        {
            "agents": [
                {
                    "name": "a",
                    "views": [{"name": "plain"}, {"name": "chat", "prompt_format": "chat"}],
                }
            ]
        }
    )
    agent = cfg.agent("a")
    in_actor = AgentConfig(**agent.model_dump(mode="json"))
    assert [m.sampling.stop for m in in_actor.members()] == [m.sampling.stop for m in agent.members()]
    again = config_from_dict(cfg.model_dump(mode="json"))
    assert [m.sampling.stop for m in again.panel] == [m.sampling.stop for m in cfg.panel]


def test_a_completion_view_of_a_chat_agent_has_the_completion_stops():
    # The member is a completion prompt to the model: it gets what a completion agent gets
    # when nobody set stop ("the format's own default stops", config.members).
    chat = AgentConfig(
        name="a", prompt_format="chat", views=[{"name": "plain", "prompt_format": "completion"}]
    )
    [plain] = chat.members()
    assert chat.sampling.stop == []
    assert plain.prompt_format == "completion"
    assert plain.sampling.stop == AgentConfig(name="x").sampling.stop


@pytest.mark.parametrize(
    ("views", "agent", "says"),
    [
        ([{"name": "v"}, {"name": "v"}], {}, "view names must be unique within an agent; ['v'] appear twice"),
        ([{"name": "v", "sampling": {"temp": 0.3}}], {}, "agents.0.views.0.sampling"),
        ([{"name": "hot", "sampling": {"temperature": 5}}], {}, "view 'hot': sampling.temperature"),
        (
            [{"name": "few", "few_shot": 99}],
            {},
            "agents.0.views.0.few_shot",
        ),
    ],
    ids=["duplicate", "unknown-sampling", "bad-sampling-value", "bad-field"],
)
def test_a_bad_view_is_a_config_error_naming_it(tmp_path, views, agent, says):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"agents": [{"name": "a", **agent, "views": views}], "data_dir": str(tmp_path)})
    assert says in err.value.message


def test_an_unknown_sampling_field_of_a_view_says_which_fields_there_are():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"agents": [{"name": "a", "views": [{"name": "v", "sampling": {"temp": 0.3}}]}]})
    assert "unknown sampling field(s) ['temp']" in err.value.message and "temperature" in err.value.message


def test_a_chat_template_agent_with_a_completion_view_says_why():
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {
                "agents": [
                    {
                        "name": "a",
                        "prompt_format": "chat",
                        "chat_template": "chatml",
                        "views": [{"name": "plain", "prompt_format": "completion"}],
                    }
                ]
            }
        )
    assert "view 'plain'" in err.value.message and "chat_template applies to prompt_format: chat" in (
        err.value.message
    )


# ---------------------------------------------------------------- panel and owner


def test_the_panel_lists_every_member_and_owner_names_its_agent(tmp_path):
    cfg = two_agents(tmp_path)
    assert [m.name for m in cfg.panel] == ["a/x", "a/y", "b"]
    assert [cfg.owner(m.name).name for m in cfg.panel] == ["a", "a", "b"]
    assert cfg.owner("a/y") is cfg.agent("a")
    with pytest.raises(KeyError):
        cfg.owner("c/x")
    y = cfg.panel[1]
    assert (y.scoring, y.few_shot) == ("per_token", 2) and cfg.panel[0].scoring == "sum"


def test_the_arbiter_knows_the_panel_and_each_members_agent(tmp_path):
    arbiter = Arbiter(two_agents(tmp_path), RecordingAgents())
    assert [m.name for m in arbiter.panel] == ["a/x", "a/y", "b"]
    assert arbiter.owner == {"a/x": "a", "a/y": "a", "b": "b"}
    assert isinstance(arbiter.members, PanelAgents)


@pytest.mark.parametrize("build", [LegionConfig, lambda: config_from_dict({})], ids=["class", "dict"])
def test_the_default_panel_is_two_agents_and_nine_members(build, monkeypatch):
    for var in ("LEGION_AGENTS", "LEGION_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    cfg = build()
    assert [a.name for a in cfg.agents] == ["gemma", "smol"]
    assert [a.model for a in cfg.agents] == ["gemma-3-270m", SMOL]
    assert len(cfg.panel) == 9
    names = [m.name for m in cfg.panel]
    assert len(set(names)) == 9 and all(n.split("/")[0] in ("gemma", "smol") for n in names)
    assert [m.name for m in cfg.panel if cfg.owner(m.name).name == "gemma"] == [
        m.name for m in cfg.agent("gemma").members()
    ]
    smol = [m for m in cfg.panel if cfg.owner(m.name).name == "smol"]
    assert len(smol) == 3 and {m.model for m in smol} == {SMOL}
    assert {m.model for m in cfg.panel if m not in smol} == {"gemma-3-270m"}
    # Every member is a different view: none duplicates another's vote.
    assert len({json.dumps(view_of(m), sort_keys=True) for m in cfg.panel}) == 9


def test_a_model_names_a_packaged_model(tmp_path):
    path = packaged_model_path(SMOL)
    assert Path(path).is_file() and path.endswith(".gguf")
    smol_member = config_from_dict({}).agent("smol").members()[0]
    assert model_file(smol_member) == path
    own = AgentConfig(name="a", model=SMOL, model_path=str(tmp_path / "mine.gguf"))
    assert model_file(own) == str(tmp_path / "mine.gguf")  # model_path takes the model's place
    with pytest.raises(ModelLoadError, match="unknown packaged model 'llama-7b'"):
        packaged_model_path("llama-7b")
    with pytest.raises(ConfigError, match=r"agents\.0\.model"):
        config_from_dict({"agents": [{"name": "a", "model": "llama-7b"}]})


# ---------------------------------------------------------------- the profile against the panel


def test_a_profile_for_the_members_passes_and_one_missing_a_member_names_it(tmp_path):
    cfg = two_agents(tmp_path)
    path = write_profile(tmp_path / "p.json", cfg.panel)
    check_agents(load_profile(path), cfg.panel)
    with_profile = two_agents(tmp_path, profile=str(path))
    assert with_profile.arbiter.profile == str(path)

    short = write_profile(tmp_path / "short.json", [m for m in cfg.panel if m.name != "a/y"])
    with pytest.raises(ConfigError, match=r"arbiter\.profile: agent 'a/y' is not in profile"):
        two_agents(tmp_path, profile=str(short))
    # A profile fitted for the agents before they had views: its names are not the members'.
    old_panel = write_profile(tmp_path / "agents.json", [AgentConfig(name="a"), AgentConfig(name="b")])
    with pytest.raises(ConfigError, match="agent 'a/x' is not in profile"):
        two_agents(tmp_path, profile=str(old_panel))


def test_a_member_whose_view_changed_is_named(tmp_path):
    path = write_profile(tmp_path / "p.json", two_agents(tmp_path).panel)
    changed = {
        "agents": [
            {"name": "a", "views": [{"name": "x"}, {"name": "y", "scoring": "pmi", "few_shot": 2}]},
            {"name": "b"},
        ],
        "arbiter": {"profile": str(path)},
        "data_dir": str(tmp_path),
    }
    with pytest.raises(
        ConfigError, match=r"agent 'a/y' differs .*scoring: 'per_token' in the profile, 'pmi' now"
    ):
        config_from_dict(changed)
    # The model is part of a member's view: another model is another member.
    changed["agents"][0]["model"] = SMOL
    changed["agents"][0]["views"][1]["scoring"] = "per_token"
    with pytest.raises(ConfigError, match=r"agent 'a/x' differs .*model: 'gemma-3-270m' in the profile"):
        config_from_dict(changed)


def test_a_profile_written_before_models_had_names_reads_as_gemma(tmp_path):
    cfg = two_agents(tmp_path)
    data = json.loads(write_profile(tmp_path / "new.json", cfg.panel).read_text())
    for a in data["agents"]:
        del a["view"]["model"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    prof = load_profile(old)
    assert {a.view["model"] for a in prof.agents} == {"gemma-3-270m"}
    assert two_agents(tmp_path, profile=str(old)).arbiter.profile == str(old)
    # The same old profile does not fit members that run another model.
    smol = {
        "agents": [{"name": "a", "model": SMOL, "views": [{"name": "x"}, {"name": "y"}]}, {"name": "b"}],
        "arbiter": {"profile": str(old)},
    }
    with pytest.raises(ConfigError, match=f"model: 'gemma-3-270m' in the profile, '{SMOL}' now"):
        config_from_dict(smol)


# ---------------------------------------------------------------- PanelAgents routing


class RecordingAgents:
    """Stands in for the Ray actors: records which agent each call reached and in which view."""

    def __init__(self, reply=lambda agent, req: "Paris"):
        self._reply = reply
        self.generated: list[tuple[str, str | None, str]] = []  # agent, view, task
        self.scored: list[tuple[str, str | None, str]] = []
        self.statused: list[str] = []
        self.pooled: list[str] = []

    def saturated(self) -> bool:
        return False

    async def status(self, agent: str) -> tuple[AgentHealth, dict]:
        self.statused.append(agent)
        return AgentHealth(name=agent, loaded=True, state="ready"), {"requests": 0}

    def pool_info(self, agent: str) -> dict:
        self.pooled.append(agent)
        return {"agent": agent}

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        self.generated.append((agent, req.view, req.task))
        await asyncio.sleep(0)
        return Generation(
            text=self._reply(agent, req),
            prompt_tokens=3,
            completion_tokens=1,
            finish_reason="stop",
            mean_logprob=-0.5,
            seconds=0.0,
        )

    async def score(
        self, agent: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        self.scored.append((agent, view, task))
        return [
            ScoredContinuation(logprob=-1.0, n_tokens=1, n_bytes=len(c), is_greedy=False)
            for c in continuations
        ]

    async def score_choices(self, agent, task, choices, members, context=""):
        raise AssertionError("not a task with choices")


def test_panel_agents_send_each_members_call_to_its_agent_in_its_voice(tmp_path):
    cfg = two_agents(tmp_path)
    agents = RecordingAgents()
    panel = PanelAgents(agents, {m.name: cfg.owner(m.name).name for m in cfg.panel})
    req = GenerateRequest(task="Capital of France?", view="someone-else")

    async def calls():
        out = await panel.generate("a/y", req)
        await panel.generate("b", req)
        await panel.score("a/x", "Capital of France?", "", [" Paris"], view="ignored")
        await panel.score("b", "Capital of France?", "", [" Paris"])
        health, _ = await panel.status("a/x")
        return out, health

    out, health = asyncio.run(calls())
    assert out.text == "Paris"
    assert agents.generated == [("a", "a/y", req.task), ("b", "b", req.task)]
    assert req.view == "someone-else"  # the caller's request is not changed
    assert agents.scored == [("a", "a/x", req.task), ("b", "b", req.task)]
    assert agents.statused == ["a"] and health.name == "a"
    assert panel.pool_info("a/y") == {"agent": "a"} and agents.pooled == ["a"]
    assert panel.saturated() is False
    with pytest.raises(KeyError):
        asyncio.run(panel.generate("c", req))


def test_the_arbiter_asks_every_member_through_its_agent(tmp_path):
    agents = RecordingAgents(lambda agent, req: "Lyon" if req.view == "a/y" else "Paris")
    arbiter = Arbiter(two_agents(tmp_path), agents)
    r = asyncio.run(arbiter.run(TaskRequest(id="t", task="Capital of France?", strategy="plurality")))
    assert sorted((a, v) for a, v, _ in agents.generated) == [("a", "a/x"), ("a", "a/y"), ("b", "b")]
    assert [c.agent for c in r.candidates] == ["a/x", "a/y", "b"]
    assert r.answer == "Paris" and r.votes == {"paris": 2.0, "lyon": 1.0}
    # The trust step counts members, not agents.
    w = arbiter.trust.weights(["a/x", "a/y", "b"])
    assert w["a/y"] < w["a/x"] == w["b"]


def test_a_scoring_strategy_scores_in_each_members_view(tmp_path):
    agents = RecordingAgents(lambda agent, req: "Lyon" if req.view == "a/y" else "Paris")
    arbiter = Arbiter(two_agents(tmp_path), agents)
    asyncio.run(arbiter.run(TaskRequest(id="t", task="Capital of France?", strategy="borda")))
    # Each member scored the answers (the task and the question-free prior) as itself.
    assert sorted({(a, v) for a, v, _ in agents.scored}) == [("a", "a/x"), ("a", "a/y"), ("b", "b")]
    assert sorted(t for a, v, t in agents.scored if v == "a/y") == ["Capital of France?", "N/A"]
