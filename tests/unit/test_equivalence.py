"""Free-text answer equivalence, its fallbacks, and the stop markers a template implies (no
LLM; one test loads the bundled embedding model)."""

from __future__ import annotations

import asyncio
import math

import pytest

from legion.arbitration.equivalence import (
    AgentJudge,
    EmbeddingSimilarity,
    Equivalence,
    FallbackUnavailable,
    Verdict,
    canonical,
    equivalent,
    final_answer,
    judge_question,
    rule_verdict,
)
from legion.arbitration.strategies import Plurality, normalize_answer
from legion.engine.llama import ScoredContinuation
from legion.engine.prompts import prompt_markers
from legion.messages import Candidate


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("4", "2 + 2 = 4"),
        ("madrid", "The capital of Spain is Madrid."),
        ("dog.", "The lazy dog."),
        ("four", "4"),
        ("3.50", "3.5"),
        ("Paris", "The answer is: Paris"),
        ("yes", "Yes, it is wet."),
        ("carbon dioxide", "Plants take in carbon dioxide."),
    ],
)
def test_equivalent_answers(a, b):
    assert equivalent(a, b) and equivalent(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("red hen.", "dog"),
        ("1", "10"),
        ("4", "2 + 2 = 5"),
        ("paris", "not paris"),
        ("yes", "no"),
        ("is", "it is red"),  # stopwords alone say nothing
        ("", "anything"),
    ],
)
def test_different_answers(a, b):
    assert not equivalent(a, b) and not equivalent(b, a)


def test_final_answer_reads_past_working_and_markers():
    assert final_answer("2 + 2 = 4") == "4"
    assert final_answer("So the final answer is 12.\nMore text") == "12."
    assert final_answer("\n\n  Madrid\nAnswer: Paris") == "Madrid"  # only the first line counts
    assert final_answer("Answer:") == "Answer:"


def cand(agent, text, score=-1.0):
    return Candidate(agent=agent, text=text, normalized=normalize_answer(text), score=score)


def test_canonical_groups_equivalent_answers_so_the_vote_is_not_split():
    cands = [
        cand("a", "dog.", -2.0),
        cand("b", "The lazy dog.", -1.5),
        cand("c", "red hen.", -0.1),
        cand("d", "2 + 2 = 4"),
        Candidate(agent="e", error="timeout"),
    ]
    out, merged = canonical(cands)
    assert [c.normalized for c in out[:4]] == ["dog", "dog", "red hen", "4"]
    assert out[4].error == "timeout" and out[4].normalized == ""
    assert merged == {"dog": ["dog.", "The lazy dog."]}
    # Without grouping the three answers tie and the best log-likelihood (red hen) wins.
    assert Plurality().decide(cands).answer_key == "red hen"
    assert Plurality().decide(out).answer_key == "dog"


def test_a_chain_of_partial_overlaps_does_not_merge_everything():
    out, _ = canonical([cand("a", "red"), cand("b", "red hen"), cand("c", "hen")])
    assert [c.normalized for c in out] == ["red", "red", "hen"]


def test_prompt_markers_come_from_the_template():
    assert prompt_markers("{role_prompt}Question: {task}\nAnswer:") == ["\nQuestion:", "\nAnswer:"]
    assert prompt_markers("Q: {task}\nA:") == ["\nQ:", "\nA:"]
    assert prompt_markers("{task}") == []
    assert prompt_markers("Context: x\nFinal Answer: {task}") == ["\nContext:", "\nFinal Answer:"]


@pytest.mark.parametrize(
    ("a", "b", "same", "via"),
    [
        ("Paris", "paris", True, "equal"),
        ("four", "4", True, "number"),
        ("4", "5", False, "number"),
        ("4", "four apples", False, "number"),  # a number on its own never falls back
        ("1 mile", "2 miles", False, "number"),  # nor do different numbers
        ("paris", "not paris", False, "negation"),
        ("it is wet", "it is not wet", False, "negation"),
        ("dog.", "The lazy dog.", True, "containment"),
        ("Paris", "London", None, "no rule"),
        ("NYC", "New York City", None, "no rule"),
    ],
)
def test_rule_verdicts_say_which_rule_decided_or_that_none_did(a, b, same, via):
    assert rule_verdict(a, b) == rule_verdict(b, a)
    v = rule_verdict(a, b)
    assert (v.same, v.via) == (same, via)


class TableFallback:
    """A fallback whose verdicts come from a table: it stands in for the embedding model or the
    judges, which are not the subject here (which pairs reach a fallback, and how its verdicts
    group the answers, are)."""

    def __init__(self, table, name="embedding", error=None):
        self.name = name
        self.table = {frozenset(pair): v for pair, v in table.items()}
        self.error = error
        self.asked: list[tuple[str, str, str]] = []

    async def same(self, a, b, question=""):
        self.asked.append((a, b, question))
        if self.error is not None:
            raise self.error
        return self.table.get(frozenset((a, b)), (False, 0.1))


def group(texts, fallback, question="Q?"):
    cands = [cand(f"agent{i}", t) for i, t in enumerate(texts)]
    return asyncio.run(Equivalence(fallback).group(cands, question))


def test_the_fallback_is_asked_only_about_pairs_no_rule_decided_and_once_per_pair():
    fb = TableFallback({("Paris", "City of Light"): (True, 0.86), ("Paris", "London"): (False, 0.31)})
    texts = ["Paris", "The capital is Paris", "4", "5", "not Paris", "City of Light", "London", "London"]
    out = group(texts, fb)
    # Never "4" vs "5" (numbers), "Paris" vs "not Paris" (negation), or the rules' own joins.
    assert fb.asked == [("Paris", "City of Light", "Q?"), ("Paris", "London", "Q?")]
    assert [c.normalized for c in out.candidates] == [
        "paris", "paris", "4", "5", "not paris", "paris", "london", "london"
    ]  # fmt: skip
    assert out.trace() == {
        "groups": [
            {
                "key": "paris",
                "members": [
                    {"agent": "agent0", "text": "Paris", "via": None, "score": None},
                    {"agent": "agent1", "text": "The capital is Paris", "via": "containment", "score": None},
                    {"agent": "agent5", "text": "City of Light", "via": "embedding", "score": 0.86},
                ],
            }
        ],
        "checked": [
            {"a": "Paris", "b": "City of Light", "via": "embedding", "score": 0.86, "same": True},
            {"a": "Paris", "b": "London", "via": "embedding", "score": 0.31, "same": False},
        ],
    }
    assert out.fallback_error is None


def test_without_a_fallback_grouping_is_the_rules_alone():
    texts = ["dog.", "The lazy dog.", "red hen.", "hound"]
    out = group(texts, None)
    rules, merged = canonical([cand(f"agent{i}", t) for i, t in enumerate(texts)])
    assert (
        [c.normalized for c in out.candidates]
        == [c.normalized for c in rules]
        == ["dog", "dog", "red hen", "hound"]
    )
    assert {g.key: [m["text"] for m in g.trace()["members"]] for g in out.groups} == merged
    assert out.checked == [] and Equivalence().mode == "rules"


def test_a_failing_fallback_is_given_up_and_the_rules_stand():
    fb = TableFallback({}, error=FallbackUnavailable("the embedding model could not load (OSError: gone)"))
    out = group(["Paris", "City of Light", "London", "The city is Paris"], fb)
    assert len(fb.asked) == 1  # not asked again once it failed
    assert out.fallback_error == "the embedding model could not load (OSError: gone)"
    assert [c.normalized for c in out.candidates] == ["paris", "city of light", "london", "paris"]


def test_judge_is_what_an_eval_calls_for_each_mode():
    assert asyncio.run(Equivalence().judge("2 + 2 = 4", "4"))
    assert not asyncio.run(Equivalence().judge("NYC", "New York City"))
    fb = TableFallback({("NYC", "New York City"): (True, 0.9)})
    assert asyncio.run(Equivalence(fb).judge("The answer is NYC", "New York City", question="Which city?"))
    assert fb.asked == [("NYC", "New York City", "Which city?")]  # final answers reach the fallback
    assert not asyncio.run(Equivalence(fb).judge("4", "5")) and len(fb.asked) == 1


class JudgingAgents:
    """Agents behind ``Agents.score`` whose log-probabilities of the judge's continuations are
    scripted per agent (an exception: the agent fails)."""

    def __init__(self, logprobs):
        self.logprobs = logprobs
        self.prompts: list[tuple[str, str, list[str]]] = []

    async def score(self, agent, task, context, continuations, view=None):
        self.prompts.append((agent, task, continuations))
        table = self.logprobs[agent]
        if isinstance(table, BaseException):
            raise table
        return [
            ScoredContinuation(logprob=table[c], n_tokens=1, n_bytes=len(c), is_greedy=False)
            for c in continuations
        ]


YES = {" yes": -0.5, " Yes": -1.5, " no": -2.0, " No": -3.0}
NO = {" yes": -3.0, " Yes": -4.0, " no": -0.3, " No": -1.0}


def _p_yes(table):
    yes = math.exp(table[" yes"]) + math.exp(table[" Yes"])
    return yes / (yes + math.exp(table[" no"]) + math.exp(table[" No"]))


def test_the_agents_judge_by_majority_of_their_yes_mass():
    agents = JudgingAgents({"a": YES, "b": YES, "c": NO, "d": RuntimeError("agent gone")})
    judge = AgentJudge(agents, ["a", "b", "c", "d"], timeout_s=5)
    same, score = asyncio.run(judge.same("NYC", "New York City", "Which city?"))
    assert same and score == round((2 * _p_yes(YES) + _p_yes(NO)) / 3, 4)  # d does not count
    assert {p[1] for p in agents.prompts} == {judge_question("NYC", "New York City", "Which city?")}
    assert "NYC" in agents.prompts[0][1] and "Which city?" in agents.prompts[0][1]
    split = AgentJudge(agents, ["a", "c"])
    assert asyncio.run(split.same("NYC", "Boston"))[0] is False  # a tie is not a majority
    nobody = AgentJudge(agents, ["d"])
    with pytest.raises(FallbackUnavailable, match="agent gone"):
        asyncio.run(nobody.same("NYC", "Boston"))


def test_an_embedder_that_cannot_load_is_tried_once_and_says_why():
    calls = []

    def load():
        calls.append(1)
        raise OSError("no model files")

    sim = EmbeddingSimilarity(load, min_similarity=0.8)
    assert "no model files" in sim.load()
    for _ in range(2):
        with pytest.raises(FallbackUnavailable, match="no model files"):
            asyncio.run(sim.same("Paris", "London"))
    assert calls == [1]


@pytest.fixture(scope="module")
def minilm():
    return EmbeddingSimilarity(min_similarity=0.8)  # the bundled all-MiniLM-L6-v2


def test_the_real_embedding_model_joins_paraphrases_not_other_answers(minilm):
    async def sims():
        pairs = [("Paris", "paris, france"), ("Paris", "the city of Paris"), ("Paris", "London")]
        return [await minilm.similarity(a, b) for a, b in pairs]

    france, city, london = asyncio.run(sims())
    assert min(france, city) >= minilm.min_similarity > london
    out = group(["Paris", "London", "NYC", "New York City"], minilm)
    assert [c.normalized for c in out.candidates] == ["paris", "london", "nyc", "nyc"]
    (g,) = out.groups
    assert g.trace()["members"][1]["via"] == "embedding" and g.trace()["members"][1]["score"] >= 0.8


@pytest.mark.parametrize(
    ("one", "listing"),
    [
        ("cellular telephone", "cellular telephone; television; refrigerator; airplane"),
        ("wind", "coal or wind"),
        ("oil", "coal, wind, oil"),
    ],
)
def test_an_answer_listing_alternatives_is_not_one_of_them(one, listing):
    # Seen in the free-text eval: a base model that repeats the choices must not join (and so
    # outvote) the agents that picked one; the group's text was the whole list.
    assert not equivalent(one, listing)
    assert not equivalent(listing, one)
    assert equivalent(listing, listing)
    assert rule_verdict(one, listing) == rule_verdict(listing, one) == Verdict(False, "alternatives")


def test_two_parts_joined_by_a_comma_are_not_a_list():
    assert equivalent("Paris", "Paris, France")
