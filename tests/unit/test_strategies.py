"""Voting strategies (Borda, approval, trust-weighted) and the multi-round strategies, on
hand-built candidates and option scores whose right answer is known."""

from __future__ import annotations

import asyncio

import pytest

from legion.arbitration.strategies import (
    Approval,
    Borda,
    OptionScores,
    Plurality,
    TrustWeighted,
    build_strategy,
    get_strategy,
    normalize_answer,
    strategy_names,
)
from legion.arbitration.strategies.deliberation import (
    ConflictResolution,
    Debate,
    Decomposition,
    assign_roles,
    parse_subtasks,
)
from legion.config import ArbiterConfig
from legion.errors import NoCandidates
from legion.messages import Candidate, GenerateRequest


def cand(agent, text, score=-1.0, error=None, role=""):
    return Candidate(
        agent=agent,
        role=role or agent,
        text=text,
        normalized=normalize_answer(text),
        score=score,
        error=error,
    )


def test_every_strategy_is_registered():
    assert set(strategy_names()) >= {
        "plurality",
        "borda",
        "approval",
        "trust",
        "equilibrium",
        "debate",
        "decompose",
        "conflict",
    }


# A Condorcet-style profile: "b" is nobody's first choice but everyone's near-first, so
# plurality picks "a" (2 first places) while Borda and approval pick the consensus "b".
PROFILE = OptionScores(
    options=["a", "b", "c"],
    texts=["A", "B", "C"],
    loglik={
        "x": [-1.0, -1.1, -9.0],
        "y": [-1.0, -1.1, -9.0],
        "z": [-9.0, -1.1, -1.0],
        "w": [-9.0, -1.1, -1.0],
        "v": [-9.0, -1.0, -8.0],
    },
)
PROFILE_CANDS = [cand("x", "a"), cand("y", "a"), cand("z", "c"), cand("w", "c"), cand("v", "b")]


def test_borda_prefers_the_consensus_answer():
    d = Borda().decide(PROFILE_CANDS, None, PROFILE)
    assert d.answer_key == "b"
    # a: 2+2+0+0+0, b: 1+1+1+1+2, c: 0+0+2+2+1
    assert d.votes == {"a": 4.0, "b": 6.0, "c": 5.0}
    assert d.details["rankings_from"] == "scores"


def test_borda_ties_share_points():
    scores = OptionScores(options=["a", "b"], texts=["a", "b"], loglik={"x": [-1.0, -1.0]})
    d = Borda().decide([cand("x", "a")], None, scores)
    assert d.votes == {"a": 0.5, "b": 0.5}
    assert d.details["tie_broken_by_score"]


def test_borda_without_scores_is_plurality():
    cs = [cand("a", "x"), cand("b", "x"), cand("c", "y")]
    assert Borda().decide(cs).answer_key == Plurality().decide(cs).answer_key == "x"


def test_approval_counts_near_favourites():
    d = Approval(ratio=0.5).decide(PROFILE_CANDS, None, PROFILE)
    assert d.answer_key == "b"
    assert d.votes["b"] == 5.0
    assert d.details["approvals"]["x"] == ["a", "b"]


def test_approval_ratio_one_approves_only_the_favourite():
    d = Approval(ratio=1.0).decide(PROFILE_CANDS, None, PROFILE)
    assert d.votes == {"a": 2.0, "b": 1.0, "c": 2.0}


def test_approval_ratio_is_checked():
    with pytest.raises(ValueError, match="ratio"):
        Approval(ratio=0.0)


def test_trust_weights_swing_the_vote():
    cs = [cand("a", "x"), cand("b", "x"), cand("c", "y")]
    assert TrustWeighted().decide(cs, {"a": 0.2, "b": 0.2, "c": 1.0}).answer_key == "y"
    assert TrustWeighted().decide(cs, {"a": 1.0, "b": 1.0, "c": 1.0}).answer_key == "x"


@pytest.mark.parametrize("name", ["plurality", "borda", "approval", "trust", "equilibrium", "conflict"])
def test_single_candidate_wins(name):
    d = build_strategy(name, ArbiterConfig()).decide([cand("a", "42"), cand("b", "", error="died")])
    assert d.answer == "42"


@pytest.mark.parametrize("name", ["plurality", "borda", "approval", "trust", "equilibrium", "conflict"])
def test_all_agents_failing_is_a_clear_error(name):
    with pytest.raises(NoCandidates, match="a: boom"):
        get_strategy(name).decide([cand("a", "", error="boom"), cand("b", "", error="gone")])


@pytest.mark.parametrize("name", ["borda", "approval", "trust"])
def test_ties_go_to_the_higher_score(name):
    d = get_strategy(name).decide([cand("a", "Paris", score=-2.0), cand("b", "Lyon", score=-0.5)])
    assert d.answer_key == "lyon"


# ---------------------------------------------------------------- multi-round strategies


class FakeSession:
    """Scripted agents (the strategies are the subject here, not the agents): each agent
    answers from a function of its request."""

    def __init__(self, first, reply, roles=None, scores=None, settings=None):
        self.task = "the task"
        self.settings = settings or ArbiterConfig()
        self.roles = roles or {c.agent: c.role for c in first}
        self.weights = None
        self._first = first
        self._reply = reply
        self._scores = scores
        self.events = []
        self.asked = []

    async def fanout(self):
        return self._first

    async def ask(self, requests, step):
        self.asked.append((step, dict(requests)))
        return [self._reply(a, r) for a, r in requests.items()]

    async def option_scores(self, candidates):
        return self._scores

    def request(self, task, context=""):
        return GenerateRequest(task=task, context=context)

    def trace(self, step, **data):
        self.events.append((step, data))


def test_debate_converges_when_agents_adopt_the_majority():
    first = [cand("a", "Paris"), cand("b", "Paris"), cand("c", "Lyon")]

    def reply(agent, req):
        assert "Other agents answered" in req.context
        return cand(agent, "Paris")

    s = FakeSession(first, reply)
    d = asyncio.run(Debate(rounds=3).deliberate(s))
    assert d.answer_key == "paris"
    assert d.details["rounds"] == 1 and d.details["agreed"]
    rounds = [e for e in s.events if e[0] == "debate_round"]
    assert len(rounds) == 1 and rounds[0][1]["answers"] == {"a": "paris", "b": "paris", "c": "paris"}
    # The dissenter saw the others' answers.
    ctx = s.asked[0][1]["c"].context
    assert "Paris" in ctx and "Your previous answer: Lyon" in ctx


def test_debate_stops_after_n_rounds_and_votes():
    first = [cand("a", "x"), cand("b", "y"), cand("c", "y")]
    s = FakeSession(first, lambda a, r: cand(a, {"a": "x", "b": "y", "c": "y"}[a]))
    d = asyncio.run(Debate(rounds=2).deliberate(s))
    assert d.answer_key == "y"
    assert d.details["rounds"] == 2 and not d.details["agreed"]
    assert [e[1]["round"] for e in s.events if e[0] == "debate_round"] == [1, 2]


def test_debate_skips_rounds_when_agents_already_agree():
    s = FakeSession([cand("a", "x"), cand("b", "x")], lambda a, r: pytest.fail("no round needed"))
    d = asyncio.run(Debate(rounds=2).deliberate(s))
    assert d.answer_key == "x" and d.details["rounds"] == 0


def test_debate_keeps_the_previous_answer_of_an_agent_that_fails():
    first = [cand("a", "x"), cand("b", "y"), cand("c", "y")]

    def reply(agent, req):
        return cand(agent, "", error="died") if agent == "b" else cand(agent, "x")

    d = asyncio.run(Debate(rounds=1).deliberate(FakeSession(first, reply)))
    assert d.votes == {"x": 2.0, "y": 1.0}


def test_parse_subtasks_strips_marks_and_duplicates():
    text = "1. What is 2+2?\n2) What is 3+3?\n- what is 2+2?\n\n* Add the results\nok"
    assert parse_subtasks(text, 5) == ["What is 2+2?", "What is 3+3?", "Add the results"]
    assert parse_subtasks(text, 2) == ["What is 2+2?", "What is 3+3?"]


def test_assign_roles_prefers_the_named_role_then_rotates():
    roles = {"p": "planner", "s": "solver", "c": "critic"}
    assert assign_roles(["check it as a critic", "compute x", "compute y"], roles, "p") == ["c", "s", "c"]


def test_decomposition_splits_runs_in_parallel_and_integrates():
    roles = {"p": "planner", "s": "solver", "c": "critic"}

    def reply(agent, req):
        if req.task.startswith("Split this task"):
            return cand(agent, "1. What is 2+3?\n2. What is 4+5?", role=roles[agent])
        if "Answers to the parts" in req.context:
            assert "What is 2+3? -> 5" in req.context and "What is 4+5? -> 9" in req.context
            return cand(agent, "5 and 9", role=roles[agent])
        return cand(agent, {"What is 2+3?": "5", "What is 4+5?": "9"}[req.task], role=roles[agent])

    s = FakeSession([], reply, roles=roles)
    d = asyncio.run(Decomposition().deliberate(s))
    assert d.answer == "5 and 9"
    assert d.details["decomposed"] and d.details["subtasks"] == 2
    steps = [step for step, _ in s.asked]
    assert steps == ["plan", "subtasks_1", "integrate"]
    # Both subtasks went out together, to two different agents.
    assert set(s.asked[1][1]) == {"s", "c"}
    assert s.asked[2][1].keys() == {"c"}  # the critic integrates


def test_decomposition_of_a_simple_task_falls_back_to_a_vote():
    first = [cand("a", "x"), cand("b", "x")]
    s = FakeSession(first, lambda a, r: cand(a, "just one thing"))
    d = asyncio.run(Decomposition().deliberate(s))
    assert d.answer_key == "x" and not d.details["decomposed"]
    assert any(step == "not_compound" for step, _ in s.events)


def test_conflict_accepts_a_clear_majority():
    first = [cand("a", "x"), cand("b", "x"), cand("c", "x"), cand("d", "y")]
    s = FakeSession(first, lambda a, r: pytest.fail("no further round"))
    d = asyncio.run(ConflictResolution(margin=0.25).deliberate(s))
    assert d.answer_key == "x" and d.details["resolved_by"] is None
    assert [step for step, _ in s.events] == ["conflict_check"]


def test_conflict_split_vote_runs_equilibrium_ranking():
    first = [cand("a", "x"), cand("b", "y")]
    scores = OptionScores(options=["x", "y"], texts=["x", "y"], loglik={"a": [-1.0, -1.2], "b": [-3.0, -0.5]})
    s = FakeSession(first, lambda a, r: pytest.fail("equilibrium asks no one"), scores=scores)
    d = asyncio.run(ConflictResolution(margin=0.25, resolver="equilibrium").deliberate(s))
    assert d.details["split"] and d.details["resolved_by"] == "equilibrium"
    assert d.answer_key == "y"  # pooled likelihoods favour y
    assert [step for step, _ in s.events] == ["conflict_check", "conflict_resolution"]


def test_conflict_split_vote_can_run_a_debate():
    first = [cand("a", "x"), cand("b", "y")]
    s = FakeSession(first, lambda a, r: cand(a, "y"))
    d = asyncio.run(build_strategy("conflict", ArbiterConfig(conflict_resolver="debate")).deliberate(s))
    assert d.answer_key == "y" and d.details["resolved_by"] == "debate"
    assert any(step == "debate_round" for step, _ in s.events)
