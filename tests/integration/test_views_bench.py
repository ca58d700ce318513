"""``legion bench --views [--choices]`` on the real model: the report's shape, and every member
answered (free text) and scored (choices) on both sides. Smallest settings (one task of each kind
per side, 4 tokens, one agent with two views): this checks that the benchmark works and reports
what it claims to, never how fast anything was."""

from __future__ import annotations

from legion.agent import _speaking, build_prompt
from legion.config import config_from_dict
from legion_cli.views_bench import _WARM_UP, CHOICES, QUESTIONS, compare, separate_members

AGENTS = config_from_dict(
    {
        "agents": [
            {
                "name": "gemma",
                "num_cpus": 0.5,
                "views": [{"name": "qa"}, {"name": "qa2", "few_shot": 2, "few_shot_seed": 3}],
            }
        ]
    }
).agents


def test_separate_members_keep_each_members_prompt_and_split_the_cpus():
    members = AGENTS[0].members()
    separate = separate_members(AGENTS)
    assert [a.name for a in separate] == ["gemma-qa", "gemma-qa2"]
    for m, a in zip(members, separate, strict=True):
        assert a.views == [] and a.num_cpus == AGENTS[0].num_cpus / len(members)
        assert a.sampling == m.sampling and a.model == m.model
        # Every word of it, its exemplars too.
        assert build_prompt(_speaking(a), "Why is the sky blue?") == build_prompt(
            _speaking(m), "Why is the sky blue?"
        )


def test_every_question_has_a_few_choices():
    assert set(CHOICES) == {*QUESTIONS, _WARM_UP}
    assert all(3 <= len(c) <= 4 for c in CHOICES.values())


def test_views_bench_reports_both_sides(ray_cluster):
    r = compare(AGENTS, repeats=1, max_tokens=4, choices=True)
    members = ["gemma/qa", "gemma/qa2"]
    assert r["members"] == members and r["agents"] == {"gemma": 2}
    assert r["cpus_reserved_per_side"] == 0.5 and r["repeats"] == 1 and r["max_tokens"] == 4
    assert r["a"]["processes"] == 1 and r["a"]["threads"] == 1 and r["a"]["num_cpus_each"] == [0.5]
    assert r["b"]["processes"] == 2 and r["b"]["threads"] == 2 and r["b"]["num_cpus_each"] == [0.25]
    for side in ("a", "b"):
        s = r[side]
        assert s["answered"] == {m: 1 for m in members}, side  # every member answered the one task
        assert s["tasks"] == 1 and len(s["latencies_s"]) == 1
        assert 0 < s["latency_s_p50"] <= s["latency_s_p95"]
        assert 1 <= s["completion_tokens"] <= 4 * len(members) and s["tokens_per_s"] > 0
        assert 0 < s["pss_mib"] <= s["rss_mib"] and 0 < s["model_file_pss_mib"] <= s["pss_mib"]
    assert 0 <= r["same_answers"] <= r["answers"] == len(members)
    assert set(r["ratios"]) == {
        "b_over_a_latency_p50",
        "b_over_a_latency_p95",
        "a_over_b_tokens_per_s",
        "a_over_b_rss",
        "a_over_b_pss",
    }
    assert all(v > 0 for v in r["ratios"].values())
    c = r["choices"]
    assert c["a"]["score_choices_calls"] == 1 and c["b"]["score_choices_calls"] == 2
    for side in ("a", "b"):
        s = c[side]
        assert s["answered"] == {m: 1 for m in members}, side  # every member scored the one task
        assert s["tasks"] == 1 and len(s["latencies_s"]) == 1
        assert 0 < s["latency_s_p50"] <= s["latency_s_p95"] and s["tasks_per_s"] > 0
    assert 0 <= c["same_scores"] <= c["scores"] == len(members)
    assert set(c["ratios"]) == {"b_over_a_latency_p50", "b_over_a_latency_p95", "a_over_b_tasks_per_s"}
    assert all(v > 0 for v in c["ratios"].values())
