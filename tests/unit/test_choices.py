"""A task with choices: the request's checks (``check_choices``, through ``task_request``,
``chat_request`` and the HTTP route), and the Arbiter's choices path end to end (``_choose``:
one ``score_choices`` call per agent, each member's pick, the strategy's decision, the
probabilities, ``min_confidence``). No Ray, no model: the agents are a scripted stand-in behind
the ``Agents`` protocol; the Arbiter and the strategies are the real ones."""

from __future__ import annotations

import asyncio
import math

import pytest

from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.errors import AgentUnavailable, InvalidChoices, InvalidRequest, NoCandidates, Overloaded
from legion.messages import ChoiceScores, TaskRequest, TaskResult
from legion.service.api import ChatBody, TaskBody, chat_request, chat_response, task_request, task_response
from tests.unit.test_panel import write_profile
from tests.unit.test_routes import client

CHOICES = ["oxygen", "carbon dioxide", "helium"]
QUESTION = "Which gas do plants take in?"
# Agent a speaks as views x and y, agent b as view z, agent c has no views (it is one member).
AGENTS = [
    {"name": "a", "views": [{"name": "x"}, {"name": "y", "scoring": "per_token"}]},
    {"name": "b", "views": [{"name": "z", "prompt_form": "cloze"}]},
    {"name": "c"},
]
MEMBERS = ["a/x", "a/y", "b/z", "c"]


class ChoiceAgents:
    """Each member scores the choices ``scores[member]``; an agent named in ``fail`` raises that
    (``HANG``: never answers until cancelled). Records each ``score_choices`` call; a task with
    choices must neither generate nor score answers."""

    HANG = object()

    def __init__(self, scores, fail=None, saturated=False):
        self._scores = scores
        self._fail = fail or {}
        self._saturated = saturated
        self.calls: list[tuple[str, str, list[str], list[str], str]] = []

    def saturated(self) -> bool:
        return self._saturated

    async def score_choices(self, agent, task, choices, members, context=""):
        self.calls.append((agent, task, list(choices), list(members), context))
        failure = self._fail.get(agent)
        if failure is self.HANG:
            await asyncio.Event().wait()
        if failure is not None:
            raise failure
        await asyncio.sleep(0)
        return [
            ChoiceScores(
                member=m, scores=self._scores[m], loglik=self._scores[m], n_tokens=[1] * len(choices)
            )
            for m in members
        ]

    async def generate(self, agent, req):
        raise AssertionError("a task with choices generates nothing")

    async def score(self, agent, task, context, continuations, view=None):
        raise AssertionError("a task with choices scores no answers")


def config(tmp_path, agents=AGENTS, **arbiter):
    return config_from_dict(
        {"agents": agents, "arbiter": {"agent_timeout_s": 30.0, **arbiter}, "data_dir": str(tmp_path)}
    )


def make(tmp_path, agents, profile_weights=None, **arbiter):
    """The Arbiter over ``agents``; with ``profile_weights`` (member -> weight) a profile for the
    panel with those weights is written and configured."""
    if profile_weights is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        panel = config(tmp_path).panel
        path = write_profile(tmp_path / "profile.json", panel, [profile_weights[m.name] for m in panel])
        arbiter = {"profile": str(path), **arbiter}
    return Arbiter(config(tmp_path, **arbiter), agents)


def choose(strategy="plurality", choices=CHOICES, min_confidence=None, context=""):
    return TaskRequest(
        id="task-1",
        task=QUESTION,
        strategy=strategy,
        choices=list(choices),
        min_confidence=min_confidence,
        context=context,
    )


def run(arbiter: Arbiter, req: TaskRequest) -> TaskResult:
    return asyncio.run(arbiter.run(req))


def trace_data(result: TaskResult, step: str) -> dict:
    return next(e.data for e in result.trace if e.step == step)


# ---------------------------------------------------------------- the decision


def test_every_member_scores_through_its_agent_and_plurality_decides(tmp_path):
    scores = {"a/x": [2.0, 0.0, 0.0], "a/y": [0.0, 1.0, 0.0], "b/z": [0.0, 3.0, 1.0], "c": [0.0, 1.0, 2.0]}
    agents = ChoiceAgents(scores)
    arbiter = make(tmp_path, agents)
    r = run(arbiter, choose(context="Plants breathe."))
    # One call per agent, its members batched, the task and its choices as sent.
    assert sorted((a, tuple(ms)) for a, _, _, ms, _ in agents.calls) == [
        ("a", ("a/x", "a/y")),
        ("b", ("b/z",)),
        ("c", ("c",)),
    ]
    assert {(t, tuple(ch), ctx) for _, t, ch, _, ctx in agents.calls} == {
        (QUESTION, tuple(CHOICES), "Plants breathe.")
    }
    # Each member's pick is its best-scored choice; carbon dioxide has two of four votes.
    assert r.choice.picks == {"a/x": 0, "a/y": 1, "b/z": 1, "c": 2}
    assert r.answer == "carbon dioxide" and r.choice.index == 1 and r.choice.choices == CHOICES
    assert r.votes == {"0": 1.0, "1": 2.0, "2": 1.0}
    assert [c.agent for c in r.candidates] == MEMBERS and all(c.ok for c in r.candidates)
    assert [c.text for c in r.candidates] == ["oxygen", "carbon dioxide", "carbon dioxide", "helium"]
    assert r.choice.abstained is None and r.missing_agents == []
    assert r.choice.confidence == pytest.approx(r.choice.probabilities[1], abs=1e-6)
    steps = [e.step for e in r.trace]
    assert steps[0] == "choices" and "scores" in steps and steps[-1] == "decision"
    assert steps.count("candidate") == 4
    assert trace_data(r, "choices")["agents"] == {"a": ["a/x", "a/y"], "b": ["b/z"], "c": ["c"]}
    # The trust step counts the members that agreed with the decision.
    w = arbiter.trust.weights(MEMBERS)
    assert w["a/y"] == w["b/z"] > w["a/x"] and w["a/x"] == w["c"]


def test_without_a_profile_the_probabilities_are_the_mean_of_the_members_softmax(tmp_path):
    two = ["yes", "no"]
    # a/x: 3:1 for yes; a/y: even; b/z: the same 3:1, shifted (a softmax ignores the shift); c: 1:3.
    scores = {
        "a/x": [math.log(3), 0.0],
        "a/y": [0.0, 0.0],
        "b/z": [10 + math.log(3), 10.0],
        "c": [0.0, math.log(3)],
    }
    r = run(make(tmp_path, ChoiceAgents(scores)), choose(choices=two))
    assert r.choice.probability_source == "mean"
    # (0.75 + 0.5 + 0.75 + 0.25) / 4 = 0.5625
    assert r.choice.probabilities == pytest.approx([0.5625, 0.4375], abs=1e-6)
    assert r.choice.index == 0 and r.choice.confidence == pytest.approx(0.5625, abs=1e-6)


def test_with_a_profile_the_probabilities_are_its_fitted_combination(tmp_path):
    two = ["yes", "no"]
    scores = {"a/x": [math.log(3), 0.0], "a/y": [0.0, math.log(9)], "b/z": [0.0, 5.0], "c": [0.0, 5.0]}
    # Only a/x carries weight, 2: P = softmax(2 * log_softmax(a/x)) = (0.75^2, 0.25^2) / 0.625.
    arbiter = make(
        tmp_path, ChoiceAgents(scores), profile_weights={"a/x": 2.0, "a/y": 0.0, "b/z": 0.0, "c": 0.0}
    )
    r = run(arbiter, choose(choices=two))
    assert r.choice.probability_source == "profile"
    assert r.choice.probabilities == pytest.approx([0.9, 0.1], abs=1e-6)
    # Plurality still decides the answer (three votes for "no"); its probability is the profile's.
    assert r.choice.index == 1 and r.choice.confidence == pytest.approx(0.1, abs=1e-6)


# ---------------------------------------------------------------- min_confidence


def test_below_min_confidence_the_answer_is_null_and_says_why(tmp_path):
    two = ["yes", "no"]
    scores = {
        "a/x": [math.log(3), 0.0],
        "a/y": [0.0, 0.0],
        "b/z": [math.log(3), 0.0],
        "c": [0.0, math.log(3)],
    }
    r = run(make(tmp_path, ChoiceAgents(scores)), choose(choices=two, min_confidence=0.6))
    assert r.choice.index is None and r.choice.confidence == pytest.approx(0.5625, abs=1e-6)
    assert "'yes' has probability 0.562" in r.choice.abstained and "min_confidence 0.6" in r.choice.abstained
    assert trace_data(r, "below_min_confidence")["choice"] == 0
    body = task_response(r).model_dump()
    assert body["answer"] is None and body["choice"]["index"] is None and body["choice"]["abstained"]
    assert chat_response(r, "legion").choices[0].message.content is None
    # A min_confidence the decided choice's probability reaches: the answer stands.
    ok = run(make(tmp_path / "ok", ChoiceAgents(scores)), choose(choices=two, min_confidence=0.5))
    assert ok.choice.index == 0 and ok.choice.abstained is None
    assert (
        task_response(ok).answer == "yes" and chat_response(ok, "legion").choices[0].message.content == "yes"
    )


def test_the_http_route_answers_null_below_min_confidence(tmp_path):
    scores = {"a/x": [1.0, 0.0, 0.0], "a/y": [1.0, 0.0, 0.0], "b/z": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
    arbiter = make(tmp_path / "arbiter", ChoiceAgents(scores))
    http = client(tmp_path, arbiter)
    body = {"task": QUESTION, "choices": [" oxygen ", "carbon dioxide", "helium"], "cache": False}
    sure = http.post("/v1/tasks", json=body)
    assert sure.status_code == 200, sure.text
    got = sure.json()
    assert got["answer"] == "oxygen" and got["choice"]["choices"] == CHOICES  # stripped
    assert got["choice"]["picks"] == {"a/x": 0, "a/y": 0, "b/z": 1, "c": 2}
    unsure = http.post("/v1/tasks", json={**body, "min_confidence": 0.99})
    assert unsure.status_code == 200, unsure.text
    assert (
        unsure.json()["answer"] is None
        and "below min_confidence 0.99" in unsure.json()["choice"]["abstained"]
    )


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("failure", "error", "code"),
    [
        (
            AgentUnavailable("agent actor died during the task"),
            "agent actor died during the task",
            "not_ready",
        ),
        (ValueError("boom"), "agent raised ValueError: boom", None),
        (ChoiceAgents.HANG, "no scores within agent_timeout_s=0.05", None),
    ],
    ids=["gone", "broken", "silent"],
)
def test_a_failed_agent_makes_its_members_failed_candidates(tmp_path, failure, error, code):
    scores = {"a/x": [1.0, 0.0, 0.0], "a/y": [1.0, 0.0, 0.0], "b/z": [0.0, 5.0, 0.0], "c": [0.0, 0.0, 1.0]}
    r = run(make(tmp_path, ChoiceAgents(scores, fail={"a": failure}), agent_timeout_s=0.05), choose())
    failed = [c for c in r.candidates if not c.ok]
    assert [c.agent for c in failed] == ["a/x", "a/y"] and r.missing_agents == ["a/x", "a/y"]
    assert {c.error for c in failed} == {error} and {c.error_code for c in failed} == {code}
    assert [e.data for e in r.trace if e.step == "agent_failed"] == [
        {"agent": m, "error": error, "during": "choices"} for m in ("a/x", "a/y")
    ]
    # The rest decide: b/z and c split, b/z's higher score breaks the tie; a's members are
    # neither picks nor in the probabilities (the mean of b/z's and c's).
    assert r.choice.picks == {"b/z": 1, "c": 2} and r.choice.index == 1
    pz = [math.exp(s) / sum(math.exp(t) for t in scores["b/z"]) for s in scores["b/z"]]
    pc = [math.exp(s) / sum(math.exp(t) for t in scores["c"]) for s in scores["c"]]
    assert r.choice.probabilities == pytest.approx(
        [(u + v) / 2 for u, v in zip(pz, pc, strict=True)], abs=1e-6
    )


def test_every_agent_failing_is_no_candidates_and_every_agent_full_is_overloaded(tmp_path):
    boom = {a: ValueError("boom") for a in ("a", "b", "c")}
    with pytest.raises(NoCandidates, match="every agent failed"):
        run(make(tmp_path, ChoiceAgents({}, fail=boom)), choose())
    full = {a: Overloaded("queue full") for a in ("a", "b", "c")}
    with pytest.raises(Overloaded, match="every agent is saturated"):
        run(make(tmp_path, ChoiceAgents({}, fail=full)), choose())


# ---------------------------------------------------------------- strategies


@pytest.mark.parametrize("strategy", ["debate", "decompose"])
def test_a_writing_strategy_is_refused_before_any_agent_works(tmp_path, strategy):
    agents = ChoiceAgents({m: [1.0, 0.0, 0.0] for m in MEMBERS})
    with pytest.raises(InvalidChoices, match=f"strategy '{strategy}'") as err:
        run(make(tmp_path, agents), choose(strategy=strategy))
    assert err.value.details["field"] == "strategy" and agents.calls == []
    with pytest.raises(InvalidChoices) as err:
        task_request(TaskBody(task=QUESTION, choices=CHOICES, strategy=strategy), config(tmp_path))
    assert err.value.details["field"] == "strategy"
    assert strategy not in err.value.details["allowed"]
    assert {"plurality", "learned", "conflict"} <= set(err.value.details["allowed"])


# One member (a/x) is right and trusted by the profile; the three others agree on another choice.
LONE_EXPERT = {"a/x": [0.0, 3.0, 0.0], "a/y": [2.0, 0.0, 0.0], "b/z": [2.0, 0.0, 0.0], "c": [2.0, 0.0, 0.0]}
EXPERT_WEIGHTS = {"a/x": 3.0, "a/y": 0.0, "b/z": 0.0, "c": 0.0}


def test_learned_decides_by_the_profile_where_plurality_counts_votes(tmp_path):
    learned = run(
        make(tmp_path / "l", ChoiceAgents(LONE_EXPERT), profile_weights=EXPERT_WEIGHTS), choose("learned")
    )
    voted = run(
        make(tmp_path / "p", ChoiceAgents(LONE_EXPERT), profile_weights=EXPERT_WEIGHTS), choose("plurality")
    )
    assert voted.choice.index == 0 and voted.answer == "oxygen"
    assert learned.choice.index == 1 and learned.answer == "carbon dioxide"
    assert learned.strategy == "learned" and trace_data(learned, "decision")["source"] == "scores"
    # The learned votes are the profile's probabilities, which the choice reports too.
    assert [learned.votes[str(i)] for i in range(3)] == pytest.approx(learned.choice.probabilities, abs=1e-6)
    assert learned.choice.probability_source == "profile"


def test_learned_without_a_profile_says_to_fit_one(tmp_path):
    with pytest.raises(InvalidRequest, match="needs a profile"):
        run(make(tmp_path, ChoiceAgents(LONE_EXPERT)), choose("learned"))


def test_conflict_keeps_a_clear_vote_and_resolves_a_split_one(tmp_path):
    clear = {"a/x": [1.0, 0.0], "a/y": [1.0, 0.0], "b/z": [1.0, 0.0], "c": [0.0, 1.0]}
    r = run(make(tmp_path / "clear", ChoiceAgents(clear)), choose("conflict", choices=["yes", "no"]))
    d = trace_data(r, "decision")
    assert r.choice.index == 0 and d["split"] is False and d["resolved_by"] is None
    # Two against two. The members for "no" score it barely above "yes" (10.01 against 10), but
    # their best score is the highest, which breaks plurality's tie for "no"; the members for
    # "yes" are sure of it. The equilibrium over every member's scores settles on "yes".
    split = {"a/x": [0.0, -5.0], "a/y": [0.0, -5.0], "b/z": [10.0, 10.01], "c": [10.0, 10.01]}
    tie = run(make(tmp_path / "plurality", ChoiceAgents(split)), choose("plurality", choices=["yes", "no"]))
    assert tie.choice.index == 1 and trace_data(tie, "decision")["tied"] == ["1", "0"]
    r = run(make(tmp_path / "split", ChoiceAgents(split)), choose("conflict", choices=["yes", "no"]))
    d = trace_data(r, "decision")
    assert d["split"] is True and d["resolved_by"] == "equilibrium" and d["init"].startswith("loglik")
    assert r.choice.index == 0 and r.answer == "yes"


def test_a_tie_in_votes_goes_to_the_members_standing_before_their_scores(tmp_path):
    # Two votes each. The "oxygen" members are sure of it (best score -0.1 against -2), but the
    # profile weighs the "helium" members ten times as much: standing breaks the tie first.
    scores = {
        "a/x": [-0.1, -5.0, -6.0],
        "a/y": [-0.1, -5.0, -6.0],
        "b/z": [-5.0, -6.0, -2.0],
        "c": [-5.0, -6.0, -2.0],
    }
    even = run(make(tmp_path / "even", ChoiceAgents(scores)), choose())
    assert even.choice.index == 0  # equal standing (fresh trust): the better score wins
    weighted = run(
        make(
            tmp_path / "profiled",
            ChoiceAgents(scores),
            profile_weights={"a/x": 0.1, "a/y": 0.1, "b/z": 1.0, "c": 1.0},
        ),
        choose(),
    )
    assert weighted.votes == even.votes == {"0": 2.0, "2": 2.0}
    assert weighted.choice.index == 2 and weighted.answer == "helium"
    d = trace_data(weighted, "decision")
    assert d["tie_broken_by_score"] is True and d["ranking"] == ["2", "0"]
    assert {c.agent: c.weight for c in weighted.candidates} == {"a/x": 0.1, "a/y": 0.1, "b/z": 1.0, "c": 1.0}


def test_without_a_profile_the_trust_weights_break_a_tie(tmp_path):
    scores = {
        "a/x": [-0.1, -5.0, -6.0],
        "a/y": [-0.1, -5.0, -6.0],
        "b/z": [-5.0, -6.0, -2.0],
        "c": [-5.0, -6.0, -2.0],
    }
    arbiter = make(tmp_path, ChoiceAgents(scores))
    # Earlier tasks: a's members disagreed with the decision, b/z and c agreed.
    for _ in range(3):
        arbiter.trust.update(MEMBERS, {"a/x": 1.0, "a/y": 1.0, "b/z": 0.0, "c": 0.0})
    r = run(arbiter, choose())
    assert r.votes == {"0": 2.0, "2": 2.0} and r.choice.index == 2
    by = {c.agent: c.weight for c in r.candidates}
    assert by["b/z"] == by["c"] > by["a/x"] == by["a/y"]


# ---------------------------------------------------------------- the request's checks


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"choices": ["only"]}, "choices", "choices holds 1; send 2 to 26 choices"),
        ({"choices": [f"c{i}" for i in range(27)]}, "choices", "choices holds 27"),
        ({"choices": ["a", "  "]}, "choices", "choices[1] is empty"),
        ({"choices": ["a", "x" * 1001]}, "choices", "choices[1] is 1001 characters; the limit is 1000"),
        ({"choices": ["New York", " new  york "]}, "choices", "choices[1] ('new  york') repeats choices[0]"),
        ({"choices": ["a", "b"], "min_confidence": 1.5}, "min_confidence", "from 0 to 1, got 1.5"),
        ({"choices": ["a", "b"], "min_confidence": -0.1}, "min_confidence", "from 0 to 1"),
        ({"min_confidence": 0.5}, "min_confidence", "min_confidence applies to a task with choices"),
        (
            {"choices": ["a", "b"], "schema": {"type": "object", "properties": {"x": {"type": "string"}}}},
            "choices",
            "choices and schema cannot both shape the answer",
        ),
    ],
    ids=["one", "too-many", "empty", "too-long", "duplicate", "over-1", "under-0", "no-choices", "schema"],
)
def test_a_bad_choices_request_names_the_field(tmp_path, fields, field, says):
    with pytest.raises(InvalidChoices) as err:
        task_request(TaskBody(task=QUESTION, **fields), config(tmp_path))
    assert says in err.value.message and err.value.details["field"] == field


def test_good_choices_reach_the_task_stripped(tmp_path):
    req = task_request(
        TaskBody(task=QUESTION, choices=[" oxygen", "helium "], min_confidence=0.0, strategy="borda"),
        config(tmp_path),
    )
    assert req.choices == ["oxygen", "helium"] and req.min_confidence == 0.0 and req.strategy == "borda"
    edge = task_request(
        TaskBody(task=QUESTION, choices=[f"c{i}" for i in range(26)], min_confidence=1.0), config(tmp_path)
    )
    assert len(edge.choices) == 26 and edge.min_confidence == 1.0
    assert task_request(TaskBody(task=QUESTION), config(tmp_path)).choices is None


def test_the_http_route_refuses_bad_choices_naming_the_field(tmp_path):
    http = client(tmp_path)
    r = http.post("/v1/tasks", json={"task": QUESTION, "choices": ["yes", "Yes"]})
    assert r.status_code == InvalidChoices("").http_status == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_choices" and err["details"] == {"field": "choices"}
    r = http.post("/v1/tasks", json={"task": QUESTION, "choices": ["yes", "no"], "strategy": "debate"})
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "strategy"
    chat = {"messages": [{"role": "user", "content": QUESTION}], "min_confidence": 0.5}
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and r.json()["error"]["details"] == {"field": "min_confidence"}


ASK = [{"role": "user", "content": QUESTION}]
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


def test_a_chat_with_choices_is_a_task_with_choices_and_refuses_tools_and_formats(tmp_path):
    cfg = config(tmp_path)
    req = chat_request(ChatBody(messages=ASK, choices=["a ", "b"], min_confidence=0.4), cfg)
    assert req.choices == ["a", "b"] and req.min_confidence == 0.4 and req.strategy == "plurality"
    for extra in ({"tools": [TOOL]}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(InvalidChoices, match="choices cannot go with tools or response_format") as err:
            chat_request(ChatBody(messages=ASK, choices=["a", "b"], **extra), cfg)
        assert err.value.details == {"field": "choices"}
    with pytest.raises(InvalidChoices) as err:
        chat_request(ChatBody(model="legion:debate", messages=ASK, choices=["a", "b"]), cfg)
    assert err.value.details["field"] == "strategy"
    with pytest.raises(InvalidChoices, match="choices holds 1"):
        chat_request(ChatBody(messages=ASK, choices=["a"]), cfg)


def test_legion_ask_with_choices_prints_each_ones_probability_and_who_picked_it(
    tmp_path, monkeypatch, capsys
):
    import httpx

    from legion_cli.cli import main

    scores = {"a/x": [1.0, 0.0, 0.0], "a/y": [1.0, 0.0, 0.0], "b/z": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0]}
    http = client(tmp_path, make(tmp_path / "arbiter", ChoiceAgents(scores)))
    sent = []

    def post(url, json, headers, timeout, verify):  # the route app in place of the network
        sent.append(json)
        return http.post(httpx.URL(url).path, json=json, headers=headers)

    monkeypatch.setattr(httpx, "post", post)
    assert main(["ask", QUESTION, "--choices", *CHOICES]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sent[-1]["choices"] == CHOICES
    assert out[0] == "oxygen" and "probabilities from mean" in out[2]
    lines = {line.split()[-1]: line for line in out[3:]}  # each choice's line ends with its pickers
    assert out[3].startswith(" * ") and "picked by a/x, a/y" in out[3]
    assert "picked by b/z" in out[4] and "picked by c" in out[5] and len(lines) == 3
    assert main(["ask", QUESTION, "--choices", *CHOICES, "--min-confidence", "0.99"]) == 0
    assert capsys.readouterr().out.startswith("(no answer: the decided choice 'oxygen' has probability")


def test_the_default_line_up_decides_choices_with_learned_and_free_text_with_plurality():
    from legion.service.api import ChatBody, TaskBody, chat_request, task_request

    cfg = config_from_dict({})  # the default agents and their shipped profile
    assert cfg.arbiter.profile is not None
    assert task_request(TaskBody(task="Capital of France?"), cfg).strategy == "plurality"
    assert task_request(TaskBody(task="Capital?", choices=["Paris", "Rome"]), cfg).strategy == "learned"
    asked = task_request(TaskBody(task="Capital?", choices=["Paris", "Rome"], strategy="borda"), cfg)
    assert asked.strategy == "borda"
    chat = ChatBody(messages=[{"role": "user", "content": "Capital?"}], choices=["Paris", "Rome"])
    assert chat_request(chat, cfg).strategy == "learned"
    plain = ChatBody(messages=[{"role": "user", "content": "Capital?"}])
    assert chat_request(plain, cfg).strategy == "plurality"
    # One's own agents: no profile, and choices follow default_strategy unless choice_strategy says.
    own = config_from_dict({"agents": [{"name": "a"}], "arbiter": {"default_strategy": "borda"}})
    assert own.arbiter.profile is None
    assert task_request(TaskBody(task="Capital?", choices=["Paris", "Rome"]), own).strategy == "borda"
