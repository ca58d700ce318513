"""A free-text profile: ``legion eval --free-text --dump-candidates`` (what ``learned`` decided
each item over, judged) and ``legion calibrate --candidates`` (the conditional logit fitted on
it). The real eval, Arbiter, strategy, judge and fit run over scripted agents, which stand in
for the models only; no model, no Ray."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest

from legion.arbitration.scoring import combine
from legion.config import config_from_dict
from legion.engine.views import Item
from legion.errors import ConfigError, InvalidRequest
from legion.evaluation.calibrate import (
    accuracy,
    candidates_dataset,
    check_candidate_members,
    load_candidates,
    run_calibrate_cli,
)
from legion.evaluation.freetext import FreeTextEval, short_item
from legion.profile import check_agents, load_profile, view_of
from legion_cli.cli import main
from tests.unit.test_arbiter import NAMES, ScriptedAgents
from tests.unit.test_calibrate import a_profile

ITEM = Item(
    id="q1",
    context="Question: Which of these is a renewable resource?\nAnswer:",
    choices=["coal", "wind", "natural gas", "oil"],
    answer=1,
)


def _cfg(tmp_path, weights=(0.0, 0.0, 2.0)):
    # critic scores by contextual calibration: its features are its log-likelihoods less its prior.
    path = tmp_path / "p.json"
    prof = a_profile(NAMES, list(weights))
    prof.agents[2].view["scoring"] = "calibrated"
    path.write_text(json.dumps(prof.model_dump(mode="json")))
    agents = [{"name": n, "role": n} for n in NAMES[:2]] + [{"name": NAMES[2], "scoring": "calibrated"}]
    return config_from_dict(
        {
            "agents": agents,
            "arbiter": {"agent_timeout_s": 30.0, "profile": str(path)},
            "data_dir": str(tmp_path),
        }
    )


ANSWERS = {"solver": "coal", "reasoner": "wind", "critic": "coal; wind; natural gas; oil"}
# Each member's log-likelihood of each distinct answer after its prompt (its prior is -1.0).
LOGLIK = {
    "solver": {"coal": -1.0, "wind": -2.0, "coal; wind; natural gas; oil": -6.0},
    "reasoner": {"coal": -3.0, "wind": -0.5, "coal; wind; natural gas; oil": -7.0},
    "critic": {"coal": -4.0, "wind": -3.0, "coal; wind; natural gas; oil": -0.2},
}


def _dumped(tmp_path, weights=(0.0, 0.0, 2.0)):
    cfg = _cfg(tmp_path, weights)
    agents = ScriptedAgents(lambda agent, req: ANSWERS[agent], LOGLIK)
    ev = FreeTextEval(
        cfg, agents, ["learned", "plurality"], samples=0, trust_dir=tmp_path, dump_candidates=True
    )
    res = asyncio.run(ev.run([short_item(ITEM)], concurrency=1))
    return cfg, ev, res


def test_the_dump_holds_what_learned_decided_over_and_the_judges_verdicts(tmp_path):
    cfg, ev, res = _dumped(tmp_path)
    dump = ev.candidates_file("train.jsonl", "listed")
    assert [m["name"] for m in dump["members"]] == list(NAMES)
    (rec,) = dump["items"]
    assert rec["answers"] == ["coal", "wind", "coal; wind; natural gas; oil"]
    assert rec["right"] == [False, True, False]  # listing every choice states none of them
    # The raw scores are the members' own, in the options' order; the prior is the N/A prompt's.
    assert rec["loglik"] == {m: [LOGLIK[m][a] for a in rec["answers"]] for m in NAMES}
    assert rec["prior"]["critic"] == [-1.0, -1.0, -1.0]
    # Features: each member's scores under its view's rule (critic's less its prior).
    assert rec["features"]["solver"] == rec["loglik"]["solver"]
    assert rec["features"]["critic"] == pytest.approx([x + 1.0 for x in rec["loglik"]["critic"]])
    # The profile's combination of the dumped features decides as learned did (the critic's list).
    p, _ = combine(load_profile(cfg.arbiter.profile), rec["features"])
    assert rec["options"][int(np.argmax(p))] == rec["decided"] == rec["options"][2]
    assert res["learned"]["accuracy"] == 0.0 and res["single:reasoner"]["accuracy"] == 1.0


def test_the_dump_needs_learned_and_a_profile(tmp_path):
    cfg = _cfg(tmp_path)
    agents = ScriptedAgents(lambda agent, req: ANSWERS[agent], LOGLIK)
    with pytest.raises(InvalidRequest, match="add learned to --strategies"):
        FreeTextEval(cfg, agents, ["plurality"], samples=0, dump_candidates=True)
    bare = config_from_dict({"agents": [{"name": n} for n in NAMES], "data_dir": str(tmp_path)})
    with pytest.raises(InvalidRequest, match="with a profile"):
        FreeTextEval(bare, agents, ["learned"], samples=0, dump_candidates=True)


def _record(i, right, feats):
    return {"id": f"i{i}", "options": [str(k) for k in range(len(right))], "right": right, "features": feats}


def test_the_dataset_spreads_the_target_over_right_candidates_and_counts_what_it_leaves_out():
    recs = [
        _record(0, [True, False, True], {"x": [0.0, 1.0, 2.0], "y": [1.0, 0.0, 0.0]}),
        _record(1, [False, False], {"x": [0.0, 1.0], "y": [1.0, 0.0]}),  # none right
        _record(2, [True, True], {"x": [0.0, 1.0], "y": [1.0, 0.0]}),  # all right
        _record(3, [True], {}),  # one answer: never scored
        _record(4, [True, False], {"x": [0.0, 1.0]}),  # y did not score
        _record(5, [False, True], {"x": [0.0, 1.0], "y": [1.0, 0.0]}),
        _record(6, [False, True], {"x": [0.0, 1.0], "y": [1.0, 0.0]}),
    ]
    data, left = candidates_dataset(["x", "y"], recs, exclude={"i6"})
    assert left == {"exemplar": 1, "unscored": 1, "member_missing": 1, "none_right": 1, "all_right": 1}
    assert data.n == 2
    assert np.allclose(data.q[0], [0.5, 0.0, 0.5]) and np.allclose(data.q[1], [0.0, 1.0, 0.0])
    # A pick counts when it is any right candidate: x picks the third of item 0 and is right.
    assert accuracy(np.array([1.0, 0.0]), data) == 1.0
    assert accuracy(np.array([0.0, 1.0]), data) == 0.5
    with pytest.raises(ConfigError, match="no dumped item"):
        candidates_dataset(["x", "y"], recs[1:5])


def _dump_file(tmp_path, cfg, records, name="dump.json"):
    path = tmp_path / name
    members = [{"name": m.name, "view": view_of(m)} for m in cfg.panel]
    doc = {"format": "legion-free-text-candidates", "version": 1, "members": members, "items": records}
    path.write_text(json.dumps(doc))
    return path


def test_calibrate_fits_a_free_text_profile_that_weighs_the_member_who_finds_the_right_answer(tmp_path):
    # x scores the right candidate highest on most items, y the longest wrong one.
    rng = np.random.default_rng(0)
    cfg_path = tmp_path / "legion.yaml"
    cfg_path.write_text("agents:\n  - name: x\n  - name: y\n    scoring: pmi\n")
    cfg = config_from_dict({"agents": [{"name": "x"}, {"name": "y", "scoring": "pmi"}]})
    records = []
    for i in range(80):
        m = int(rng.integers(2, 5))
        right = int(rng.integers(m))
        x = rng.normal(0, 1, m)
        x[right] += 2.0 if i % 4 else -2.0
        y = rng.normal(0, 1, m)
        y[(right + 1) % m] += 3.0
        records.append(_record(i, [k == right for k in range(m)], {"x": list(x), "y": list(y)}))
    dump = _dump_file(tmp_path, cfg, records)
    out = tmp_path / "ft.json"
    args = argparse.Namespace(candidates=str(dump), config=str(cfg_path), out=str(out), folds=4)
    assert run_calibrate_cli(args) == 0
    prof = load_profile(out)
    check_agents(prof, cfg.panel)  # fitted for exactly the config's members, in their views
    assert prof.weights["x"] > 0.3 > prof.weights["y"]
    assert prof.fit.items == 80 and prof.fit.data == [str(dump)]
    assert prof.fit.cv_accuracy > prof.agents[1].train_accuracy


def test_a_dump_that_is_not_one_or_of_other_members_is_refused(tmp_path):
    cfg = config_from_dict({"agents": [{"name": "x"}, {"name": "y"}]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not a free-text candidates file"):
        load_candidates(bad)
    dump = load_candidates(_dump_file(tmp_path, cfg, []))
    check_candidate_members(dump, cfg.panel, "d")
    other = config_from_dict({"agents": [{"name": "x"}, {"name": "y", "few_shot": 2}]})
    with pytest.raises(ConfigError, match=r"member 'y' differs from its view in d \(few_shot\)"):
        check_candidate_members(dump, other.panel, "d")
    more = config_from_dict({"agents": [{"name": "x"}, {"name": "y"}, {"name": "z"}]})
    with pytest.raises(ConfigError, match="member 'z' is only in the config"):
        check_candidate_members(dump, more.panel, "d")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["calibrate", "--out", "p.json"], "give --data (items to score), --candidates"),
        (["calibrate", "--candidates", "d.json", "--answers", "a.json", "--out", "p.json"], "one of them"),
        (
            ["calibrate", "--data", "a.jsonl", "--profile", "p.json", "--out", "q.json"],
            "--profile goes with --answers",
        ),
        (
            ["calibrate", "--answers", "a.json", "--scores", "s.jsonl", "--out", "p.json"],
            "--scores go with --data",
        ),
        (["calibrate", "--data", "a.jsonl", "--candidates", "d.json", "--out", "p.json"], "one of them"),
        (
            ["calibrate", "--candidates", "d.json", "--limit", "5", "--out", "p.json"],
            "--limit go with --data",
        ),
        (
            ["eval", "--data", "a.jsonl", "--dump-candidates", "d.json"],
            "--dump-candidates goes with --free-text",
        ),
    ],
)
def test_bad_flag_combinations_say_what_to_change(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
