"""``legion bench --fanout`` on the real default line-up: the report's shape, the full panel asked
in ``fanout: all`` and part of it (at least one member) in ``adaptive``. Smallest settings (two
multiple-choice tasks, one free-text task of 4 tokens): this checks that the benchmark works and
reports what it claims to, never how fast anything was."""

from __future__ import annotations

from legion.config import load_config
from legion_cli.fanout_bench import BenchTask, bench_config, load_tasks, measure, serving

RATIOS = {
    "adaptive_over_all_tasks_per_s",
    "adaptive_over_all_latency_p50",
    "adaptive_over_all_latency_p95",
    "adaptive_over_all_agents_asked",
}


def _check_mode(s: dict, tasks: int) -> None:
    assert s["tasks"] == tasks and s["wall_s"] > 0 and s["tasks_per_s"] > 0
    assert 0 < s["latency_ms_p50"] <= s["latency_ms_p95"]
    assert sum(s["agents_asked"].values()) == tasks


def test_fanout_bench_reports_both_modes_on_the_default_line_up(ray_cluster, legion_config, tmp_path):
    # The session's Serve proxy port: the bench's app sits beside the session's app under its own prefix.
    cfg = bench_config(load_config(None), legion_config.serve.port, str(tmp_path))
    panel = len(cfg.panel)
    tasks, _ = load_tasks(None, 2)
    with serving(cfg) as url:
        r = measure(url, tasks, concurrency=2, panel=panel)
        f = measure(url, [BenchTask(tasks[0].task)], concurrency=1, max_tokens=4, panel=panel)

    assert r["tasks"] == 2 and r["panel"] == panel and not r["free_text"] and r["max_tokens"] is None
    assert r["concurrency"] == 2 and r["block"] == 4 and r["blocks"] == 1
    for m in ("all", "adaptive"):
        _check_mode(r[m], 2)
        assert r[m]["strategies"] == {cfg.arbiter.choice_strategy: 2}
        assert 0 <= r[m]["correct"] <= 2
    assert r["all"]["agents_asked"] == {str(panel): 2} and r["all"]["agents_asked_mean"] == panel
    assert all(1 <= int(k) <= panel for k in r["adaptive"]["agents_asked"])
    assert 1 <= r["adaptive"]["agents_asked_mean"] <= panel
    assert 0 <= r["same_decisions"] <= 2
    assert set(r["ratios"]) == RATIOS and all(v > 0 for v in r["ratios"].values())

    assert f["tasks"] == 1 and f["free_text"] and f["max_tokens"] == 4
    for m in ("all", "adaptive"):
        _check_mode(f[m], 1)
        assert f[m]["strategies"] == {cfg.arbiter.default_strategy: 1} and "correct" not in f[m]
    assert f["all"]["agents_asked"] == {str(panel): 1}
    assert all(1 <= int(k) <= panel for k in f["adaptive"]["agents_asked"])
    assert set(f["ratios"]) == RATIOS and all(v > 0 for v in f["ratios"].values())
