"""Agents' views of an item: prompt forms, exemplars and scoring rules (no model)."""

from __future__ import annotations

import math

import pytest

from legion.config import AgentConfig
from legion.engine.views import (
    Item,
    apply_rule,
    content_free,
    exemplars,
    premise,
    render,
    solved,
    split_question,
)
from legion.evaluation.multiple_choice import agreement, timing

ITEM = Item(
    id="q",
    context="Question: Which gas do plants take in?\nAnswer:",
    choices=["oxygen", "carbon dioxide", "helium"],
    answer=1,
)
BOOLQ = Item(
    id="b", context="Water is wet.\nQuestion: is water wet?\nAnswer:", choices=["no", "yes"], answer=1
)
CLOZE = Item(id="h", context="A man is sitting on a roof. He", choices=["starts", "flies"], answer=0)


def test_question_is_split_from_its_markers_and_preamble():
    assert split_question(ITEM.context) == ("", "Which gas do plants take in?")
    assert split_question(BOOLQ.context) == ("Water is wet.\n", "is water wet?")
    assert split_question(CLOZE.context) is None


def test_qa_form_is_the_items_own_text():
    r = render(ITEM, "qa")
    assert r.context == ITEM.context
    assert r.continuations == [" oxygen", " carbon dioxide", " helium"]


def test_cloze_form_drops_the_markers_and_keeps_the_preamble():
    assert render(ITEM, "cloze").context == "Which gas do plants take in?"
    assert render(BOOLQ, "cloze").context == "Water is wet.\nis water wet?"
    assert render(CLOZE, "cloze").context == CLOZE.context  # nothing to drop
    assert render(ITEM, "cloze").continuations == render(ITEM, "qa").continuations


def test_letters_form_lists_the_choices_and_scores_letters():
    r = render(ITEM, "letters")
    assert r.context == (
        "Question: Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. helium\nAnswer:"
    )
    assert r.continuations == [" A", " B", " C"]
    assert render(CLOZE, "letters").context.startswith("A man is sitting on a roof. He\nA. starts\n")
    with pytest.raises(ValueError, match="at most 26"):
        render(Item(id="x", context="c", choices=[str(i) for i in range(27)], answer=0), "letters")
    with pytest.raises(ValueError, match="unknown prompt form"):
        render(ITEM, "essay")


def test_exemplars_follow_the_agents_form_seed_and_count():
    pool = [
        Item(id=str(i), context=f"Question: q{i}?\nAnswer:", choices=["no", f"yes{i}"], answer=1)
        for i in range(30)
    ]
    qa = exemplars(AgentConfig(name="a", few_shot=3), pool)
    assert qa.count("Question:") == 3 and "Answer: yes" in qa and "Answer: no" not in qa
    letters = exemplars(AgentConfig(name="a", few_shot=3, prompt_form="letters"), pool)
    assert letters.count("Answer: B\n\n") == 3
    cloze = exemplars(AgentConfig(name="a", few_shot=2, prompt_form="cloze"), pool)
    assert "Question:" not in cloze and cloze.count("\n\n") == 2
    # The seed, not the name, decides the draw when it is given.
    a7 = exemplars(AgentConfig(name="a", few_shot=3, few_shot_seed=7), pool)
    b7 = exemplars(AgentConfig(name="b", few_shot=3, few_shot_seed=7), pool)
    b8 = exemplars(AgentConfig(name="b", few_shot=3, few_shot_seed=8), pool)
    assert a7 == b7 != b8
    assert solved(ITEM, "qa") == ITEM.context + " carbon dioxide\n\n"


def test_content_free_input_replaces_the_question_and_in_letters_the_choices():
    qa = content_free(BOOLQ, "qa")
    assert qa.context == "Question: N/A\nAnswer:" and qa.continuations == [" no", " yes"]
    assert content_free(ITEM, "cloze").context == "N/A"
    lt = content_free(ITEM, "letters")
    assert (
        "oxygen" not in lt.context and lt.context.count("N/A") == 4 and lt.continuations == [" A", " B", " C"]
    )
    assert premise("qa") == "Answer:" and premise("cloze") == ""


def test_scoring_rules():
    ll, nt, nb = [-6.0, -4.0], [3, 1], [12, 4]
    assert apply_rule("sum", ll, nt, nb) == ll
    # Per token: means -2 and -4, times the mean length 2: the longer choice now wins.
    assert apply_rule("per_token", ll, nt, nb) == [-4.0, -8.0]
    assert apply_rule("per_byte", ll, nt, nb) == [-6.0 / 12 * 8, -4.0 / 4 * 8]
    assert apply_rule("pmi", ll, nt, nb, [-1.0, -5.0]) == [-5.0, 1.0]
    assert apply_rule("calibrated", ll, nt, nb, [-6.5, -3.0]) == [0.5, -1.0]
    with pytest.raises(ValueError, match="needs the reference"):
        apply_rule("pmi", ll, nt, nb)
    with pytest.raises(ValueError, match="unknown scoring rule"):
        apply_rule("vibes", ll, nt, nb)
    assert all(math.isfinite(x) for x in apply_rule("per_token", [-1.0], [0], [0]))


def test_agreement_is_the_share_of_items_with_the_same_pick():
    agree = agreement({"x": [0, 1, 2, 0], "y": [0, 1, 0, 1], "z": [0, 1, 2, 0]})
    assert agree["x"]["y"] == 0.5 and agree["x"]["z"] == 1.0 and agree["y"]["y"] == 1.0


def test_timing_compares_few_shot_agents_with_the_zero_shot_one_of_the_same_view():
    from legion.evaluation.multiple_choice import AgentPass

    agents = [
        AgentConfig(name="zero"),
        AgentConfig(name="zl", prompt_form="letters"),
        AgentConfig(name="five", few_shot=5),
        AgentConfig(name="fivel", few_shot=5, prompt_form="letters"),
    ]
    passes = {
        "zero": AgentPass("zero", 10, 10, 2.0),
        "zl": AgentPass("zl", 10, 10, 4.0),
        "five": AgentPass("five", 10, 10, 2.4),
        "fivel": AgentPass("fivel", 10, 10, 5.0),
    }
    t = timing(
        agents, passes, plain={"zero": 0.5, "five": 1.0}, eval_on_plain_items={"zero": 0.25, "five": 0.3}
    )
    rows = t["agents"]
    assert rows["five"]["vs_zero_shot"] == 1.2 and rows["five"]["zero_shot_agent"] == "zero"
    assert rows["fivel"]["vs_zero_shot"] == 1.25 and rows["fivel"]["zero_shot_agent"] == "zl"
    assert "vs_zero_shot" not in rows["zero"]
    assert rows["zero"]["vs_plain"] == 0.5 and rows["five"]["vs_plain"] == 0.3
    assert t["eval_vs_plain_per_agent"] == round(0.55 / 1.5, 3)
    assert t["few_shot_vs_zero_shot_max"] == 1.25
