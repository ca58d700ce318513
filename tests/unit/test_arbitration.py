"""Answer normalisation and the plurality vote, on hand-built candidates."""

import pytest

from legion.arbitration.strategies import Plurality, get_strategy, normalize_answer
from legion.errors import NoCandidates, UnknownStrategy
from legion.messages import Candidate


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The answer is: Paris.", "paris"),
        ("  paris\nbecause it is the capital", "paris"),
        ("An apple", "apple"),
        ("1,000 meters", "1000 meters"),
        ("-3.5", "-3.5"),
        ("3.5.", "3.5"),
        ("well-known fact!", "well known fact"),
        ("Answer: Eight", "eight"),
        ("", ""),
    ],
)
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def cand(agent, text, score=-1.0, error=None):
    return Candidate(agent=agent, text=text, normalized=normalize_answer(text), score=score, error=error)


def test_plurality_majority_wins():
    d = Plurality().decide([cand("a", "Paris"), cand("b", "paris."), cand("c", "Lyon", score=-0.1)])
    assert d.answer_key == "paris"
    assert d.votes == {"paris": 2.0, "lyon": 1.0}
    assert d.ranking == ["paris", "lyon"]
    assert not d.details["tie_broken_by_score"]


def test_plurality_tie_broken_by_score():
    d = Plurality().decide([cand("a", "Paris", score=-2.0), cand("b", "Lyon", score=-0.5)])
    assert d.answer_key == "lyon"
    assert d.details["tie_broken_by_score"]
    assert sorted(d.details["tied"]) == ["lyon", "paris"]


def test_plurality_single_candidate():
    d = Plurality().decide([cand("a", "42")])
    assert d.answer == "42"


def test_plurality_skips_failed_agents():
    d = Plurality().decide([cand("a", "", error="died"), cand("b", "Rome")])
    assert d.answer_key == "rome"
    assert "" not in d.votes


def test_plurality_weights():
    cs = [cand("a", "x"), cand("b", "x"), cand("c", "y")]
    assert Plurality().decide(cs, {"a": 0.1, "b": 0.1, "c": 1.0}).answer_key == "y"


def test_all_failed_raises_clear_error():
    with pytest.raises(NoCandidates, match="a: boom"):
        Plurality().decide([cand("a", "", error="boom")])


def test_all_empty_answers_abstain():
    d = Plurality().decide([cand("a", ""), cand("b", "  "), cand("c", "", error="boom")])
    assert d.answer == "" and d.votes == {} and d.details["all_abstained"]


def test_unknown_strategy_lists_choices():
    with pytest.raises(UnknownStrategy, match="plurality"):
        get_strategy("nope")
