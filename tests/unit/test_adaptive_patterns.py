"""Adaptive fan-out on free text with the profile's answer patterns: the rule's statistics on
synthetic panels whose answers are known, its plan, the Arbiter asking by it, the profile's
checks and ``legion calibrate --answers``. No Ray, no model: the agents are the scripted
stand-ins of the Arbiter's tests; the rule, the Arbiter and the strategies are the real ones."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from pydantic import ValidationError

from legion.arbitration import adaptive
from legion.arbitration.arbiter import Arbiter
from legion.messages import TaskRequest
from legion.profile import AnswerPatterns, Profile, load_profile
from legion_cli.cli import main
from tests.unit.test_adaptive import ACCURACY, AGENTS, MEMBERS, profiled
from tests.unit.test_arbiter import ScriptedAgents


def test_a_pattern_is_who_agreed_with_whom_whatever_the_answers():
    assert adaptive.pattern_key([5, 5, -1, 2, 5]) == (0, 0, -1, 1, 0)
    assert adaptive.pattern_key([7, 3, 3]) == adaptive.pattern_key([0, 9, 9])


def test_the_plurality_breaks_ties_by_standing_then_order():
    labels = [0, 1, 1, 0, 2]
    one = [1.0] * 5
    assert adaptive.plurality_label(labels, range(5), one, [0.0] * 5) == 0  # 2-2: member 0 first
    assert adaptive.plurality_label(labels, range(5), one, [0.1, 0.5, 0.0, 0.1, 0.0]) == 1
    assert adaptive.plurality_label(labels, [4], one, [0.0] * 5) == 2
    assert adaptive.plurality_label([-1, -1], [0, 1], one[:2], [0.0, 0.0]) == -1


def test_the_risk_is_how_often_the_full_panel_changed_after_the_same_agreement():
    # Members 0 and 1 agree on 30 items; on 3 of them members 2, 3 and 4 outvote them.
    agree = [[0, 0, 1, 2, 3]] * 27 + [[0, 0, 1, 1, 1]] * 3
    split = [[0, 1, 2, 2, 2]] * 10
    table = adaptive.PatternTable(np.array(agree + split), [1.0] * 5, [0.0] * 5)
    risk, n = table.risk([0, 1], [4, 4])
    assert n == 30 and risk == pytest.approx((3 + 0.5) / (30 + 1))
    risk, n = table.risk([0, 1], [4, 7])
    assert n == 10 and risk == pytest.approx((10 + 0.5) / (10 + 1))
    # A pattern never seen settles nothing; every member asked leaves no risk to weigh.
    assert table.risk([2, 3, 4], [5, 6, 5]) == (0.5, 0)
    assert table.risk(range(5), [0, 0, 1, 2, 3]) == (pytest.approx(0.5 / 28), 27)


def test_the_plan_asks_first_the_members_whose_agreement_settles_most_items():
    # Member 3 agrees with the eventual winner on every item, member 1 on none: after member 0,
    # asking member 3 settles the items where it agrees with 0.
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        win = int(rng.integers(0, 3))
        lose = (win + 1) % 3
        rows.append([win if rng.random() < 0.7 else lose, lose + 3, win, win, lose + 6])
    table = adaptive.PatternTable(np.array(rows), [1.0] * 5, [0.0] * 5)
    order = table.order({f"m{i}": [i] for i in range(5)}, {}, 0.05)
    assert order.index("m3") < order.index("m1") and order.index("m2") < order.index("m4")
    assert table.order({f"m{i}": [i] for i in range(5)}, {}, 0.05) == order  # the same plan again


def correlated_panel(n_items: int, seed: int) -> np.ndarray:
    """Free answers of two families (three and four members): each family's members copy their
    family's answer or write their own; the families' answers are the truth or a wrong one, and
    wrong answers of the two families coincide now and then (a shared distractor)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_items):
        fam_a = 0 if rng.random() < 0.5 else 1
        fam_b = 0 if rng.random() < 0.4 else (1 if rng.random() < 0.3 else 2)
        row = []
        for i in range(7):
            family = fam_a if i < 3 else fam_b
            copy = 0.8 if i < 3 else 0.55
            row.append(family if rng.random() < copy else 10 + i)
        rows.append(list(adaptive.pattern_key(row)))
    return np.array(rows)


@pytest.mark.parametrize("limit", [0.03, 0.1])
def test_on_synthetic_panels_the_early_answer_rarely_differs_from_the_full_vote(limit):
    fit, held = correlated_panel(3000, seed=1), correlated_panel(1500, seed=2)
    table = adaptive.PatternTable(fit, [1.0] * 7, [0.0] * 7)
    units = {f"m{i}": [i] for i in range(7)}
    order = [int(u[1:]) for u in table.order(units, {}, limit)]
    differ = asked_total = 0
    for row in held:
        row = [int(v) for v in row]
        full = adaptive.plurality_label(row, range(7), [1.0] * 7, [0.0] * 7)
        for k in range(1, 8):
            asked = order[:k]
            if k == 7 or table.risk(asked, [row[i] for i in asked])[0] <= limit:
                break
        differ += adaptive.plurality_label(row, asked, [1.0] * 7, [0.0] * 7) != full
        asked_total += k
    # Within the limit plus the sampling error of 1500 items; fewer members asked than the panel.
    assert differ / len(held) <= limit + 3 * np.sqrt(limit * (1 - limit) / len(held))
    assert asked_total / len(held) < 7


def with_patterns(tmp_path, rows, **arbiter):
    cfg = profiled(tmp_path, ACCURACY, **arbiter)
    prof = load_profile(cfg.arbiter.profile)
    prof = prof.model_copy(update={"answer_patterns": AnswerPatterns(members=MEMBERS, items=rows)})
    (tmp_path / "profile.json").write_text(prof.model_dump_json(), encoding="utf-8")
    return cfg


def test_the_arbiter_stops_free_text_where_the_patterns_say_it_is_settled(tmp_path):
    # On the fit's items a/x and b/u, when they agree, always carry the full vote; when they do
    # not, the rest decide.
    rows = [[0, 1, 2, 0, 3]] * 40 + [[0, 1, 1, 2, 1]] * 20
    cfg = with_patterns(tmp_path, rows, fanout="adaptive")
    agents = ScriptedAgents(lambda agent, req: "Paris")
    r = asyncio.run(Arbiter(cfg, agents).run(TaskRequest(id="t", task="Capital?", strategy="plurality")))
    assert (
        r.answer == "Paris"
        and r.agents_asked == 2
        and sorted(req.view for _, req in agents.asked) == ["a/x", "b/u"]
    )
    # The same first answers split: the members left are asked.
    answers = {"a/x": "Paris", "b/u": "Lyon", "a/y": "Lyon", "a/z": "Nice", "b/v": "Lyon"}
    agents = ScriptedAgents(lambda agent, req: answers[req.view])
    r = asyncio.run(Arbiter(cfg, agents).run(TaskRequest(id="t", task="Capital?", strategy="plurality")))
    assert r.agents_asked == 5 and r.answer == "Lyon"


def test_patterns_over_other_members_leave_the_vote_rule_in_charge(tmp_path):
    cfg = with_patterns(tmp_path, [[0, 0, 0, 0, 0]] * 5)
    prof = load_profile(cfg.arbiter.profile)
    rule = adaptive.stop_rule("plurality", cfg.panel[:4], prof, None, choices=False)
    assert rule.patterns is not None  # the members asked are among the patterns' members
    others = prof.model_copy(
        update={"answer_patterns": AnswerPatterns(members=MEMBERS[:3], items=[[0, 0, 0]])}
    )
    assert adaptive.stop_rule("plurality", cfg.panel, others, None, choices=False).patterns is None
    # Tasks with choices never read them.
    assert adaptive.stop_rule("plurality", cfg.panel, prof, None, choices=True).patterns is None


def test_the_profile_refuses_patterns_that_do_not_fit(tmp_path):
    with pytest.raises(ValidationError, match="one per member"):
        AnswerPatterns(members=["a", "b"], items=[[0, 0, 1]])
    with pytest.raises(ValidationError, match="-1 for no answer"):
        AnswerPatterns(members=["a", "b"], items=[[0, -2]])
    with pytest.raises(ValidationError, match="unique"):
        AnswerPatterns(members=["a", "a"], items=[[0, 0]])
    prof = load_profile(profiled(tmp_path, ACCURACY).arbiter.profile)
    body = prof.model_dump(mode="json")
    body["answer_patterns"] = {"members": ["a/x", "nobody"], "items": [[0, 1]]}
    with pytest.raises(ValidationError, match="not agents of the profile"):
        Profile.model_validate(body)


def out_file(path, items):
    answers = {
        iid: {"task": "q", "reference": "r", "by": {f"single:{m}": {"answer": a} for m, a in by.items()}}
        for iid, by in items.items()
    }
    path.write_text(json.dumps({"results": {}, "answers": answers}), encoding="utf-8")
    return str(path)


def test_calibrate_answers_adds_the_patterns_to_a_profile(tmp_path, capsys):
    cfg = profiled(tmp_path, ACCURACY)
    config = tmp_path / "legion.yaml"
    config.write_text(json.dumps({"agents": AGENTS, "data_dir": str(tmp_path)}), encoding="utf-8")
    f = out_file(
        tmp_path / "ft.json",
        {
            "i1": {"a/x": "Paris", "a/y": "paris.", "a/z": "Lyon", "b/u": "", "b/v": "Lyon"},
            "i2": {"a/x": "4", "a/y": "5", "a/z": "4", "b/u": "4", "b/v": "6"},
        },
    )
    out = tmp_path / "with.json"
    argv = ["calibrate", "--answers", f, "--profile", cfg.arbiter.profile, "--config", str(config)]
    assert main([*argv, "--out", str(out)]) == 0
    got = load_profile(str(out))
    assert got.answer_patterns is not None and got.answer_patterns.members == MEMBERS
    assert got.answer_patterns.items == [[0, 0, 1, -1, 1], [0, 1, 0, 0, 2]]
    assert got.weights == load_profile(cfg.arbiter.profile).weights  # nothing else moves
    assert "2 items" in capsys.readouterr().out
    # A file without a member's answers, or not an --out file at all: a message, exit 2, no file.
    short = out_file(tmp_path / "short.json", {"i1": {"a/x": "Paris"}})
    assert main([*argv[:2], short, *argv[3:], "--out", str(tmp_path / "no.json")]) == 2
    assert "has no answer of" in capsys.readouterr().err and not (tmp_path / "no.json").exists()
    (tmp_path / "bad.json").write_text("[]", encoding="utf-8")
    assert main([*argv[:2], str(tmp_path / "bad.json"), *argv[3:], "--out", str(tmp_path / "no.json")]) == 2
    assert "not the --out file of legion eval --free-text" in capsys.readouterr().err
    assert main(["calibrate", "--answers", f, "--data", "x.jsonl", "--out", str(out)]) == 2
    assert "one of them" in capsys.readouterr().err


def test_a_profile_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """legion calibrate --answers may write over the profile it read: a failed write leaves the
    old file as it was, and no temporary file behind."""
    from legion import profile as profile_module

    path = profiled(tmp_path, ACCURACY).arbiter.profile
    before = open(path, encoding="utf-8").read()
    prof = load_profile(path)
    patterns = AnswerPatterns(members=MEMBERS, items=[[0, 0, 1, 1, 2]])

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(profile_module.os, "replace", broken)
    with pytest.raises(OSError, match="No space"):
        profile_module.save_profile(prof.model_copy(update={"answer_patterns": patterns}), path)
    assert open(path, encoding="utf-8").read() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    profile_module.save_profile(prof.model_copy(update={"answer_patterns": patterns}), path)
    assert load_profile(path).answer_patterns == patterns
