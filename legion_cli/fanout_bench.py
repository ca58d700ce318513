"""``legion bench --fanout``: served throughput of ``fanout: adaptive`` against ``fanout: all``,
side by side in one run against one running Legion (issue 25, "Served throughput").

The bench serves the configured line-up (default: the default one) as a Serve app of its own, on a
throwaway data folder, and sends one fixed set of uncached tasks (``"cache": false``) through
``POST /v1/tasks``: every task once with ``fanout: all`` and once with ``fanout: adaptive``. The
tasks run in blocks of ``2 x concurrency``; within a block one mode's tasks go ``concurrency`` at a
time, then the other mode's (the same tasks), the order alternating from block to block (all
first, then adaptive first, ...), so a slow spell of a shared machine, and whatever the first
mode leaves in the agents' prefix caches for the second, fall on both modes alike.

Per mode: tasks/s (its tasks over the summed wall time of its blocks), p50/p95 of each request's
wall time at the client, the mean panel members asked per task (``agents_asked``), and with
choices how many decisions were right; then the ratios adaptive/all and how often the two modes
decided the same. Tasks: multiple-choice items (the question and its choices) from ``--data``,
default the ARC-Easy dev set where it is present (``DEV_SET``), else the short science questions
of ``legion bench --views``; with ``--free-text`` the same questions without their choices.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from legion.config import LegionConfig, config_from_dict
from legion.errors import ConfigError
from legion_cli.bench import _progress, json_stdout
from legion_cli.rag_bench import _free_port
from legion_cli.views_bench import _WARM_UP, CHOICES, QUESTIONS, _percentile

MODES = ("all", "adaptive")
# The project's benchmark data (see its README); a clone without it uses the built-in questions.
DEV_SET = Path("/work/shared/benchdata/arc_easy_dev.jsonl")
APP_NAME = "legionfanoutbench"


@dataclass(frozen=True)
class BenchTask:
    """One task as ``/v1/tasks`` gets it; ``answer`` is the right choice's index (None: unknown)."""

    task: str
    choices: tuple[str, ...] = ()
    answer: int | None = None

    def body(self, fanout: str, max_tokens: int) -> dict:
        out: dict = {"task": self.task, "cache": False, "fanout": fanout}
        if self.choices:
            out["choices"] = list(self.choices)
        else:
            out["max_tokens"] = max_tokens
        return out


def load_tasks(data: str | None, limit: int | None, free_text: bool = False) -> tuple[list[BenchTask], str]:
    """The bench's tasks and where they came from: the first ``limit`` items of ``data`` (the eval's
    JSONL format; default ``DEV_SET`` when present), each its question and choices, or the built-in
    questions with their choices. ``free_text``: the questions alone."""
    from legion.engine.views import load_items, split_question

    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    path = Path(data) if data else (DEV_SET if DEV_SET.is_file() else None)
    if path is None:
        tasks = [BenchTask(q, CHOICES[q], 0) for q in QUESTIONS[:limit]]  # the right answer first
        source = "built-in questions (legion_cli.views_bench)"
    else:
        tasks = []
        for item in load_items(path, limit):
            parts = split_question(item.context)
            question = (parts[1] if parts is not None else item.context).strip()
            tasks.append(BenchTask(question, tuple(item.choices), item.answer))
        source = str(path)
    if free_text:
        tasks = [BenchTask(t.task) for t in tasks]
    return tasks, source


def bench_config(base: LegionConfig, port: int, data_dir: str) -> LegionConfig:
    """``base``'s agents and Arbiter, served as the bench's own app (one ingress replica) on ``port``
    with its state in ``data_dir``. Admission (``serve.max_queue_wait_s``) is off: the bench
    measures what the agents get done with every task taken, not what a busy server sheds."""
    raw = base.model_dump(mode="json")
    raw.update(data_dir=data_dir)
    raw["serve"].update(app_name=APP_NAME, port=port, min_replicas=1, max_replicas=1, max_queue_wait_s=0)
    return config_from_dict(raw, source="bench configuration")


@contextlib.contextmanager
def serving(cfg: LegionConfig, load_timeout_s: float = 900) -> Iterator[str]:
    """``cfg``'s app served in the running Ray cluster at ``/<app_name>`` on Serve's proxy (started
    on ``cfg.serve.port`` unless Serve runs already: then on its port, which must be
    ``cfg.serve.port``); yields its URL once ``/healthz`` answers 200 (every agent loaded), and
    deletes the app and its actors after."""
    import httpx
    from ray import serve

    from actors import stop_actors
    from serve_app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    prefix = f"/{cfg.serve.app_name}"
    serve.run(build_app(cfg), name=cfg.serve.app_name, route_prefix=prefix)
    url = f"http://127.0.0.1:{cfg.serve.port}{prefix}"
    try:
        deadline = time.monotonic() + load_timeout_s
        with httpx.Client(base_url=url, timeout=60) as client:
            while (r := client.get("/healthz")).status_code != 200:
                if r.status_code != 503 or time.monotonic() > deadline:
                    raise RuntimeError(f"Legion did not become healthy: {r.status_code} {r.text[:300]}")
                time.sleep(0.5)
        yield url
    finally:
        serve.delete(cfg.serve.app_name)
        stop_actors(cfg)


@dataclass
class _Mode:
    """What one fan-out mode's tasks cost and decided."""

    name: str
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)
    risks: list[float] = field(default_factory=list)
    strategies: Counter = field(default_factory=Counter)
    decisions: dict[int, object] = field(default_factory=dict)  # task index -> choice index or answer
    correct: int = 0

    def summary(self, scored: bool) -> dict:
        n = len(self.latencies_ms)
        out = {
            "tasks": n,
            "wall_s": round(self.wall_s, 3),
            "tasks_per_s": round(n / self.wall_s, 4),
            "latency_ms_p50": round(_percentile(self.latencies_ms, 0.5), 1),
            "latency_ms_p95": round(_percentile(self.latencies_ms, 0.95), 1),
            "agents_asked_mean": round(statistics.fmean(self.asked), 3),
            "agents_asked": {str(k): v for k, v in sorted(Counter(self.asked).items())},
            "strategies": dict(self.strategies),
        }
        if self.risks:
            out["adaptive_risk_mean"] = round(statistics.fmean(self.risks), 4)
        if scored:
            out["correct"] = self.correct
        return out


def _post(client, task: BenchTask, fanout: str, max_tokens: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = client.post("/v1/tasks", json=task.body(fanout, max_tokens))
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"/v1/tasks ({fanout}) answered {r.status_code}: {r.text[:300]}")
    return r.json(), ms


def _decision(task: BenchTask, data: dict) -> object:
    if task.choices:
        return (data.get("choice") or {}).get("index")
    return data.get("answer")


def measure(
    url: str, tasks: list[BenchTask], concurrency: int = 4, max_tokens: int = 24, panel: int | None = None
) -> dict:
    """Every task of ``tasks`` through ``url``'s ``/v1/tasks`` once per fan-out mode, in alternated
    blocks (the module docstring), after an untimed warm-up task per mode; the report. ``panel``:
    the panel's size, for the report."""
    import httpx

    from legion.progress import progress_bar

    if concurrency < 1 or not tasks:
        raise ConfigError("--concurrency must be at least 1, and there must be a task")
    block = 2 * concurrency
    free_text = not tasks[0].choices
    scored = not free_text and all(t.answer is not None for t in tasks)
    modes = {m: _Mode(m) for m in MODES}
    blocks = [range(i, min(i + block, len(tasks))) for i in range(0, len(tasks), block)]
    advance = progress_bar(2 * len(tasks), "task", "fan-out")
    tty = sys.stderr.isatty()
    client = httpx.Client(base_url=url, timeout=900, limits=httpx.Limits(max_connections=concurrency + 2))
    with client, ThreadPoolExecutor(concurrency) as pool:
        warm = BenchTask(_WARM_UP) if free_text else BenchTask(_WARM_UP, CHOICES[_WARM_UP])
        for m in MODES:  # the first tasks after loading pay for filling the prefix caches
            _post(client, warm, m, max_tokens)

        def run(mode: _Mode, idx: range) -> None:
            t0 = time.perf_counter()
            got = list(pool.map(lambda i: (i, *_post(client, tasks[i], mode.name, max_tokens)), idx))
            mode.wall_s += time.perf_counter() - t0
            for i, data, ms in got:
                mode.latencies_ms.append(ms)
                # agents_asked is the contract; a response before it counts the members that answered.
                asked = data.get("agents_asked")
                mode.asked.append(int(asked) if asked is not None else len(data.get("candidates") or []))
                if data.get("adaptive_risk") is not None:
                    mode.risks.append(float(data["adaptive_risk"]))
                mode.strategies[data.get("strategy")] += 1
                mode.decisions[i] = _decision(tasks[i], data)
                if scored and mode.decisions[i] == tasks[i].answer:
                    mode.correct += 1
            advance(len(got))

        for b, idx in enumerate(blocks):
            order = MODES if b % 2 == 0 else MODES[::-1]
            for m in order:
                run(modes[m], idx)
            if not tty:
                done = idx.stop
                _progress(
                    f"block {b + 1}/{len(blocks)} ({done}/{len(tasks)} tasks, {order[0]} first): "
                    + ", ".join(f"{m} {statistics.fmean(modes[m].asked):.2f} asked" for m in MODES)
                )
    sa, sd = modes["all"].summary(scored), modes["adaptive"].summary(scored)
    same = sum(modes["all"].decisions[i] == modes["adaptive"].decisions[i] for i in range(len(tasks)))
    return {
        "tasks": len(tasks),
        "free_text": free_text,
        "concurrency": concurrency,
        "block": block,
        "blocks": len(blocks),
        "max_tokens": max_tokens if free_text else None,
        "panel": panel,
        "all": sa,
        "adaptive": sd,
        "same_decisions": same,
        "ratios": {
            "adaptive_over_all_tasks_per_s": round(sd["tasks_per_s"] / sa["tasks_per_s"], 3),
            "adaptive_over_all_latency_p50": round(sd["latency_ms_p50"] / sa["latency_ms_p50"], 3),
            "adaptive_over_all_latency_p95": round(sd["latency_ms_p95"] / sa["latency_ms_p95"], 3),
            "adaptive_over_all_agents_asked": round(sd["agents_asked_mean"] / sa["agents_asked_mean"], 3),
        },
    }


def print_report(r: dict) -> None:
    kind = "free-text tasks" if r["free_text"] else "multiple-choice tasks"
    agents = ", ".join(f"{n} ({k} views)" for n, k in r["agents"].items())
    print(
        f"{r['tasks']} uncached {kind} from {r['source']}, each with fanout all and adaptive; "
        f"{r['concurrency']} at a time, in {r['blocks']} alternated blocks of {r['block']}; "
        f"a panel of {r['panel']}: {agents}"
    )
    scored = "correct" in r["all"]
    head = f"{'fanout':<10}{'tasks/s':>9}{'p50 ms':>10}{'p95 ms':>10}{'asked/task':>12}"
    print(head + (f"{'right':>8}" if scored else ""))
    for m in MODES:
        s = r[m]
        line = (
            f"{m:<10}{s['tasks_per_s']:>9.3f}{s['latency_ms_p50']:>10.0f}{s['latency_ms_p95']:>10.0f}"
            f"{s['agents_asked_mean']:>12.2f}"
        )
        print(line + (f"{s['correct']:>5}/{s['tasks']}" if scored else ""))
    x = r["ratios"]
    print(
        f"adaptive/all: tasks/s {x['adaptive_over_all_tasks_per_s']}, latency p50 "
        f"{x['adaptive_over_all_latency_p50']}, p95 {x['adaptive_over_all_latency_p95']}, agents asked "
        f"{x['adaptive_over_all_agents_asked']}; the same decision on {r['same_decisions']} of {r['tasks']} "
        "tasks"
    )
    print(f"strategy: {', '.join(sorted(set(r['all']['strategies']) | set(r['adaptive']['strategies'])))}")


def run_fanout_bench(
    base: LegionConfig,
    data: str | None = None,
    limit: int | None = 40,
    concurrency: int = 4,
    free_text: bool = False,
    max_tokens: int = 24,
    as_json: bool = False,
) -> int:
    """``legion bench --fanout``: starts a local Ray cluster where none is running, serves
    ``base``'s line-up in it, measures, prints the table (or one JSON object)."""
    import ray
    from ray import serve

    tasks, source = load_tasks(data, limit, free_text)
    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    started = not ray.is_initialized()
    with json_stdout(as_json) as out:
        if started:
            ray.init(include_dashboard=False, logging_level="WARNING", namespace=base.ray_namespace)
        work = tempfile.TemporaryDirectory(prefix="legion-fanout-bench-")
        cfg = bench_config(base, _free_port(), work.name)
        try:
            _progress(f"serving {len(cfg.agents)} agents, a panel of {len(cfg.panel)}; loading them ...")
            with serving(cfg) as url:
                _progress(f"{len(tasks)} tasks x 2 fan-out modes, {concurrency} at a time ...")
                r = measure(url, tasks, concurrency, max_tokens, len(cfg.panel))
        finally:
            if started:
                serve.shutdown()
                ray.shutdown()
            work.cleanup()
    r = {"source": source, "agents": {a.name: len(a.members()) for a in cfg.agents}, **r}
    print(json.dumps(r), file=out) if as_json else print_report(r)
    return 0
