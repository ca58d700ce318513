"""``legion bench --views``: an agent's views decoded together in its one engine (A), against the
same panel members as one agent process each (B), side by side in one run on the same CPUs.

A: one ``AgentActor`` per agent; a task sends every member's ``GenerateRequest`` (``view`` = the
member) at once, so each agent's members share its continuous batch and its prefix cache.
B: one ``AgentActor`` per member (``AgentConfig.members``, each member's fields as they are), one
request each per task. Both sides reserve the same CPUs in all (B's share per process: the
total over the members) and stay loaded while the other runs; tasks alternate A/B, B/A, ...
on the same question, so a slow spell of a shared machine hits both. A task's latency is its
wall time until every member answered; tokens/s are every member's completion tokens over the
tasks' wall time. Memory (``/proc/<pid>/smaps_rollup``) is read for each side while the other
side is not running: both map the same model files, so with both up PSS would split those pages
between the sides. B's is read after its warm-up, before A starts; A's after the timed tasks,
once B is gone.

``--choices`` adds the multiple-choice tasks after the free-text ones, on the same actors: each
question with its choices (``CHOICES``), served as ``POST /v1/tasks`` with choices serves it, one
``score_choices`` call per actor naming every member it answers for (A: all of an agent's views,
whose calls go to its engine at once, a call two members make alike once; B: its one member). Its
latency is the wall time until every member's scores are back. They follow an untimed scored
warm-up question on each side, after the memory of B is read, so the free-text rows and the memory
are what ``--views`` alone measures.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from legion.config import AgentConfig
from legion.engine.llama import model_file
from legion.engine.views import exemplar_seed
from legion.errors import ConfigError, ModelLoadError
from legion_cli.bench import _progress, json_stdout
from legion_cli.model_memory import process_memory

# Short ARC-style science questions, answered free-text by every member.
QUESTIONS = (
    "Which form of energy does a plant use to make its food?",
    "What is the main gas that plants take in from the air?",
    "Which planet is closest to the Sun?",
    "What happens to water when it is cooled below 0 degrees Celsius?",
    "Which organ pumps blood through the human body?",
    "What force pulls objects toward the center of the Earth?",
    "Which of these is a renewable resource: coal, oil, or wind?",
    "What do we call an animal that eats only plants?",
    "Which state of matter has a definite volume but no definite shape?",
    "What tool is used to measure the mass of an object?",
    "Why does the Moon appear to change shape during a month?",
    "What part of a plant takes in water from the soil?",
)
_WARM_UP = "What is the boiling point of water at sea level?"

# The choices each question is asked with in ``--choices`` (the right answer first: no side is told).
CHOICES: dict[str, tuple[str, ...]] = {
    QUESTIONS[0]: ("light energy", "sound energy", "heat from the soil", "electrical energy"),
    QUESTIONS[1]: ("carbon dioxide", "oxygen", "nitrogen", "helium"),
    QUESTIONS[2]: ("Mercury", "Venus", "Earth", "Mars"),
    QUESTIONS[3]: ("it freezes into ice", "it boils", "it turns into steam"),
    QUESTIONS[4]: ("the heart", "the lungs", "the liver", "the stomach"),
    QUESTIONS[5]: ("gravity", "magnetism", "friction"),
    QUESTIONS[6]: ("wind", "coal", "oil"),
    QUESTIONS[7]: ("a herbivore", "a carnivore", "an omnivore", "a decomposer"),
    QUESTIONS[8]: ("liquid", "solid", "gas"),
    QUESTIONS[9]: ("a balance", "a thermometer", "a ruler", "a stopwatch"),
    QUESTIONS[10]: (
        "we see different parts of its sunlit half",
        "clouds cover part of it",
        "it grows and shrinks",
    ),
    QUESTIONS[11]: ("the roots", "the leaves", "the flowers", "the seeds"),
    _WARM_UP: ("100 degrees Celsius", "0 degrees Celsius", "50 degrees Celsius"),
}


def separate_members(agents: list[AgentConfig]) -> list[AgentConfig]:
    """Side B: one agent per panel member of ``agents``, the member's own fields (its prompt,
    exemplars, sampling, model) and ``views`` empty, each reserving the total CPUs of
    ``agents`` over the number of members. The exemplar seed is fixed to the member's own (which
    its name derives when unset), so each draws the exemplars it draws as a view; only a derived
    seed past the field's bound (2**31 - 1) cannot be set, and that member draws by its new name.
    The agents are named as the members, ``-`` for ``/``."""
    members = [m for a in agents for m in a.members()]
    share = sum(a.num_cpus for a in agents) / len(members)
    out, seen = [], set()
    for i, m in enumerate(members):
        name = m.name.replace("/", "-")
        if len(name) > 32 or name in seen:
            name = f"member-{i}"
        seen.add(name)
        data = m.model_dump(exclude={"name", "views", "num_cpus", "few_shot_seed"})
        seed = exemplar_seed(m)
        seed = seed if seed <= 2**31 - 1 else None
        out.append(AgentConfig(name=name, num_cpus=share, views=[], few_shot_seed=seed, **data))
    return out


@dataclass
class _Tally:
    """One kind of task on one side: each task's seconds, and how often each member answered."""

    seconds: list[float] = field(default_factory=list)
    answered: Counter = field(default_factory=Counter)
    tokens: int = 0  # completion tokens (free text only)

    def summary(self) -> dict:
        s = self.seconds
        return {
            "tasks": len(s),
            "latency_s_p50": round(_percentile(s, 0.5), 3),
            "latency_s_p95": round(_percentile(s, 0.95), 3),
            "answered": dict(self.answered),
            "latencies_s": [round(x, 3) for x in s],
        }


@dataclass
class _Side:
    """The actors of one side and what its tasks cost."""

    label: str
    configs: list[AgentConfig]
    # B: the panel member each agent stands for (its requests name no view); A: None.
    stands_for: list[str] | None = None
    handles: list = field(default_factory=list)
    # Per actor: the members it answers for, by the name it knows each by (A: the view; B: its own).
    groups: list[tuple[object, dict[str, str]]] = field(default_factory=list)
    text: _Tally = field(default_factory=_Tally)
    choice: _Tally = field(default_factory=_Tally)
    last_s: float = 0.0  # the last task's seconds, either kind

    def start(self) -> None:
        """Start one actor per config (each loads its model itself)."""
        import ray

        from actors.agent import AgentActor

        cls = ray.remote(AgentActor)
        for i, cfg in enumerate(self.configs):
            own = [m.name for m in cfg.members()]
            # A threaded actor: every member's request waits on the engine's batch in its own thread.
            opts = {"num_cpus": cfg.num_cpus, "max_concurrency": len(own) + 4}
            handle = cls.options(**opts).remote(cfg.model_dump(mode="json"))
            self.handles.append(handle)
            stands = own if self.stands_for is None else [self.stands_for[i]]
            self.groups.append((handle, dict(zip(own, stands, strict=True))))

    def wait_ready(self) -> None:
        import ray

        healths = ray.get([h.wait_loaded.remote() for h in self.handles])
        for cfg, health in zip(self.configs, healths, strict=True):
            if health.state != "ready":
                raise ModelLoadError(
                    f"side {self.label}: agent {cfg.name} did not load its model: {health.error}"
                )

    def _timed(self, tally: _Tally, submit: Callable[[], list]) -> list:
        """What ``submit()``'s object refs return, awaited; the wall time from before ``submit``
        goes into ``tally``."""
        import ray

        t0 = time.perf_counter()
        out = ray.get(submit())
        self.last_s = time.perf_counter() - t0
        tally.seconds.append(self.last_s)
        return out

    def task(self, question: str, max_tokens: int) -> dict[str, str]:
        """Every member answers ``question`` at once (greedy); its texts by member. Timed."""
        from legion.messages import GenerateRequest

        calls = [
            (member, h, own if self.stands_for is None else None)
            for h, names in self.groups
            for own, member in names.items()
        ]
        gens = self._timed(
            self.text,
            lambda: [
                h.generate.remote(
                    GenerateRequest(task=question, view=view, max_tokens=max_tokens, temperature=0.0)
                )
                for _, h, view in calls
            ],
        )
        self.text.tokens += sum(g.completion_tokens for g in gens)
        texts = {m: g.text for (m, _, _), g in zip(calls, gens, strict=True)}
        self.text.answered.update(texts.keys())
        return texts

    def choose(self, question: str) -> dict[str, tuple[float, ...]]:
        """Every member scores ``CHOICES[question]``, one ``score_choices`` call per actor, all at
        once; the scores (to 4 decimals) by member, of every member that got them back. Timed."""
        choices = list(CHOICES[question])
        got = self._timed(
            self.choice,
            lambda: [h.score_choices.remote(question, choices, list(names)) for h, names in self.groups],
        )
        scores = {
            names[cs.member]: tuple(round(x, 4) for x in cs.scores)
            for (_, names), scored in zip(self.groups, got, strict=True)
            for cs in scored
            if len(cs.scores) == len(choices)
        }
        self.choice.answered.update(scores.keys())
        return scores

    def memory(self) -> dict[str, float]:
        """MiB summed over this side's actor processes."""
        import ray

        pids = [h.pid for h in ray.get([h.health.remote() for h in self.handles])]
        rows = [process_memory(p, model_file(c)) for p, c in zip(pids, self.configs, strict=True)]
        return {
            "rss_mib": round(sum(r["rss"] for r in rows), 1),
            "pss_mib": round(sum(r["pss"] for r in rows), 1),
            "model_file_pss_mib": round(sum(r["model_file_pss"] for r in rows), 1),
        }

    def close(self) -> None:
        """Kill the actors and wait (up to 60 s) until their processes are gone."""
        import ray

        if not self.handles:
            return
        try:
            pids = [h.pid for h in ray.get([h.health.remote() for h in self.handles], timeout=30)]
        except Exception:  # an actor that died already: nothing of it left to wait for
            pids = []
        for h in self.handles:
            ray.kill(h)
        self.handles = []
        deadline = time.monotonic() + 60
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)

    def summary(self) -> dict:
        """The free-text tasks'."""
        t = self.text
        return {
            "processes": len(self.configs),
            "num_cpus_each": sorted({round(c.num_cpus, 4) for c in self.configs}),
            "threads": sum(c.threads for c in self.configs),
            **t.summary(),
            "completion_tokens": t.tokens,
            "tokens_per_s": round(t.tokens / sum(t.seconds), 1),
        }

    def choice_summary(self) -> dict:
        """The multiple-choice tasks'."""
        return {
            **self.choice.summary(),
            "tasks_per_s": round(len(self.choice.seconds) / sum(self.choice.seconds), 2),
        }


def _percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs``, linear between the nearest ranks."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _alternate(a: _Side, b: _Side, repeats: int, what: str, run: Callable[[_Side, int], dict]) -> int:
    """``repeats`` tasks per side, the order alternating A/B, B/A, ... (whichever runs second in a
    pair must not be favoured); ``run(side, r)`` does task ``r`` on ``side`` and returns each
    member's result. How many member results were the same on both sides."""
    same = 0
    for r in range(repeats):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        got = {first.label: run(first, r), second.label: run(second, r)}
        same += sum(got["A"][m] == got["B"].get(m) for m in got["A"])
        _progress(f"{what} {r + 1}/{repeats}: A {a.last_s:.2f} s, B {b.last_s:.2f} s")
    return same


def _latency_ratios(sa: dict, sb: dict) -> dict[str, float]:
    return {
        f"b_over_a_latency_{q}": round(sb[f"latency_s_{q}"] / sa[f"latency_s_{q}"], 3) for q in ("p50", "p95")
    }


def compare(agents: list[AgentConfig], repeats: int = 8, max_tokens: int = 24, choices: bool = False) -> dict:
    """Side A (``agents``, their views in one engine each) against side B
    (``separate_members(agents)``) in the running Ray cluster, ``repeats`` alternated free-text
    tasks per side after a warm-up task each, then (``choices``) as many multiple-choice tasks;
    the report (see the module docstring)."""
    import ray

    if repeats < 1 or max_tokens < 1:
        raise ConfigError("--repeats and --max-tokens must be at least 1")
    names = [m.name for a in agents for m in a.members()]
    total = sum(a.num_cpus for a in agents)
    free = ray.available_resources().get("CPU", 0.0)
    if free + 1e-6 < 2 * total:
        raise ConfigError(
            f"both sides stay up together and reserve {2 * total:g} CPUs, but the Ray cluster has "
            f"{free:g} free: lower the agents' num_cpus or give Ray more logical CPUs"
        )
    a = _Side("A", list(agents))
    b = _Side("B", separate_members(agents), stands_for=names)

    def load(side: _Side) -> None:
        side.start()
        side.wait_ready()
        side.task(_WARM_UP, max_tokens)
        side.text = _Tally()  # the warm-up is no measure

    questions = [QUESTIONS[r % len(QUESTIONS)] for r in range(repeats)]
    same_scores = 0
    try:
        _progress(f"B: {len(names)} agents, one per member, num_cpus {total / len(names):.3f} each ...")
        load(b)
        b_memory = b.memory()  # before A maps the same model files
        _progress(f"A: {len(agents)} agent(s) speaking as their {len(names)} views ...")
        load(a)
        same = _alternate(a, b, repeats, "task", lambda side, r: side.task(questions[r], max_tokens))
        if choices:
            # Nor is the first scoring after writing: an agent's members write and score from
            # different prompts, more than its prefix-cache slots hold, so A refills them
            # (measured without this: A's first choices task 3.95 s, its median 0.99 s).
            for side in (b, a):
                side.choose(_WARM_UP)
                side.choice = _Tally()
            same_scores = _alternate(a, b, repeats, "choices", lambda side, r: side.choose(questions[r]))
        b.close()
        a_memory = a.memory()  # B gone: A alone maps the model files
    finally:
        b.close()
        a.close()
    sa, sb = {**a.summary(), **a_memory}, {**b.summary(), **b_memory}
    report = {
        "agents": {x.name: len(x.members()) for x in agents},
        "members": names,
        "cpus_reserved_per_side": round(total, 4),
        "repeats": repeats,
        "max_tokens": max_tokens,
        "a": {"what": "each agent's views in its one engine", **sa},
        "b": {"what": "one agent process per member", **sb},
        "same_answers": same,
        "answers": repeats * len(names),
        "ratios": {
            **_latency_ratios(sa, sb),
            "a_over_b_tokens_per_s": round(sa["tokens_per_s"] / sb["tokens_per_s"], 3),
            "a_over_b_rss": round(sa["rss_mib"] / sb["rss_mib"], 3),
            "a_over_b_pss": round(sa["pss_mib"] / sb["pss_mib"], 3),
        },
    }
    if choices:
        ca, cb = a.choice_summary(), b.choice_summary()
        report["choices"] = {
            "a": {"score_choices_calls": len(a.groups), **ca},
            "b": {"score_choices_calls": len(b.groups), **cb},
            "same_scores": same_scores,
            "scores": repeats * len(names),
            "ratios": {
                **_latency_ratios(ca, cb),
                "a_over_b_tasks_per_s": round(ca["tasks_per_s"] / cb["tasks_per_s"], 3),
            },
        }
    return report


def print_report(r: dict) -> None:
    agents = ", ".join(f"{n}: {k} view(s)" for n, k in r["agents"].items())
    print(
        f"{len(r['members'])} members of {len(r['agents'])} agent(s) ({agents}); "
        f"{r['cpus_reserved_per_side']:g} CPUs reserved on each side; {r['repeats']} tasks per side, "
        f"alternated; greedy, at most {r['max_tokens']} tokens per answer"
    )
    head = ("side", "processes", "threads", "p50 s", "p95 s", "tok/s", "RSS MiB", "PSS MiB")
    print(
        f"{head[0]:<42}{head[1]:>10}{head[2]:>8}{head[3]:>8}{head[4]:>8}{head[5]:>8}{head[6]:>10}{head[7]:>10}"
    )
    for key in ("a", "b"):
        s = r[key]
        label = f"{key.upper()}: {s['what']}"
        print(
            f"{label:<42}{s['processes']:>10}{s['threads']:>8}{s['latency_s_p50']:>8.3f}"
            f"{s['latency_s_p95']:>8.3f}{s['tokens_per_s']:>8.1f}{s['rss_mib']:>10.1f}{s['pss_mib']:>10.1f}"
        )
    x = r["ratios"]
    print(
        f"B/A latency p50 {x['b_over_a_latency_p50']}, p95 {x['b_over_a_latency_p95']}; "
        f"A/B tokens/s {x['a_over_b_tokens_per_s']}; A/B RSS {x['a_over_b_rss']}, PSS {x['a_over_b_pss']}"
    )
    print(f"the same answer on both sides: {r['same_answers']} of {r['answers']} member answers")
    if "choices" not in r:
        return
    c = r["choices"]
    print(
        f"multiple choice, the same questions with 3-4 choices each: {r['repeats']} tasks per side, "
        "alternated; one score_choices call per actor, every member it answers for"
    )
    print(f"{'side':<42}{'calls':>10}{'p50 s':>8}{'p95 s':>8}{'tasks/s':>9}")
    for key in ("a", "b"):
        s = c[key]
        label = f"{key.upper()}: {r[key]['what']}"
        print(
            f"{label:<42}{s['score_choices_calls']:>10}{s['latency_s_p50']:>8.3f}"
            f"{s['latency_s_p95']:>8.3f}{s['tasks_per_s']:>9.2f}"
        )
    x = c["ratios"]
    print(
        f"B/A latency p50 {x['b_over_a_latency_p50']}, p95 {x['b_over_a_latency_p95']}; "
        f"A/B tasks/s {x['a_over_b_tasks_per_s']}"
    )
    print(f"the same scores on both sides (4 decimals): {c['same_scores']} of {c['scores']} member scorings")


def run_views_bench(
    agents: list[AgentConfig], repeats: int, max_tokens: int, as_json: bool, choices: bool = False
) -> int:
    """``legion bench --views [--choices]``: starts a local Ray cluster where none is running."""
    import ray

    with json_stdout(as_json) as out:
        if not ray.is_initialized():
            # Logical CPUs: both sides stay up, each reserving the agents' total; threads come from
            # each agent's num_cpus, so this changes placement, not threads.
            need = math.ceil(2 * sum(a.num_cpus for a in agents))
            ray.init(
                num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level="WARNING"
            )
        r = compare(agents, repeats, max_tokens, choices)
    print(json.dumps(r), file=out) if as_json else print_report(r)
    return 0
