"""Adaptive fan-out: the stop rule's statistics on synthetic votes whose truth is known, and the
Arbiter asking in waves (choices and free text), reporting who it asked and skipped, with the
request checks. No Ray, no model: the agents are the scripted stand-ins of the Arbiter's tests;
the rule, the Arbiter and the strategies are the real ones."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from legion.arbitration import adaptive
from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.errors import InvalidRequest
from legion.evaluation.calibrate import FitResult, make_profile
from legion.messages import TaskRequest
from legion.service.api import ChatBody, TaskBody, chat_request, task_request
from tests.unit.test_arbiter import ScriptedAgents
from tests.unit.test_choices import ChoiceAgents

# ---------------------------------------------------------------- the rule on synthetic votes

SKILLS = [0.5, 0.45, 0.4, 0.35, 0.3, 0.3, 0.25, 0.2, 0.15]


def synthetic_panel(n_items: int, n_options: int, seed: int):
    """Votes of independent members with the skills above (one-coin model), truth known."""
    rng = np.random.default_rng(seed)
    names = [f"m{i}" for i in range(len(SKILLS))]
    skill = dict(zip(names, SKILLS, strict=True))
    items = []
    for _ in range(n_items):
        truth = int(rng.integers(n_options))
        votes = {}
        for m in names:
            if rng.random() < adaptive.accuracy_on(skill[m], n_options):
                votes[m] = str(truth)
            else:
                votes[m] = str(rng.choice([j for j in range(n_options) if j != truth]))
        items.append((str(truth), votes))
    return names, skill, items


def weighted_leader(votes, members, skill, k):
    points = adaptive.vote_points({m: votes[m] for m in members}, skill, k)
    return max(sorted(points), key=lambda x: points[x])


@pytest.mark.parametrize("n_options", [2, 4])
def test_the_rule_stops_early_and_rarely_differs_from_the_full_vote(n_options):
    names, skill, items = synthetic_panel(400, n_options, seed=n_options)
    rule = adaptive.StopRule(names, skill, dict.fromkeys(names, 1.0))
    plan = rule.plan(2, 1)
    limit = 0.05
    differs = asked = right_full = right_adaptive = 0
    for truth, votes in items:
        full = weighted_leader(votes, names, skill, n_options)

        def look(got, remaining, votes=votes):
            leader = weighted_leader(votes, got, skill, n_options)
            return rule.look_votes({m: votes[m] for m in got}, leader, remaining, n_options)

        got, stop = adaptive.run_waves(plan, look, limit)
        differs += stop.leader != full
        asked += len(got)
        right_full += full == truth
        right_adaptive += stop.leader == truth
    n = len(items)
    # The rule controls how often the early answer differs from the full panel's: at most the
    # limit, with room for the Monte Carlo error of 400 items (a binomial standard error of 0.011).
    assert differs / n <= limit + 0.03
    assert asked / n < 0.8 * len(names)  # it saved calls
    assert right_adaptive >= right_full - 0.03 * n


def test_free_text_votes_settle_on_agreement_and_not_on_scattered_answers():
    names = ["a", "b", "c", "d", "e"]
    skill = dict.fromkeys(names, 0.5)
    rule = adaptive.StopRule(names, skill, dict.fromkeys(names, 1.0))
    agree = rule.look_votes({"a": "paris", "b": "paris", "c": "paris"}, "paris", ["d", "e"], None)
    scattered = rule.look_votes({"a": "paris", "b": "lyon", "c": "nice"}, "paris", ["d", "e"], None)
    assert agree.risk < 0.05 < scattered.risk
    # Failed members do not vote; no answer at all is no leader, never settled.
    assert rule.look_votes({"a": None}, None, names[1:], None).settled(0.5) is False


def test_risk_is_exact_when_no_member_is_left_and_deterministic_otherwise():
    skill = {"a": 0.4, "b": 0.4}
    assert adaptive.settle_risk(adaptive.vote_points({"a": "x", "b": "x"}, skill, 4), "x", [], 4) == 0.0
    assert adaptive.settle_risk(adaptive.vote_points({"a": "x", "b": "y"}, skill, 4), "x", [], 4) == 0.5
    points = adaptive.vote_points({"a": "x"}, skill, 4)
    rest = [(0.5, 1.0), (0.5, 1.0)]
    assert adaptive.settle_risk(points, "x", rest, 4) == adaptive.settle_risk(points, "x", rest, 4)


def test_skill_carries_over_between_numbers_of_options():
    s = adaptive.skill_from_accuracy(0.46, 4)
    assert adaptive.accuracy_on(s, 4) == pytest.approx(0.46)
    assert adaptive.accuracy_on(s, 2) == pytest.approx(0.5 + s / 2)
    assert adaptive.skill_from_accuracy(0.2, 4) == 0.0  # below chance: no skill, weight 0
    assert adaptive.vote_weight(0.0, 4) == pytest.approx(0.0)


def test_order_is_reliability_per_unit_of_compute():
    order = adaptive.fanout_order(
        ["cheap", "dear", "weak"], {"cheap": 1.0, "dear": 1.5, "weak": 0.2}, {"dear": 2.0}
    )
    assert order == ["cheap", "dear", "weak"]
    assert adaptive.waves(order, 2, 1) == [["cheap", "dear"], ["weak"]]


# ---------------------------------------------------------------- the Arbiter in waves

# Each view writes from its own role prompt (views alike in what they write are one unit).
AGENTS = [
    {
        "name": "a",
        "views": [
            {"name": "x", "role_prompt": "You are x."},
            {"name": "y", "scoring": "per_token", "role_prompt": "You are y."},
            {"name": "z", "role_prompt": "You are z."},
        ],
    },
    {
        "name": "b",
        "views": [{"name": "u", "role_prompt": "You are u."}, {"name": "v", "scoring": "calibrated"}],
    },
]
MEMBERS = ["a/x", "a/y", "a/z", "b/u", "b/v"]


def profiled(tmp_path, accuracy, points=None, covariance=None, **arbiter):
    cfg = config_from_dict({"agents": AGENTS, "data_dir": str(tmp_path)})
    result = FitResult(
        weights=np.ones(len(MEMBERS)),
        l2=0.01,
        cv=[{"l2": 0.01, "log_loss": 1.0, "accuracy": 0.5}],
        train_accuracy=0.5,
        single_accuracy=accuracy,
        vote_points=points or {},
        covariance=None if covariance is None else np.asarray(covariance, dtype=float),
    )
    prof = make_profile(
        result,
        cfg.panel,
        method="conditional_logit",
        data=["t.jsonl"],
        items_per_file={"t.jsonl": 9},
        excluded=0,
        folds=3,
    )
    path = tmp_path / "profile.json"
    path.write_text(prof.model_dump_json(), encoding="utf-8")
    return config_from_dict(
        {
            "agents": AGENTS,
            "data_dir": str(tmp_path),
            "arbiter": {"profile": str(path), "agent_timeout_s": 30.0, **arbiter},
        }
    )


ACCURACY = {"a/x": 0.9, "a/y": 0.85, "a/z": 0.5, "b/u": 0.9, "b/v": 0.6}


def test_choices_stop_once_settled_and_the_members_left_are_never_asked(tmp_path):
    cfg = profiled(tmp_path, ACCURACY, fanout="adaptive")
    scores = {m: [3.0, 0.0, 0.0] for m in MEMBERS}
    agents = ChoiceAgents(scores)
    r = asyncio.run(Arbiter(cfg, agents).run(choose("plurality")))
    asked = [m for _, _, _, ms, _ in agents.calls for m in ms]
    # The two best members per unit of compute agree firmly: the rest is skipped, never scored.
    assert asked == ["a/x", "b/u"] and r.agents_asked == 2
    # b/v is more accurate than a/z, but calibrated scoring costs it two passes: it comes last.
    assert r.skipped_agents == ["a/y", "a/z", "b/v"]
    assert r.fanout == "adaptive" and r.adaptive_risk is not None and r.adaptive_risk <= 0.05
    assert r.answer == "oxygen" and [c.agent for c in r.candidates] == ["a/x", "b/u"]
    stop = next(e.data for e in r.trace if e.step == "adaptive_stop")
    assert stop["skipped"] == r.skipped_agents


def test_choices_keep_asking_while_the_vote_is_split(tmp_path):
    cfg = profiled(tmp_path, ACCURACY, fanout="adaptive")
    scores = {
        "a/x": [3.0, 0, 0],
        "b/u": [0, 3.0, 0],
        "a/y": [0, 3.0, 0],
        "b/v": [0, 3.0, 0],
        "a/z": [3.0, 0, 0],
    }
    agents = ChoiceAgents(scores)
    r = asyncio.run(Arbiter(cfg, agents).run(choose("plurality")))
    assert r.agents_asked > 2 and r.answer == "carbon dioxide"


def test_learned_weighs_the_profile_sway_of_the_members_not_asked(tmp_path):
    # b/v carries almost all the sway: while it is unheard the others' agreement settles nothing.
    points = {"a/x": 0.05, "a/y": 0.05, "a/z": 0.05, "b/u": 0.05, "b/v": 20.0}
    cfg = profiled(tmp_path, ACCURACY, points, fanout="adaptive")
    scores = {m: [3.0, 0.0, 0.0] for m in MEMBERS}
    agents = ChoiceAgents(scores)
    r = asyncio.run(Arbiter(cfg, agents).run(choose("learned")))
    assert r.agents_asked >= 1 and "b/v" not in r.skipped_agents
    assert next(m for _, _, _, ms, _ in agents.calls for m in ms) == "b/v"  # the most sway per cost first


def test_full_fanout_is_unchanged_and_reports_every_member(tmp_path):
    cfg = profiled(tmp_path, ACCURACY)
    agents = ChoiceAgents({m: [3.0, 0.0, 0.0] for m in MEMBERS})
    r = asyncio.run(Arbiter(cfg, agents).run(choose("plurality")))
    assert r.fanout == "all" and r.agents_asked == 5 and r.skipped_agents == [] and r.adaptive_risk is None


def test_a_request_may_ask_for_adaptive_against_the_config(tmp_path):
    cfg = profiled(tmp_path, ACCURACY)
    agents = ChoiceAgents({m: [3.0, 0.0, 0.0] for m in MEMBERS})
    r = asyncio.run(Arbiter(cfg, agents).run(choose("plurality", fanout="adaptive")))
    assert r.fanout == "adaptive" and r.agents_asked == 2


def test_free_text_asks_in_waves_and_groups_the_answers_asked(tmp_path):
    cfg = profiled(tmp_path, ACCURACY, fanout="adaptive")
    agents = ScriptedAgents(lambda agent, req: "Paris")
    r = asyncio.run(
        Arbiter(cfg, agents).run(TaskRequest(id="t", task="Capital of France?", strategy="plurality"))
    )
    assert r.answer == "Paris" and r.agents_asked < 5
    assert len(agents.asked) == r.agents_asked  # members skipped were never asked to write
    assert r.skipped_agents and set(r.skipped_agents).isdisjoint(c.agent for c in r.candidates)


def test_views_that_write_alike_are_asked_together_and_vote_as_one_unit(tmp_path):
    cfg = config_from_dict(
        {
            "agents": [
                {"name": "a", "views": [{"name": "x"}, {"name": "y", "scoring": "per_token"}]},
                {"name": "b"},
            ]
        }
    )
    owner = {m.name: cfg.owner(m.name).name for m in cfg.panel}
    rule = adaptive.stop_rule("plurality", cfg.panel, None, None, choices=False, owner=owner)
    assert rule.units == {"a/x": ["a/x", "a/y"], "b": ["b"]}
    assert sorted(m for wave in rule.plan(1, 1) for m in wave) == ["a/x", "a/y", "b"]
    assert ["a/x", "a/y"] in rule.plan(1, 1)  # one wave holds the whole unit
    # On choices every member scores in its own view: no units.
    assert adaptive.stop_rule("plurality", cfg.panel, None, None, choices=True, owner=owner).units == {
        "a/x": ["a/x"],
        "a/y": ["a/y"],
        "b": ["b"],
    }


def test_free_text_that_disagrees_asks_everyone(tmp_path):
    cfg = profiled(tmp_path, ACCURACY, fanout="adaptive")
    answers = {"a/x": "Paris", "b/u": "Lyon", "a/y": "Nice", "b/v": "Lille", "a/z": "Paris"}
    agents = ScriptedAgents(lambda agent, req: answers[req.view])
    r = asyncio.run(
        Arbiter(cfg, agents).run(TaskRequest(id="t", task="Capital of France?", strategy="plurality"))
    )
    assert r.agents_asked == 5 and r.skipped_agents == [] and r.answer == "Paris"


def choose(strategy, fanout=None):
    return TaskRequest(
        id="task-1",
        task="Which gas do plants take in?",
        strategy=strategy,
        choices=["oxygen", "carbon dioxide", "helium"],
        fanout=fanout,
    )


# ---------------------------------------------------------------- request checks


def test_adaptive_is_refused_for_strategies_that_ask_every_agent_again(tmp_path):
    cfg = profiled(tmp_path, ACCURACY)
    with pytest.raises(InvalidRequest) as e:
        task_request(TaskBody(task="Plan a trip.", strategy="debate", fanout="adaptive"), cfg)
    assert e.value.details["field"] == "fanout" and "conflict" in e.value.message
    body = ChatBody(model="legion:decompose", messages=[{"role": "user", "content": "Hi"}], fanout="adaptive")
    with pytest.raises(InvalidRequest):
        chat_request(body, cfg)


def test_the_config_default_falls_back_to_all_where_adaptive_does_not_apply(tmp_path):
    cfg = profiled(tmp_path, ACCURACY, fanout="adaptive")
    assert task_request(TaskBody(task="Plan a trip.", strategy="debate"), cfg).fanout == "all"
    assert task_request(TaskBody(task="Plan a trip.", strategy="conflict"), cfg).fanout == "adaptive"
    assert task_request(TaskBody(task="Plan a trip.", fanout="all"), cfg).fanout == "all"


def test_the_http_routes_refuse_a_bad_fanout_naming_the_field(tmp_path):
    from tests.unit.test_routes import client

    http = client(tmp_path)
    r = http.post("/v1/tasks", json={"task": "Name a colour.", "fanout": "sometimes"})
    assert 400 <= r.status_code < 500 and "fanout" in r.text and "adaptive" in r.text, r.text
    chat = {"messages": [{"role": "user", "content": "Hi"}], "fanout": 1}
    r = http.post("/v1/chat/completions", json=chat)
    assert 400 <= r.status_code < 500 and "fanout" in r.text, r.text
    r = http.post("/v1/tasks", json={"task": "Plan a trip.", "strategy": "decompose", "fanout": "adaptive"})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "fanout"
