"""``legion eval``'s data checks and accounting (scores are hand-built here; the real model
scores items in tests/integration/test_strategies.py)."""

from __future__ import annotations

import json

import pytest

from legion.arbitration.strategies import OptionScores
from legion.config import AgentConfig, config_from_dict
from legion.engine.views import exemplars
from legion.errors import InvalidRequest
from legion.evaluation.multiple_choice import (
    Item,
    candidates_from,
    check_strategies,
    evaluate,
    load_items,
)


def write(tmp_path, rows, name="set_dev.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


GOOD = {"id": "q1", "context": "Question: 2+2?\nAnswer:", "choices": ["3", "4"], "answer": 1}


def test_load_items_in_file_order_with_limit(tmp_path):
    rows = [dict(GOOD, id=f"q{i}") for i in range(5)]
    p = write(tmp_path, rows)
    assert [i.id for i in load_items(p)] == ["q0", "q1", "q2", "q3", "q4"]
    assert [i.id for i in load_items(p, limit=2)] == ["q0", "q1"]


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"context": "x", "choices": ["a", "b"]}, "missing field 'answer'"),
        ({"context": "x", "answer": 0}, "missing field 'choices'"),
        ({"context": "x", "choices": ["a", "b"], "answer": 2}, r"index into choices \(0\.\.1\)"),
        ({"context": "x", "choices": ["a", "b"], "answer": -1}, "index into choices"),
        ({"context": "x", "choices": ["a", "b"], "answer": True}, "index into choices"),
        ({"context": "x", "choices": ["a"], "answer": 0}, "at least two strings"),
        ({"context": 3, "choices": ["a", "b"], "answer": 0}, "'context' must be a string"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_line_is_rejected_with_its_number(tmp_path, bad, fragment):
    p = write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(InvalidRequest, match=fragment) as err:
        load_items(p)
    assert f"{p}:3:" in err.value.message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_items(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidRequest, match="no items"):
        load_items(write(tmp_path, ["", "  "]))


def test_exemplars_depend_on_the_agent_and_show_the_right_choice():
    pool = [
        Item(id=str(i), context=f"Question: q{i}?\nAnswer:", choices=["no", f"yes{i}"], answer=1)
        for i in range(20)
    ]
    a = exemplars(AgentConfig(name="a", few_shot=3), pool)
    b = exemplars(AgentConfig(name="b", few_shot=3), pool)
    assert a.count("Question:") == 3 and a != b
    assert a == exemplars(AgentConfig(name="a", few_shot=3), pool)  # the same every run
    assert "Answer: yes" in a and "Answer: no" not in a
    assert exemplars(AgentConfig(name="a"), pool) == ""


def test_generative_strategies_are_refused():
    with pytest.raises(InvalidRequest, match="free text"):
        check_strategies(["plurality", "debate"])
    with pytest.raises(InvalidRequest, match="unknown strategy 'nope'"):
        check_strategies(["nope"])


class TableScorer:
    """Hand-built log-likelihoods per item id (the scorer is not the subject here)."""

    def __init__(self, table):
        self.table = table

    def score_items(self, items, progress=None):
        return [self.score(it) for it in items]

    def score(self, item):
        loglik = self.table[item.id]
        n = len(item.choices)
        s = OptionScores(
            options=[str(i) for i in range(n)],
            texts=item.choices,
            loglik={a: list(v) for a, v in loglik.items()},
            prior={a: [0.0] * n for a in loglik},
            n_tokens={a: [1] * n for a in loglik},
            n_bytes=[1] * n,
        )
        return s, {a: 0.5 for a in loglik}, 0.1

    def close(self):
        pass


def test_evaluate_accounts_every_strategy_and_single_agent():
    cfg = config_from_dict({"agents": [{"name": "x"}, {"name": "y"}, {"name": "z"}]})
    items = [Item(id=f"i{k}", context="c", choices=["a", "b", "c"], answer=k % 3) for k in range(4)]
    # x is always right; y always picks choice 0; z always picks choice 2.
    table = {}
    for it in items:
        right = [-5.0, -5.0, -5.0]
        right[it.answer] = -1.0
        table[it.id] = {"x": right, "y": [-1.0, -4.0, -4.0], "z": [-4.0, -4.0, -1.0]}
    res = evaluate(cfg, items, ["plurality", "trust"], scorer=TableScorer(table))
    truth = [it.answer for it in items]  # 0, 1, 2, 0
    assert res["single:x"] == {"accuracy": 1.0, "n": 4, "seconds": 2.0}
    assert res["single:y"]["accuracy"] == sum(t == 0 for t in truth) / 4
    assert res["single:z"]["accuracy"] == sum(t == 2 for t in truth) / 4
    assert set(res) == {"single:x", "single:y", "single:z", "plurality", "trust"}
    # Every strategy pays for every agent's scoring and the prior: 3 * 0.5 + 0.1 per item.
    assert res["plurality"]["seconds"] >= 4 * 1.6
    assert res["plurality"]["n"] == 4


def test_trust_learns_from_agreement_with_its_decisions_never_from_labels():
    cfg = config_from_dict(
        {"agents": [{"name": "x"}, {"name": "y"}, {"name": "z"}], "arbiter": {"trust_eta": 2.0}}
    )
    # As served, trust weights move towards the members that agreed with the strategy's own
    # decisions: the same scores give the same decisions whatever the labels say.
    right = [Item(id=f"i{k}", context="c", choices=["a", "b"], answer=0) for k in range(10)]
    wrong = [Item(id=it.id, context="c", choices=["a", "b"], answer=1) for it in right]
    table = {
        it.id: {"x": [-1.0, -3.0], "y": [-3.0, -1.0], "z": [-3.0, -1.0] if k % 2 else [-1.0, -3.0]}
        for k, it in enumerate(right)
    }
    seen: list[dict] = [{}, {}]
    a = evaluate(cfg, right, ["plurality", "trust"], scorer=TableScorer(table), report=seen[0])
    b = evaluate(cfg, wrong, ["plurality", "trust"], scorer=TableScorer(table), report=seen[1])
    assert seen[0]["decisions"] == seen[1]["decisions"]
    assert a["trust"]["accuracy"] + b["trust"]["accuracy"] == pytest.approx(1.0)
    # z sides with x on even items and with y on odd ones; x and y each win when z joins them.
    assert seen[0]["decisions"]["plurality"] == [0 if k % 2 == 0 else 1 for k in range(10)]


def test_candidates_are_each_agents_most_likely_choice():
    s = OptionScores(options=["0", "1"], texts=["a", "b"], loglik={"x": [-2.0, -1.0]}, n_tokens={"x": [1, 2]})
    [c] = candidates_from(s, [AgentConfig(name="x")])
    assert (c.normalized, c.text, c.score) == ("1", "b", -0.5)


def test_the_eval_report_names_each_agents_model():
    from legion.evaluation.multiple_choice import _report_lines

    gemma = {"file": "gemma.gguf", "description": "gemma3 270M Q4_K - Medium", "size_bytes": 253 * 2**20}
    lines = _report_lines({"models": {"a": gemma, "b": {"file": "tiny.gguf"}}})
    assert lines[:3] == ["models:", "  a: gemma.gguf (gemma3 270M Q4_K - Medium, 253 MiB)", "  b: tiny.gguf"]


def test_the_report_records_adaptive_decisions_beside_the_full_panels():
    # What scripts/choices_parity.py --fanout adaptive compares a running Legion with.
    cfg = config_from_dict({"agents": [{"name": "x"}, {"name": "y"}, {"name": "z"}]})
    items = [Item(id=f"i{k}", context="c", choices=["a", "b"], answer=0) for k in range(6)]
    table = {it.id: {"x": [-1.0, -3.0], "y": [-1.0, -3.0], "z": [-3.0, -1.0]} for it in items}
    report: dict = {}
    res = evaluate(cfg, items, ["plurality"], scorer=TableScorer(table), report=report, fanout="adaptive")
    assert report["decisions"]["plurality"] == [0] * 6
    assert report["decisions"]["plurality@adaptive"] == [0] * 6
    assert res["plurality@adaptive"]["agents_asked"] <= 3
