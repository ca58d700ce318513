"""Agents that speak as several views, on the real models: the prompts each view builds, one
engine under them, choices scored by the serving agent exactly as ``legion eval`` scores an item,
the Arbiter's decision over a task's choices against ``legion eval``'s, and the choices API."""

from __future__ import annotations

import asyncio
import json

import pytest

from legion.agent import Agent
from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.engine.views import Item, split_question
from legion.errors import InvalidRequest
from legion.evaluation.local_agents import LocalAgents
from legion.evaluation.multiple_choice import Scorer, evaluate
from legion.messages import GenerateRequest, TaskRequest

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a dog have?", ["three", "four", "six"], 1),
    ("Which animal says moo?", ["a cat", "a cow", "a duck"], 1),
    ("Which is the coldest?", ["fire", "the sun", "ice"], 2),
]
ITEMS = [
    Item(id=f"q{i}", context=f"Question: {q}\nAnswer:", choices=c, answer=a)
    for i, (q, c, a) in enumerate(QUESTIONS)
]
# One agent, one engine, four views: two forms, exemplars from the shipped pool, three rules.
GEMMA = {
    "name": "gemma",
    "n_threads": 1,
    "sampling": {"max_tokens": 8},
    "views": [
        {"name": "qa-tok", "scoring": "per_token"},
        {"name": "cloze-byte", "prompt_form": "cloze", "scoring": "per_byte"},
        {"name": "qa3-cal", "scoring": "calibrated", "few_shot": 3, "few_shot_seed": 2},
        {"name": "letters3", "prompt_form": "letters", "few_shot": 3, "few_shot_seed": 3},
    ],
}


@pytest.fixture(scope="module")
def gemma():
    cfg = config_from_dict({"agents": [GEMMA]})
    agent = Agent(cfg.agents[0], load_in_background=False)
    agent.engine()
    yield cfg, agent
    agent.engine().close()


def test_each_view_writes_in_its_own_voice_through_the_one_engine(gemma):
    cfg, agent = gemma
    assert [m.name for m in cfg.panel] == [f"gemma/{v['name']}" for v in GEMMA["views"]]
    plain = agent.prompt("Which animal says moo?", view="gemma/qa-tok")
    shown = agent.prompt("Which animal says moo?", view="gemma/qa3-cal")
    # The few-shot view's exemplars (drawn from the shipped ARC-Easy train split) come before the
    # question, asked and answered as questions; the zero-shot view asks the question alone.
    asked = "Question: Which animal says moo?\nAnswer:"
    assert plain.endswith(asked) and shown.endswith(asked) and len(shown) > len(plain)
    assert plain.count("Question:") == 1 and shown.count("Question:") == 4
    gens = {
        v: agent.generate(GenerateRequest(task="Which animal says moo?", view=v))
        for v in ("gemma/qa-tok", "gemma/cloze-byte", "gemma/qa3-cal")
    }
    # Views that differ only in how they score choices write the same answer (one decode shared).
    assert gens["gemma/qa-tok"].text == gens["gemma/cloze-byte"].text
    with pytest.raises(InvalidRequest, match="no view 'gemma/nope'"):
        agent.generate(GenerateRequest(task="x", view="gemma/nope"))
    stats = agent.stats()  # every view's request went to the one agent and its one engine
    assert stats["requests"] >= 3 and stats["engine"]["steps"] > 0 and stats["errors"] == 0


def test_choices_are_scored_as_legion_eval_scores_the_item(gemma):
    cfg, agent = gemma
    members = cfg.panel
    scorer = Scorer(members, None, n_threads=1)
    try:
        by_eval = scorer.score_items(ITEMS)
    finally:
        scorer.close()
    for item, (scores, _, _) in zip(ITEMS, by_eval, strict=True):
        _, question = split_question(item.context)
        served = {s.member: s for s in agent.score_choices(question, item.choices)}
        assert set(served) == {m.name for m in members}
        for m in members:
            assert served[m.name].scores == pytest.approx(scores.loglik[m.name], abs=1e-3), m.name
            assert served[m.name].n_tokens == scores.n_tokens[m.name]


def test_the_arbiter_decides_a_tasks_choices_as_legion_eval_decides_the_item(gemma, tmp_path):
    cfg, agent = gemma
    cfg = config_from_dict({"agents": [GEMMA], "data_dir": str(tmp_path / "served")})
    report: dict = {}
    strategies = ["plurality", "borda", "conflict"]
    evaluate(
        config_from_dict({"agents": [GEMMA], "data_dir": str(tmp_path / "eval")}),
        ITEMS,
        strategies,
        n_threads=1,
        report=report,
    )
    for s in strategies:
        own = cfg.model_copy(update={"data_dir": str(tmp_path / s)})  # its own trust weights
        arbiter = Arbiter(own, LocalAgents({"gemma": agent}))
        served = []
        for item in ITEMS:
            _, question = split_question(item.context)
            req = TaskRequest(id=item.id, task=question, strategy=s, choices=item.choices)
            result = asyncio.run(arbiter.run(req))
            assert result.choice is not None and result.answer == item.choices[result.choice.index]
            assert sum(result.choice.probabilities) == pytest.approx(1.0, abs=1e-4)
            assert set(result.choice.picks) == {m.name for m in cfg.panel}
            served.append(result.choice.index)
        assert served == report["decisions"][s], s


def test_v1_tasks_answers_with_a_choice_its_probabilities_and_each_agents_pick(client, legion_config):
    body = {"task": "Which animal says moo?", "choices": ["a cat", "a cow", "a duck"], "cache": False}
    r = client.post("/v1/tasks", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    choice = data["choice"]
    assert data["answer"] == choice["choices"][choice["index"]]
    assert choice["probability_source"] == "mean"  # the test config has no profile
    assert sum(choice["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert choice["confidence"] == pytest.approx(choice["probabilities"][choice["index"]], abs=1e-6)
    assert set(choice["picks"]) == {a.name for a in legion_config.agents}
    assert {c["agent"] for c in data["candidates"]} == set(choice["picks"])
    assert [e["step"] for e in data["trace"]][-1] == "decision"

    sure = client.post("/v1/tasks", json={**body, "min_confidence": 1.0}).json()
    assert sure["answer"] is None and "below min_confidence 1" in sure["choice"]["abstained"]

    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": body["task"]}], "choices": body["choices"]},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] in body["choices"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"choices": ["only one"]}, "send 2 to 26 choices"),
        ({"choices": ["yes", "Yes "]}, "repeats choices[0]"),
        ({"choices": ["a", ""]}, "choices[1] is empty"),
        ({"choices": ["a", "x" * 1001]}, "the limit is 1000"),
        ({"choices": [str(i) for i in range(27)]}, "send 2 to 26 choices"),
        ({"choices": ["a", "b"], "strategy": "debate"}, "decided over their scores"),
        ({"choices": ["a", "b"], "min_confidence": 1.5}, "from 0 to 1"),
        ({"min_confidence": 0.5}, "applies to a task with choices"),
    ],
)
def test_bad_choices_are_a_400_that_says_what_to_fix(client, extra, fragment):
    r = client.post("/v1/tasks", json={"task": "Pick one", **extra})
    assert r.status_code == 400, r.text
    assert fragment in json.dumps(r.json())


DEFAULTS_APP = "legion-defaults"


@pytest.fixture(scope="module")
def defaults_url(legion_url, legion_config, tmp_path_factory):
    """The default line-up as `legion serve` runs it with no config: two agents, nine views, the
    shipped profile (only the app's name, its route and its data folder are the test's), beside
    the session's app on the same Serve proxy."""
    from ray import serve

    from actors import stop_actors
    from serve_app import build_app
    from tests.integration.conftest import wait_healthy

    cfg = config_from_dict(
        {
            "serve": {"app_name": DEFAULTS_APP, "port": legion_config.serve.port, "max_replicas": 1},
            "data_dir": str(tmp_path_factory.mktemp("defaults-data")),
        }
    )
    serve.run(build_app(cfg), name=DEFAULTS_APP, route_prefix="/defaults")
    url = f"{legion_url}/defaults"
    wait_healthy(url)
    yield url, cfg
    serve.delete(DEFAULTS_APP)
    stop_actors(cfg)


def test_the_default_line_up_serves_two_models_as_nine_views_with_its_profile(defaults_url):
    import httpx

    url, cfg = defaults_url
    assert cfg.arbiter.profile is not None  # shipped with the package, loaded by default
    with httpx.Client(base_url=url, timeout=600) as client:
        listed = client.get("/v1/agents").json()
        views = {a["name"]: [v["name"] for v in a["views"]] for a in listed["agents"]}
        assert views == {a.name: [m.name for m in a.members()] for a in cfg.agents}
        assert {a["name"]: a["health"]["model"]["architecture"] for a in listed["agents"]} == {
            "gemma": "gemma3",
            "smol": "llama",
        }
        assert all(v["profile_weight"] is not None for a in listed["agents"] for v in a["views"])
        body = {
            "task": "What gas do plants absorb from the air?",
            "choices": ["oxygen", "carbon dioxide", "nitrogen"],
            "cache": False,
        }
        data = client.post("/v1/tasks", json=body).json()
        assert data["choice"]["probability_source"] == "profile"
        assert set(data["choice"]["picks"]) == {m.name for m in cfg.panel}
        assert (
            data["answer"] in body["choices"]
            and data["strategy"] == cfg.arbiter.default_choice_strategy == "learned"
        )
        free = client.post("/v1/tasks", json={"task": "What is the capital of France?", "cache": False})
        assert free.status_code == 200, free.text
        assert free.json()["strategy"] == cfg.arbiter.default_strategy == "plurality"
        assert {c["agent"] for c in free.json()["candidates"]} == {m.name for m in cfg.panel}


def test_adaptive_fanout_asks_the_default_line_up_in_waves_and_says_whom_it_skipped(defaults_url):
    import httpx

    url, cfg = defaults_url
    panel = [m.name for m in cfg.panel]
    body = {
        "task": "Which of these is a mammal?",
        "choices": ["dog", "trout", "sparrow"],
        "cache": False,
        "fanout": "adaptive",
    }
    with httpx.Client(base_url=url, timeout=600) as client:
        data = client.post("/v1/tasks", json=body).json()
        assert data["fanout"] == "adaptive" and data["answer"] in body["choices"]
        asked = [c["agent"] for c in data["candidates"]]
        # Whom it asked and whom it skipped make up the panel, each once; the stop is traced.
        assert sorted(asked + data["skipped_agents"]) == sorted(panel)
        assert data["agents_asked"] == len(asked) >= cfg.arbiter.adaptive_first_wave
        stop = next(e["data"] for e in data["trace"] if e["step"] == "adaptive_stop")
        assert stop["skipped"] == data["skipped_agents"] and stop["risk"] == round(data["adaptive_risk"], 4)
        assert set(data["choice"]["picks"]) == set(asked)
        if data["skipped_agents"]:  # it stopped early: the vote was settled below the limit
            assert data["adaptive_risk"] <= cfg.arbiter.adaptive_risk
        # Free text in waves too, and a debate cannot be adaptive: a 422 that names the field.
        free = client.post(
            "/v1/tasks", json={"task": "What is the capital of France?", "cache": False, "fanout": "adaptive"}
        ).json()
        assert free["fanout"] == "adaptive" and 1 <= free["agents_asked"] <= len(panel)
        refused = client.post("/v1/tasks", json={"task": "Plan.", "strategy": "debate", "fanout": "adaptive"})
        assert refused.status_code == 422 and "fanout" in refused.json()["error"]["message"]
