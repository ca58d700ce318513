"""``legion calibrate`` then ``legion eval --profile`` on the real model, end to end through the
command line (a handful of items: the mechanics, not the accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys

from legion.config import load_config
from legion.profile import check_agents, load_profile

FACTS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a dog have?", ["three", "four", "six"], 1),
    ("Which animal says moo?", ["a cat", "a cow", "a duck"], 1),
    ("What do bees make?", ["honey", "bread", "glass"], 0),
    ("Which is the coldest?", ["fire", "the sun", "ice"], 2),
    ("What do we breathe?", ["air", "sand", "oil"], 0),
    ("Where do fish live?", ["in trees", "in water", "in the sky"], 1),
    ("What falls from clouds?", ["rain", "rocks", "books"], 0),
    ("Which is a fruit?", ["a hammer", "a brick", "an apple"], 2),
    ("What melts in the sun?", ["snow", "iron", "stone"], 0),
    ("Which is the largest?", ["an ant", "a whale", "a mouse"], 1),
    ("What do cows drink?", ["water", "petrol", "ink"], 0),
]
VIEWS = """
agents:
  - {name: qa, prompt_form: qa, scoring: sum}
  - {name: qa-pmi, prompt_form: qa, scoring: pmi}
  - {name: cloze2, prompt_form: cloze, scoring: per_token, few_shot: 2, few_shot_seed: 1}
"""


def _write(path, rows):
    path.write_text(
        "".join(
            json.dumps({"id": f"f{i}", "context": f"Question: {q}\nAnswer:", "choices": c, "answer": a})
            + "\n"
            for i, (q, c, a) in enumerate(rows)
        )
    )


def _legion(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "legion_cli", *args], capture_output=True, text=True, timeout=600, check=False
    )


def test_calibrate_then_eval_with_the_profile(tmp_path):
    train, dev, cfg = tmp_path / "facts_train.jsonl", tmp_path / "facts_dev.jsonl", tmp_path / "views.yaml"
    _write(train, FACTS)
    _write(dev, FACTS[:5])
    cfg.write_text(VIEWS)
    profile, cache = tmp_path / "profile.json", tmp_path / "scores.jsonl"
    out = _legion(
        "calibrate", "--data", str(train), "--config", str(cfg), "--out", str(profile),
        "--folds", "3", "--threads", "2", "--scores", str(cache), "--shots", str(train),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    p = load_profile(profile)
    # The two exemplars of cloze2 (drawn from --shots, the training file itself here) are left out.
    assert p.fit.items == len(FACTS) - 2 and p.fit.excluded_exemplars == 2
    assert [a.name for a in p.agents] == ["qa", "qa-pmi", "cloze2"] and p.fit.method == "conditional_logit"
    check_agents(p, load_config(cfg).agents)
    assert "held-out accuracy" in out.stdout and "chosen" in out.stdout
    ev = _legion(
        "eval", "--data", str(dev), "--config", str(cfg), "--profile", str(profile),
        "--strategies", "plurality,learned,equilibrium", "--baseline-items", "0", "--json",
        "--scores", str(cache), "--shots", str(train),
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout)
    assert res["learned"]["n"] == 5 and 0.0 <= res["learned"]["accuracy"] <= 1.0
    assert {"single:qa", "single:qa-pmi", "single:cloze2", "plurality", "equilibrium"} <= set(res)
    # A profile fitted for other agents is refused, naming the agent.
    other = tmp_path / "other.yaml"
    other.write_text(VIEWS.replace("scoring: pmi", "scoring: calibrated"))
    bad = _legion(
        "eval", "--data", str(dev), "--config", str(other), "--profile", str(profile), "--baseline-items", "0"
    )
    assert bad.returncode == 2 and "agent 'qa-pmi' differs" in bad.stderr
