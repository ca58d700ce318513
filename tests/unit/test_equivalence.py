"""Free-text answer equivalence and the stop markers a template implies (no model)."""

from __future__ import annotations

import pytest

from legion.equivalence import canonical, equivalent, final_answer, prompt_markers
from legion.messages import Candidate
from legion.strategies import Plurality, normalize_answer


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


def test_two_parts_joined_by_a_comma_are_not_a_list():
    assert equivalent("Paris", "Paris, France")
