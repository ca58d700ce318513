"""ResultCache on real SQLite files: keys, expiry, the size bound, counters, many writers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from legion.config import config_from_dict
from legion.messages import Candidate, TaskRequest, TaskResult
from legion.state.cache import ResultCache, normalize_task


class _Clock:
    """A settable ``time.time`` so expiry and recency do not depend on the machine's speed."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr("legion.state.cache.time.time", c)
    return c


@pytest.fixture()
def cfg(tmp_path):
    return config_from_dict({"data_dir": str(tmp_path), "cache": {"ttl_s": 100, "max_entries": 3}})


def _req(task: str = "What is 2+2?", **kw) -> TaskRequest:
    return TaskRequest(id=kw.pop("id", "task-1"), task=task, strategy=kw.pop("strategy", "plurality"), **kw)


def _result(answer: str) -> TaskResult:
    return TaskResult(
        id="task-x",
        answer=answer,
        strategy="plurality",
        candidates=[Candidate(agent="solver", text=answer, normalized=answer.lower(), score=-0.5)],
        votes={answer.lower(): 1.0},
        latency_ms=12.5,
    )


def test_key_ignores_spacing_case_and_id_but_not_what_changes_the_answer(cfg):
    base = ResultCache.key(_req("What is  2+2?"), cfg)
    assert ResultCache.key(_req("  what is 2+2? ", id="task-2"), cfg) == base
    assert ResultCache.key(_req("What is 2+2?", request_id="r-9", timeout_s=5.0), cfg) == base
    assert normalize_task("\uff37hat\tIS 2+2?") == "what is 2+2?"  # fullwidth W, a tab
    different = [
        ResultCache.key(_req("What is 2+3?"), cfg),
        ResultCache.key(_req(strategy="borda"), cfg),
        ResultCache.key(_req(max_tokens=8), cfg),
        ResultCache.key(_req(context="Conversation so far:\nUser: hi"), cfg),
    ]
    other_agents = cfg.model_copy(deep=True)
    other_agents.agents[0].sampling.temperature = 0.9
    different.append(ResultCache.key(_req("What is  2+2?"), other_agents))
    profiled = cfg.model_copy(deep=True)
    profiled.arbiter.profile = str(cfg.data_path / "p.json")  # the same agents, a profile
    profiled.arbiter.free_text_profile = None  # which then weighs free text too
    different.append(ResultCache.key(_req("What is  2+2?"), profiled))
    # Free text is weighed by the free-text profile: another one is another answer there, and
    # nothing to a task with choices, which arbiter.profile decides.
    text = profiled.model_copy(deep=True)
    text.arbiter.free_text_profile = str(cfg.data_path / "text.json")
    different.append(ResultCache.key(_req("What is  2+2?"), text))
    # How the Arbiter decides counts too: a restart with another setting answers anew.
    for field, value in (("adaptive_risk", 0.2), ("trust_eta", 0.9), ("debate_rounds", 3)):
        other = cfg.model_copy(deep=True)
        setattr(other.arbiter, field, value)
        different.append(ResultCache.key(_req("What is  2+2?"), other))
    # As do the factors arbiter.adapt weighs the profile by now.
    different.append(ResultCache.key(_req("What is  2+2?"), cfg, {"solver": 1.5}))
    assert len({base, *different}) == 1 + len(different)
    pick = _req("What is  2+2?").model_copy(update={"choices": ["3", "4"]})
    assert ResultCache.key(pick, text) == ResultCache.key(pick, profiled)


def test_stored_result_comes_back_and_counters_count(cfg, clock):
    cache = ResultCache.from_config(cfg)
    key = ResultCache.key(_req(), cfg)
    assert cache.get(key) is None
    stored = _result("four")
    cache.put(key, stored)
    assert cache.get(key) == stored
    assert cache.get(key) == stored
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (1, 2, 1)
    assert stats.hit_rate == pytest.approx(2 / 3, abs=1e-4)
    # Another instance (another replica) on the same file sees the same entries and counters.
    assert ResultCache.from_config(cfg).stats().hits == 2


def test_entries_expire_after_ttl(cfg, clock):
    cache = ResultCache.from_config(cfg)
    cache.put("k", _result("four"))
    clock.now += cfg.cache.ttl_s - 1
    assert cache.get("k") is not None
    clock.now += 2
    assert cache.get("k") is None
    cache.put("other", _result("five"))  # a write sweeps expired rows out of the file
    assert cache.stats().entries == 1


def test_size_bound_drops_least_recently_used(cfg, clock):
    cache = ResultCache.from_config(cfg)
    for k in ("a", "b", "c"):
        clock.now += 1
        cache.put(k, _result(k))
    clock.now += 1
    assert cache.get("a") is not None  # "a" is now more recent than "b"
    clock.now += 1
    cache.put("d", _result("d"))
    assert cache.stats().entries == cfg.cache.max_entries
    assert cache.get("b") is None
    assert [cache.get(k).answer for k in ("a", "c", "d")] == ["a", "c", "d"]


def test_clear_removes_entries_and_resets_counters(cfg):
    cache = ResultCache.from_config(cfg)
    cache.put("a", _result("a"))
    cache.get("a")
    assert cache.clear() == 1
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.hit_rate) == (0, 0, 0, 0.0)


def test_entry_of_another_shape_is_a_miss_and_is_dropped(cfg):
    cache = ResultCache.from_config(cfg)
    cache.put("a", _result("a"))
    with sqlite3.connect(cache.path) as conn:
        conn.execute("UPDATE results SET result = ? WHERE key = 'a'", ('{"answer": 1}',))
    assert cache.get("a") is None
    assert cache.stats().entries == 0


_WRITER = textwrap.dedent(
    """
    import sys
    from legion.state.cache import ResultCache
    from legion.messages import TaskResult
    path, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = ResultCache(path, ttl_s=3600, max_entries=100000)
    for i in range(count):
        key = f"{writer}-{i}"
        cache.put(key, TaskResult(id=key, answer=f"answer {key}", strategy="plurality",
                                  candidates=[], votes={}, latency_ms=float(i)))
        cache.get(key)
    """
)


def test_several_processes_write_at_once_and_every_row_survives(tmp_path):
    path = tmp_path / "shared.db"
    writers, count = 4, 150
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{w}", str(count)])
        for w in range(writers)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * writers
    cache = ResultCache(path, ttl_s=3600, max_entries=100000)
    stats = cache.stats()
    assert stats.entries == writers * count
    assert stats.hits == writers * count  # every process's counter updates landed
    for w in range(writers):
        for i in range(count):
            got = cache.get(f"w{w}-{i}")
            assert got is not None and got.answer == f"answer w{w}-{i}" and got.latency_ms == i
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
