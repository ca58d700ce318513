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
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from legion.config import AgentConfig
from legion.engine.llama import model_file
from legion.engine.views import exemplar_seed
from legion.errors import ConfigError, ModelLoadError
from legion_cli.bench import _progress
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
class _Side:
    """The actors of one side and what a task on them cost."""

    label: str
    configs: list[AgentConfig]
    # B: the panel member each agent stands for (its requests name no view); A: None.
    stands_for: list[str] | None = None
    handles: list = field(default_factory=list)
    # (member, the actor that answers it, the view its request names)
    members: list[tuple[str, object, str | None]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    answered: Counter = field(default_factory=Counter)

    def start(self) -> None:
        """Start one actor per config (each loads its model itself)."""
        import ray

        from actors.agent import AgentActor

        cls = ray.remote(AgentActor)
        for cfg in self.configs:
            members = cfg.members()
            # A threaded actor: every member's request waits on the engine's batch in its own thread.
            opts = {"num_cpus": cfg.num_cpus, "max_concurrency": len(members) + 4}
            self.handles.append(cls.options(**opts).remote(cfg.model_dump(mode="json")))
        if self.stands_for is not None:
            self.members = [(n, h, None) for n, h in zip(self.stands_for, self.handles, strict=True)]
        else:
            self.members = [
                (m.name, h, m.name)
                for cfg, h in zip(self.configs, self.handles, strict=True)
                for m in cfg.members()
            ]

    def wait_ready(self) -> None:
        import ray

        healths = ray.get([h.wait_loaded.remote() for h in self.handles])
        for cfg, health in zip(self.configs, healths, strict=True):
            if health.state != "ready":
                raise ModelLoadError(
                    f"side {self.label}: agent {cfg.name} did not load its model: {health.error}"
                )

    def task(self, question: str, max_tokens: int) -> dict[str, str]:
        """Every member answers ``question`` at once (greedy); its texts by member. Timed."""
        import ray

        from legion.messages import GenerateRequest

        t0 = time.perf_counter()
        refs = [
            h.generate.remote(
                GenerateRequest(task=question, view=view, max_tokens=max_tokens, temperature=0.0)
            )
            for _, h, view in self.members
        ]
        gens = ray.get(refs)
        self.seconds.append(time.perf_counter() - t0)
        self.tokens += sum(g.completion_tokens for g in gens)
        self.answered.update(m for m, _, _ in self.members)
        return {m: g.text for (m, _, _), g in zip(self.members, gens, strict=True)}

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
        s = self.seconds
        return {
            "processes": len(self.configs),
            "num_cpus_each": sorted({round(c.num_cpus, 4) for c in self.configs}),
            "threads": sum(c.threads for c in self.configs),
            "tasks": len(s),
            "latency_s_p50": round(_percentile(s, 0.5), 3),
            "latency_s_p95": round(_percentile(s, 0.95), 3),
            "completion_tokens": self.tokens,
            "tokens_per_s": round(self.tokens / sum(s), 1),
            "answered": dict(self.answered),
            "latencies_s": [round(x, 3) for x in s],
        }


def _percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs``, linear between the nearest ranks."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def compare(agents: list[AgentConfig], repeats: int = 8, max_tokens: int = 24) -> dict:
    """Side A (``agents``, their views in one engine each) against side B
    (``separate_members(agents)``) in the running Ray cluster, ``repeats`` alternated tasks per
    side after a warm-up task each; the report (see the module docstring)."""
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
    same = 0
    try:
        _progress(f"B: {len(names)} agents, one per member, num_cpus {total / len(names):.3f} each ...")
        b.start()
        b.wait_ready()
        b.task(_WARM_UP, max_tokens)
        b_memory = b.memory()  # before A maps the same model files
        _progress(f"A: {len(agents)} agent(s) speaking as their {len(names)} views ...")
        a.start()
        a.wait_ready()
        a.task(_WARM_UP, max_tokens)
        for side in (a, b):  # the warm-up is no measure
            side.seconds.clear()
            side.tokens = 0
            side.answered.clear()
        for r in range(repeats):
            question = QUESTIONS[r % len(QUESTIONS)]
            # The order alternates: whichever runs second in a pair must not be favoured.
            first, second = (a, b) if r % 2 == 0 else (b, a)
            texts = {
                first.label: first.task(question, max_tokens),
                second.label: second.task(question, max_tokens),
            }
            same += sum(texts["A"][m] == texts["B"][m] for m in names)
            _progress(f"task {r + 1}/{repeats}: A {a.seconds[-1]:.2f} s, B {b.seconds[-1]:.2f} s")
        b.close()
        a_memory = a.memory()  # B gone: A alone maps the model files
    finally:
        b.close()
        a.close()
    sa, sb = {**a.summary(), **a_memory}, {**b.summary(), **b_memory}
    return {
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
            "b_over_a_latency_p50": round(sb["latency_s_p50"] / sa["latency_s_p50"], 3),
            "b_over_a_latency_p95": round(sb["latency_s_p95"] / sa["latency_s_p95"], 3),
            "a_over_b_tokens_per_s": round(sa["tokens_per_s"] / sb["tokens_per_s"], 3),
            "a_over_b_rss": round(sa["rss_mib"] / sb["rss_mib"], 3),
            "a_over_b_pss": round(sa["pss_mib"] / sb["pss_mib"], 3),
        },
    }


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


def run_views_bench(agents: list[AgentConfig], repeats: int, max_tokens: int, as_json: bool) -> int:
    """``legion bench --views``: starts a local Ray cluster where none is running."""
    import ray

    if not ray.is_initialized():
        # Logical CPUs: both sides stay up, each reserving the agents' total; threads come from
        # each agent's num_cpus, so this changes placement, not threads.
        need = math.ceil(2 * sum(a.num_cpus for a in agents))
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level="WARNING")
    r = compare(agents, repeats, max_tokens)
    print(json.dumps(r)) if as_json else print_report(r)
    return 0
