"""``legion eval`` on the real model: agents as views, the timing report, the plain baseline."""

from __future__ import annotations

import pytest

from legion.config import config_from_dict
from legion.engine.llama import LlamaEngine, bundled_model_path
from legion.engine.views import Item
from legion.evaluation.multiple_choice import PlainScorer, Scorer, evaluate

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a dog have?", ["three", "four", "six"], 1),
    ("Which animal says moo?", ["a cat", "a cow", "a duck"], 1),
    ("What do bees make?", ["honey", "bread", "glass"], 0),
    ("Which is the coldest?", ["fire", "the sun", "ice"], 2),
]
ITEMS = [
    Item(id=f"q{i}", context=f"Question: {q}\nAnswer:", choices=c, answer=a)
    for i, (q, c, a) in enumerate(QUESTIONS)
]
SHOTS = [
    Item(id=f"s{i}", context=f"Question: What is {i} plus {i}?\nAnswer:", choices=[str(2 * i), "7"], answer=0)
    for i in range(1, 9)
]
VIEWS = [
    {"name": "qa"},
    {"name": "qa-pmi", "scoring": "pmi"},
    {"name": "qa3", "few_shot": 3, "few_shot_seed": 1},
    {"name": "letters3-cal", "prompt_form": "letters", "scoring": "calibrated", "few_shot": 3},
    {"name": "cloze-byte", "prompt_form": "cloze", "scoring": "per_byte"},
]


def test_views_are_scored_and_timed_against_the_plain_scorer():
    cfg = config_from_dict({"agents": VIEWS})
    report: dict = {}
    res = evaluate(
        cfg, ITEMS, ["plurality", "borda"], shots=SHOTS, n_threads=1, report=report, baseline_items=2
    )
    for v in VIEWS:
        row = res[f"single:{v['name']}"]
        assert row["n"] == len(ITEMS) and 0.0 <= row["accuracy"] <= 1.0
    t = report["timing"]["agents"]
    assert t["qa3"]["zero_shot_agent"] == "qa" and t["qa3"]["vs_zero_shot"] > 0
    assert t["letters3-cal"]["calls"] == len(ITEMS) + 1  # one content-free prompt serves every item
    assert all(r["vs_plain"] > 0 and r["plain_s_per_item"] > 0 for r in t.values())
    assert report["timing"]["eval_vs_plain_per_agent"] > 0
    assert report["agreement"]["qa"]["qa"] == 1.0 and 0.0 <= report["oracle"] <= 1.0


def test_plain_scorer_and_engine_compute_the_same_loglikelihoods():
    """The baseline must score what ``legion eval`` scores, or the ratio means nothing."""
    scorer = Scorer(config_from_dict({"agents": [VIEWS[3]]}).agents, SHOTS, n_threads=1)
    [(ctx, conts), (cf_ctx, cf_conts)] = scorer.calls(scorer.agents[0], ITEMS[1])
    assert "B. four" in ctx and conts == [" A", " B", " C"] and "N/A" in cf_ctx
    path = bundled_model_path()
    plain = PlainScorer(path, 512, 1)
    engine = LlamaEngine(path, n_ctx=512, n_threads=1)
    try:
        for c, cs in ((ctx, conts), (cf_ctx, cf_conts), (ITEMS[0].context, [" blue", " green sky"])):
            want = plain.score(c, cs)
            got = [r.logprob for r in engine.score(c, cs)]
            # Same choice, and the same log-likelihoods up to llama.cpp's kernel rounding: the
            # plain scorer feeds the continuation one token per decode, the engine in one batch
            # (0.07 apart on one choice here). A scorer reading no logits gives -12.48 (uniform).
            assert got == pytest.approx(want, abs=0.2)
            assert got.index(max(got)) == want.index(max(want))
    finally:
        plain.close()
        engine.close()


def test_free_text_eval_answers_with_real_agents_through_the_cli(tmp_path):
    """``legion eval --free-text`` end to end on the default line-up (two models, nine views): the
    Arbiter answers each item with every strategy named, every view's own answer is a single row,
    every answer is judged, and the report says what each cost."""
    import json
    import subprocess
    import sys

    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(vars(it)) + "\n" for it in ITEMS[:2]))
    out = tmp_path / "ft.json"
    cmd = [sys.executable, "-m", "legion_cli", "eval", "--free-text", "--data", str(data)]
    cmd += [
        "--strategies",
        "plurality,debate",
        "--samples",
        "2",
        "--max-tokens",
        "8",
        "--out",
        str(out),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    res = printed["results"]
    panel = [m.name for m in config_from_dict({}).panel]
    first = panel[0]  # the self-consistency agent by default
    want = {"plurality", "debate", *(f"single:{m}" for m in panel)}
    assert want | {f"greedy:{first}", f"self-consistency:{first}x2"} <= set(res)
    assert all(r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in res.values())
    # Tokens are counted per answer asked for, within --max-tokens each: two samples at most 16.
    assert 0 < res[f"greedy:{first}"]["tokens_per_item"] <= 8
    assert 0 < res[f"self-consistency:{first}x2"]["tokens_per_item"] <= 16
    # The debate's rounds ask the agents again: it costs at least the fan-out.
    assert res["debate"]["tokens_per_item"] >= res["plurality"]["tokens_per_item"]
    saved = json.loads(out.read_text())
    assert saved["judge_agreement"]["answers"] == sum(r["n"] for r in res.values())
    for rec in saved["answers"].values():
        assert set(rec["by"]) == set(res) and rec["reference"]
