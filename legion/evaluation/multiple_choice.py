"""``legion eval``: multiple-choice accuracy of every strategy against every single agent.

Each item (``{"id", "context", "choices", "answer"}``, one JSON object a line) is scored by
log-likelihood: every agent scores every choice in its own view of the item (``legion.engine.views``:
its ``role_prompt``, ``few_shot`` exemplars drawn from the training split, ``prompt_form`` and
``scoring`` rule). The engine evaluates an agent's fixed prefix once (its prefix cache) and an
item's context once for all its choices. An agent alone answers with its best-scored choice
(``single:<agent>``); the strategies arbitrate between the agents exactly as they do for
``/v1/tasks``, over the same candidates and option scores. Trust weights learn online from the
ground truth: each item is decided with the weights the earlier items left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legion.agent import member_prefix
from legion.arbitration import adaptive as adaptive_rule
from legion.arbitration.adaptation import Adaptation, Settings
from legion.arbitration.strategies import OptionScores, build_strategy, strategy_names
from legion.arbitration.strategies.base import choice_candidates
from legion.arbitration.strategies.learned import Learned
from legion.arbitration.trust import agreement_losses, hedge_update
from legion.config import AgentConfig, LegionConfig, load_config
from legion.engine import views
from legion.engine.views import Item, load_items
from legion.errors import InvalidRequest
from legion.messages import Candidate
from legion.profile import check_agents, load_profile

log = logging.getLogger(__name__)

# Strategies that call the agents again for free text have no meaning on scored choices.
GENERATIVE_ONLY = ("debate", "decompose")
PRIOR_CONTEXT = "Answer:"  # the question-free prompt whose likelihoods calibrate (PMI)


@dataclass
class _Result:
    correct: int = 0
    n: int = 0
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "accuracy": round(self.correct / self.n, 4) if self.n else 0.0,
            "n": self.n,
            "seconds": round(self.seconds, 2),
        }


class ScoreCache:
    """Scored choices kept in a JSONL file, keyed by model, prompt and choices, with the
    seconds the scoring took when it ran: re-running ``legion eval`` with other strategies
    or strategy settings reuses them (and reports the scoring time as first measured)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._rows[row["key"]] = row
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by an interrupted run: scored again
        self._out = self.path.open("a", encoding="utf-8")

    @staticmethod
    def key(model: str, context: str, continuations: Sequence[str]) -> str:
        h = hashlib.sha256()
        for part in (model, context, *continuations):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self._rows.get(key)

    def put(self, key: str, logprob: list[float], n_tokens: list[int], seconds: float) -> None:
        row = {"key": key, "logprob": logprob, "n_tokens": n_tokens, "seconds": seconds}
        self._rows[key] = row
        self._out.write(json.dumps(row) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.close()


@dataclass
class _Scored:
    """One scoring call's result: log-likelihood and token count of each continuation."""

    logprob: list[float]
    n_tokens: list[int]
    seconds: float  # its share of the time (the cached figure when it came from --scores)
    fresh: bool = False  # scored by the engine in this run


@dataclass
class AgentPass:
    """What one agent's pass over the items measured."""

    agent: str
    items: int
    calls: int  # scoring calls sent to the engine (cache hits excluded)
    seconds: float  # scoring seconds of its items (cached figures for cache hits)
    jobs: list[tuple[str, list[str]]] = field(default_factory=list)  # (context, continuations) per call

    @property
    def s_per_item(self) -> float:
        return self.seconds / self.items if self.items else 0.0


def _n_ctx_for(texts: Sequence[str], floor: int) -> int:
    # A context window for the longest scored text before any tokenizer is loaded: at most
    # one token per two characters (English runs about four), rounded up to 256. Smaller
    # windows make every copy of a KV stream cheaper (llama.cpp copies whole streams).
    longest = max((len(t) for t in texts), default=0) // 2 + 16
    return max(floor, -(-longest // 256) * 256)


class Scorer:
    """Scores items for every agent: one in-process engine per distinct model (loaded on
    first use, so a run served entirely from the cache loads none).

    Each agent's view of an item (``legion.engine.views``: its exemplars, prompt form and scoring
    rule) becomes one scoring call, plus one for the reference its rule divides by (PMI's
    premise, or calibration's content-free prompt). The calls go item by item, every agent's
    in turn, and are kept ``window`` deep in the engine's queue, so the engine never waits for
    the next one; each agent's fixed prefix is evaluated once (the engine's prefix cache keeps
    it, one cache stream per agent). Each call is charged the time from the previous call's
    end to its own, which adds up to the wall time and splits it fairly between the agents.
    """

    def __init__(
        self,
        agents: Sequence[AgentConfig],
        shots: Sequence[Item] | None = None,
        *,
        n_threads: int = 2,
        cache: ScoreCache | None = None,
        prior: bool = False,
        window: int = 8,
    ):
        self.agents = list(agents)
        # Each member's role prompt and exemplars: drawn from ``shots`` when given, else from the
        # member's own pool, exactly as a serving agent draws them (legion.agent.member_prefix).
        self.prefixes = {a.name: member_prefix(a, shots) for a in self.agents}
        self.n_threads = n_threads
        self.cache = cache
        self.prior = prior
        self.window = window
        self.engines: dict[str, Any] = {}
        self.passes: dict[str, AgentPass] = {}
        self._packaged: dict[str, str] = {}
        self._n_ctx = 2048
        self._memo: dict[str, _Scored] = {}

    # ------------------------------------------------------------------ calls
    def _model(self, a: AgentConfig) -> str:
        # Resolved once: locating the bundled model checks its files (half a second).
        if a.model_path:
            return a.model_path
        if a.model not in self._packaged:
            from legion.engine.llama import packaged_model_path

            self._packaged[a.model] = packaged_model_path(a.model)
        return self._packaged[a.model]

    def _engine(self, path: str):
        from legion.engine.llama import LlamaEngine

        if path not in self.engines:
            # A cache stream for every agent's prefix: the agents' calls alternate item by item.
            slots = min(32, 1 + sum(1 for a in self.agents if self._model(a) == path))
            eng = LlamaEngine(path, n_ctx=self._n_ctx, n_threads=self.n_threads, prefix_cache_slots=slots)
            eng.score("Warm-up:", [" one", " two"])  # first-call costs (page faults) stay out of the timing
            self.engines[path] = eng
        return self.engines[path]

    def models(self) -> dict[str, dict[str, Any]]:
        """Each agent's model as llama.cpp describes it (only its file name when every score
        came from the score cache and the model never loaded)."""
        out = {}
        for a in self.agents:
            eng = self.engines.get(self._model(a))
            out[a.name] = eng.describe().model_dump() if eng else {"file": Path(self._model(a)).name}
        return out

    def calls(self, a: AgentConfig, item: Item) -> list[tuple[str, list[str]]]:
        """The scoring calls of agent ``a`` on ``item``: its view, then the reference if its
        rule needs one (``legion.engine.views.view_calls``, as a serving agent makes them)."""
        return views.view_calls(a, self.prefixes[a.name], item)

    def _run(
        self,
        path: str,
        calls: Sequence[tuple[str, list[str]]],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[_Scored]:
        """Score ``calls`` with the model at ``path``, keeping ``window`` of them in flight;
        the results in order."""
        out: list[_Scored | None] = [None] * len(calls)
        todo: list[tuple[int, str]] = []
        queued: set[str] = set()
        for i, (ctx, conts) in enumerate(calls):
            key = ScoreCache.key(path, ctx, conts)
            if key in self._memo:  # scored earlier in this run: costs nothing now
                out[i] = dataclasses.replace(self._memo[key], seconds=0.0, fresh=False)
            elif self.cache is not None and (row := self.cache.get(key)) is not None:
                out[i] = self._memo[key] = _Scored(row["logprob"], row["n_tokens"], row["seconds"])
            elif key not in queued:
                queued.add(key)
                todo.append((i, key))
        if todo:
            eng = self._engine(path)
            pending: deque[tuple[int, str, Any]] = deque()
            nxt = 0
            last = time.perf_counter()
            while nxt < len(todo) or pending:
                while nxt < len(todo) and len(pending) < self.window:
                    i, key = todo[nxt]
                    ctx, conts = calls[i]
                    pending.append((i, key, eng.submit_score(ctx, conts)))
                    nxt += 1
                i, key, fut = pending.popleft()
                res = fut.result()
                now = time.perf_counter()
                # Calls overlap in the queue: each is charged the time since the previous one
                # finished, so the charges add up to the wall time.
                got = _Scored([r.logprob for r in res], [r.n_tokens for r in res], now - last, fresh=True)
                last = now
                if progress is not None:
                    progress(i + 1, len(calls))
                out[i] = got
                self._memo[key] = got
                if self.cache is not None:
                    self.cache.put(key, got.logprob, got.n_tokens, got.seconds)
        for i, (ctx, conts) in enumerate(calls):
            if out[i] is None:  # a repeat of a call scored above
                out[i] = dataclasses.replace(
                    self._memo[ScoreCache.key(path, ctx, conts)], seconds=0.0, fresh=False
                )
        return [x for x in out if x is not None]

    # ------------------------------------------------------------------ passes
    def score_items(
        self, items: Sequence[Item], progress: Callable[[int, int], None] | None = None
    ) -> list[tuple[OptionScores, dict[str, float], float]]:
        """For every item: the option scores of every agent (each agent's scores under its own
        rule, see ``legion.engine.views.apply_rule``), each agent's seconds, the prior's
        seconds."""
        texts = [
            ctx + max(conts, key=len) for a in self.agents for it in items for ctx, conts in self.calls(a, it)
        ]
        self._n_ctx = _n_ctx_for(texts, 512)
        per_item: list[OptionScores] = []
        for it in items:
            conts = [" " + c for c in it.choices]
            per_item.append(
                OptionScores(
                    options=[str(i) for i in range(len(it.choices))],
                    texts=list(it.choices),
                    n_bytes=[len(c.encode("utf-8")) for c in conts],
                    rule_applied=True,
                )
            )
        agent_s: list[dict[str, float]] = [{} for _ in items]
        calls = {a.name: [self.calls(a, it) for it in items] for a in self.agents}
        sent = dict.fromkeys(calls, 0)
        for path in dict.fromkeys(self._model(a) for a in self.agents):
            mine = [a for a in self.agents if self._model(a) == path]
            # Item by item, every agent's calls in turn: a slow spell of a shared machine then
            # costs every agent alike, and the per-agent times compare fairly.
            owners = [
                (a, j, k) for j in range(len(items)) for a in mine for k in range(len(calls[a.name][j]))
            ]
            flat = [calls[a.name][j][k] for a, j, k in owners]
            done = self._run(path, flat, progress)
            got: dict[tuple[str, int], list[_Scored]] = {}
            for (a, j, _), res in zip(owners, done, strict=True):
                got.setdefault((a.name, j), []).append(res)
                sent[a.name] += int(res.fresh)
            for a in mine:
                for j, cs in enumerate(calls[a.name]):
                    main, *rest = got[(a.name, j)]
                    per_item[j].loglik[a.name] = views.view_scores(
                        a.scoring, cs, [main.logprob, *(r.logprob for r in rest)], main.n_tokens
                    )
                    per_item[j].n_tokens[a.name] = main.n_tokens
                    agent_s[j][a.name] = main.seconds + sum(r.seconds for r in rest)
        for a in self.agents:
            spent = sum(row[a.name] for row in agent_s)
            flat = [c for cs in calls[a.name] for c in cs]
            self.passes[a.name] = AgentPass(a.name, len(items), sent[a.name], spent, flat)
            log.info(
                "agent %s: %d items, %d scoring calls, %.2fs of scoring (%.3fs per item)",
                a.name,
                len(items),
                sent[a.name],
                spent,
                spent / max(1, len(items)),
            )
        for path, eng in self.engines.items():
            log.info("prefix cache of %s: %s", Path(path).name, eng.stats()["prefix_cache"])
        prior_s = [0.0] * len(items)
        if self.prior:
            # The question-free prior of each choice's text, once per model (the equilibrium's
            # PMI discriminator divides by it).
            for path in dict.fromkeys(self._model(a) for a in self.agents):
                prior_calls = [(PRIOR_CONTEXT, [" " + c for c in it.choices]) for it in items]
                done = self._run(path, prior_calls)
                for j, got in enumerate(done):
                    prior_s[j] += got.seconds
                    for a in self.agents:
                        if self._model(a) == path:
                            per_item[j].prior[a.name] = got.logprob
        return [(per_item[j], agent_s[j], prior_s[j]) for j in range(len(items))]

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        self.engines.clear()
        if self.cache is not None:
            self.cache.close()


class PlainScorer:
    """The baseline ``legion eval`` is measured against: llama-cpp-python's ``Llama``, one
    continuation at a time, nothing shared between calls (a fresh context for every choice,
    the way a simple harness scores): the context in one ``eval``, then the continuation's
    tokens one ``eval`` each, reading each next token's logits."""

    def __init__(self, model_path: str, n_ctx: int, n_threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=512,
            verbose=False,
        )

    def score(self, context: str, continuations: Sequence[str]) -> list[float]:
        import llama_cpp
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()
        ctx = llm.tokenize(context.encode("utf-8"), add_bos=True, special=False)
        out = []
        for c in continuations:
            full = llm.tokenize((context + c).encode("utf-8"), add_bos=True, special=False)
            start = max(1, min(_common(ctx, full), len(full) - 1))
            llm.reset()
            llm.eval(full[:start])
            lp = 0.0
            for pos in range(start, len(full)):
                # Without logits_all, Llama.scores is never filled: read the last token's logits.
                last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                row = np.ctypeslib.as_array(last, shape=(n_vocab,)).astype(np.float64)
                m = row.max()
                lp += float(row[full[pos]] - m - np.log(np.exp(row - m).sum()))
                if pos + 1 < len(full):
                    llm.eval([full[pos]])
            out.append(lp)
        return out

    def close(self) -> None:
        self.llm.close()


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plain_baseline(scorer: Scorer, n_items: int, items_total: int) -> dict[str, float]:
    """Seconds per item of ``PlainScorer`` on the first ``n_items`` items' calls of every
    agent (exactly the texts the agent's pass scored), item by item, agents in turn."""
    per: dict[str, int] = {}
    for a in scorer.agents:
        p = scorer.passes.get(a.name)
        if p is not None and p.jobs and p.calls:  # else its scores came from --scores
            per[a.name] = len(p.jobs) // max(1, items_total)
    spent = dict.fromkeys(per, 0.0)
    plains: dict[str, PlainScorer] = {}
    try:
        for a in scorer.agents:
            path = scorer._model(a)
            if a.name in per and path not in plains:
                plains[path] = PlainScorer(path, scorer._n_ctx, scorer.n_threads)
                plains[path].score("Warm-up:", [" one"])
        for j in range(n_items):
            for a in scorer.agents:
                if a.name not in per:
                    continue
                k = per[a.name]
                plain = plains[scorer._model(a)]
                t0 = time.perf_counter()
                for ctx, conts in scorer.passes[a.name].jobs[j * k : (j + 1) * k]:
                    plain.score(ctx, conts)
                spent[a.name] += time.perf_counter() - t0
    finally:
        for pl in plains.values():
            pl.close()
    return {name: t / max(1, n_items) for name, t in spent.items()}


def candidates_from(scores: OptionScores, agents: Sequence[AgentConfig]) -> list[Candidate]:
    """Each agent's answer: its best-scored choice (as the Arbiter reads a task's choices)."""
    return choice_candidates(scores, {a.name: a.role for a in agents})


def check_strategies(names: Sequence[str], profile: bool = True) -> list[str]:
    """The strategies to run, each known and meaningful on scored choices (``learned`` only
    with a ``profile``)."""
    known = strategy_names()
    runnable = [s for s in known if s not in GENERATIVE_ONLY]
    for s in names:
        if s not in known:
            raise InvalidRequest(f"unknown strategy {s!r}; legion eval runs: {', '.join(runnable)}")
        if s == "learned" and not profile:
            raise InvalidRequest("strategy 'learned' needs a profile: pass --profile (from legion calibrate)")
        if s in GENERATIVE_ONLY:
            raise InvalidRequest(
                f"strategy {s!r} needs agents that write free text; legion eval scores fixed "
                f"choices and runs: {', '.join(runnable)}"
            )
    return list(dict.fromkeys(names))


def default_strategies(profile: bool = False) -> list[str]:
    """Every strategy that decides over scored choices (``learned`` only with a profile)."""
    return [s for s in strategy_names() if s not in GENERATIVE_ONLY and (profile or s != "learned")]


def evaluate(
    cfg: LegionConfig,
    items: Sequence[Item],
    strategies: Sequence[str],
    *,
    shots: Sequence[Item] | None = None,
    agents: Sequence[str] | None = None,
    n_threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
    scorer: Any = None,
    cache: ScoreCache | None = None,
    curve: dict[int, dict[str, float]] | None = None,
    report: dict[str, Any] | None = None,
    baseline_items: int = 0,
    fanout: str = "all",
    adapt: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy, item count and seconds of every strategy and of ``single:<agent>`` for each
    agent (restricted to ``agents`` when given), on the same items in order.

    When ``curve`` is a dict it is filled with ``{k: {strategy: accuracy, "best_single": ...}}``
    for the first ``k`` agents, k = 1 .. all (from the same scores; no extra model time).
    When ``report`` is a dict it gets the agents' pairwise agreement, the share of items some
    agent gets right (``oracle``), and the timing of each agent's pass (``timing``, with each
    few-shot agent's cost against a zero-shot one and, for ``baseline_items`` > 0, against the
    plain one-at-a-time scorer on that many items).

    With ``fanout="adaptive"`` every strategy also gets a ``<strategy>@adaptive`` row: the same
    items decided by adaptive fan-out (``legion.arbitration.adaptive``, with the config's
    ``adaptive_*`` settings) replayed over the members' scores, with the mean members asked, their
    share of the panel's calls and of its scoring seconds, and how often it decides as the full panel.

    With ``adapt="agreement"`` (default: the config's ``arbiter.adapt``) and a profile, a
    ``learned@adapted`` row: each item decided by ``learned`` over the profile as adapted online
    from the picks of the items before it (``legion.arbitration.adaptation``, no labels), as served.
    """
    chosen = [a for a in cfg.panel if agents is None or a.name in agents]
    if not chosen:
        raise InvalidRequest(
            f"no panel member named {', '.join(agents or [])}; configured: {[a.name for a in cfg.panel]}"
        )
    names = check_strategies(strategies, profile=cfg.arbiter.profile is not None)
    own = scorer is None
    if scorer is None:
        prior = cfg.arbiter.equilibrium_discriminator == "pmi"
        scorer = Scorer(chosen, shots, n_threads=n_threads, cache=cache, prior=prior)
    runners = {s: build_strategy(s, cfg.arbiter) for s in names}
    results = {f"single:{a.name}": _Result() for a in chosen} | {s: _Result() for s in names}
    sizes = list(range(1, len(chosen))) if curve is not None else []
    sub_results = {k: {s: _Result() for s in names} for k in sizes}
    # As served: each strategy keeps its own trust weights, which start equal and take one Hedge
    # step per item towards the members that agreed with its decision (no labels: a server has
    # none); a tie goes to the members' standing, the profile's weights or else those trust weights.
    trust = {(k, s): {a.name: 1.0 for a in chosen[:k]} for k in [*sizes, len(chosen)] for s in names}
    profiled = load_profile(cfg.arbiter.profile).weights if cfg.arbiter.profile else None
    decisions: dict[str, list[str]] = {s: [] for s in names}
    adaptive = _AdaptiveReplay(cfg, chosen, names) if fanout == "adaptive" else None
    adapted = _AdaptedReplay(cfg, chosen) if (adapt or cfg.arbiter.adapt) != "off" else None
    solver_s = 0.0
    wall_s = 0.0
    picks: dict[str, list[int]] = {a.name: [] for a in chosen}
    try:
        scored = scorer.score_items(items, progress)
        if report is not None and isinstance(scorer, Scorer):
            report["models"] = scorer.models()
        if report is not None and baseline_items > 0 and isinstance(scorer, Scorer):
            n = min(baseline_items, len(items))
            report["plain_s_per_item"] = plain_baseline(scorer, n, len(items))
            report["baseline_items"] = n
    finally:
        if own:
            scorer.close()
    for item, (scores, agent_s, prior_s) in zip(items, scored, strict=True):
        all_s = sum(agent_s.values()) + prior_s
        cands = candidates_from(scores, chosen)
        truth = str(item.answer)
        for a, c in zip(chosen, cands, strict=True):
            r = results[f"single:{a.name}"]
            r.n += 1
            r.correct += int(c.normalized == truth)
            r.seconds += agent_s[a.name]
            picks[a.name].append(int(c.normalized))
        for s, strat in runners.items():
            t0 = time.perf_counter()
            d = _decide(strat, cands, scores, trust, (len(chosen), s), profiled, cfg)
            took = time.perf_counter() - t0
            decisions[s].append(d.answer_key)
            r = results[s]
            r.n += 1
            r.correct += int(d.answer_key == truth)
            r.seconds += all_s + took
            if s == "equilibrium":
                solver_s += d.details.get("solver_ms", 0.0) / 1000
                wall_s += all_s + took
            if adaptive is not None:
                adaptive.item(s, strat, cands, scores, agent_s, truth, d.answer_key, profiled)
        if adapted is not None:
            adapted.item(cands, scores, truth, all_s, decisions.get("learned", [None])[-1])
        for k in sizes:
            sub = _restrict(scores, chosen[:k])
            for s, strat in runners.items():
                d = _decide(strat, cands[:k], sub, trust, (k, s), profiled, cfg)
                sub_results[k][s].n += 1
                sub_results[k][s].correct += int(d.answer_key == truth)
    if wall_s > 0:
        log.info(
            "equilibrium solver: %.2f ms per item, %.2f%% of the item's wall time",
            1000 * solver_s / len(items),
            100 * solver_s / wall_s,
        )
    out = {k: r.row() for k, r in results.items()}
    if adaptive is not None:
        out |= adaptive.rows()
    if adapted is not None:
        out |= adapted.rows()
    if wall_s > 0:
        out["equilibrium"]["solver_share"] = round(solver_s / wall_s, 5)
    if curve is not None:
        singles = [out[f"single:{a.name}"]["accuracy"] for a in chosen]
        for k in sizes:
            curve[k] = {s: r.row()["accuracy"] for s, r in sub_results[k].items()}
            curve[k]["best_single"] = max(singles[:k])
        curve[len(chosen)] = {s: out[s]["accuracy"] for s in names} | {"best_single": max(singles)}
    if report is not None:
        both = decisions | ({f"{s}@adaptive": ks for s, ks in adaptive.decisions.items()} if adaptive else {})
        report["decisions"] = {s: [int(k) if k else None for k in ks] for s, ks in both.items()}
        n = report.get("baseline_items", 0)
        first = (
            {a.name: sum(agent_s[a.name] for _, agent_s, _ in scored[:n]) / n for a in chosen} if n else {}
        )
        truth_all = [it.answer for it in items]
        report["agreement"] = agreement(picks)
        report["oracle"] = round(
            sum(any(picks[a][j] == t for a in picks) for j, t in enumerate(truth_all)) / len(items), 4
        )
        if isinstance(scorer, Scorer):
            report["timing"] = timing(chosen, scorer.passes, report.get("plain_s_per_item"), first)
    return out


def _decide(
    strat: Any,
    cands: Sequence[Candidate],
    scores: OptionScores,
    trust: dict[tuple[int, str], dict[str, float]],
    at: tuple[int, str],
    profiled: dict[str, float] | None,
    cfg: LegionConfig,
) -> Any:
    """``strat``'s decision over one item as the Arbiter makes it (``Arbiter._choose``): with the
    trust weights of this strategy and panel size, ties to the members' standing; then the trust
    step the Arbiter takes after a task."""
    w = trust[at]
    standing = profiled if profiled is not None else w
    ranked = [c.model_copy(update={"weight": standing.get(c.agent)}) for c in cands]
    d = strat.decide(ranked, w if getattr(strat, "uses_trust", False) else None, scores)
    if d.answer_key:
        losses = agreement_losses({c.agent: c.normalized for c in cands}, d.answer_key)
        trust[at] = hedge_update(w, losses, cfg.arbiter.trust_eta, cfg.arbiter.trust_floor)
    return d


class _AdaptiveReplay:
    """Adaptive fan-out replayed over scores already at hand: for each item and strategy, the
    members in the Arbiter's order, the strategy's decision over those asked so far, the stop."""

    def __init__(self, cfg: LegionConfig, chosen: Sequence[AgentConfig], names: Sequence[str]):
        a = cfg.arbiter
        self.cfg = cfg
        self.limit = a.adaptive_risk
        self.profile = load_profile(a.profile) if a.profile is not None else None
        self.rules = {s: adaptive_rule.stop_rule(s, chosen, self.profile, None, choices=True) for s in names}
        self.plans = {s: r.plan(a.adaptive_first_wave, a.adaptive_wave) for s, r in self.rules.items()}
        self.n_members = len(chosen)
        members = [m.name for m in chosen]
        self.trust = {("adaptive", s): dict.fromkeys(members, 1.0) for s in names}
        self.stats = {
            s: {"n": 0, "correct": 0, "asked": 0, "same": 0, "seconds": 0.0, "all_s": 0.0, "risk": 0.0}
            for s in names
        }
        self.decisions: dict[str, list[str | None]] = {s: [] for s in names}  # per item, as served

    def item(self, s, strat, cands, scores, agent_s, truth, full_key, profiled) -> None:
        by_name = {c.agent: c for c in cands}
        rule = self.rules[s]
        w = self.trust[("adaptive", s)] if getattr(strat, "uses_trust", False) else None

        def look(asked: list[str], remaining: list[str]) -> adaptive_rule.Settlement:
            sub = _restrict_names(scores, asked)
            votes = {m: (by_name[m].normalized if by_name[m].ok else None) for m in asked}

            def decide() -> str | None:
                return strat.decide([by_name[m] for m in asked], w, sub).answer_key or None

            return rule.look_choices(sub, votes, decide, remaining)

        asked, stop = adaptive_rule.run_waves(self.plans[s], look, self.limit)
        # The decision as the Arbiter makes it at the stop, with this replay's own trust step.
        d = _decide(
            strat,
            [by_name[m] for m in asked],
            _restrict_names(scores, asked),
            self.trust,
            ("adaptive", s),
            profiled,
            self.cfg,
        )
        self.decisions[s].append(d.answer_key)
        st = self.stats[s]
        st["n"] += 1
        st["correct"] += int(d.answer_key == truth)
        st["same"] += int(d.answer_key == full_key)
        st["asked"] += len(asked)
        st["seconds"] += sum(agent_s[m] for m in asked)
        st["all_s"] += sum(agent_s.values())
        st["risk"] += stop.risk

    def rows(self) -> dict[str, dict[str, Any]]:
        out = {}
        for s, st in self.stats.items():
            n = max(1, st["n"])
            out[f"{s}@adaptive"] = {
                "accuracy": round(st["correct"] / n, 4),
                "n": st["n"],
                "seconds": round(st["seconds"], 2),
                "agents_asked": round(st["asked"] / n, 3),
                "calls_share": round(st["asked"] / (n * self.n_members), 4),
                "seconds_share": round(st["seconds"] / st["all_s"], 4) if st["all_s"] else None,
                "same_as_full": round(st["same"] / n, 4),
                "mean_risk_at_stop": round(st["risk"] / n, 4),
                "order": self.rules[s].order,
                "skill_source": self.rules[s].skill_source,
            }
        return out


class _AdaptedReplay:
    """``learned`` over the profile adapted online (``arbiter.adapt: agreement``), replayed in item
    order: each item is decided with the factors learned from the items before it, then its picks
    are recorded, as the Arbiter records a task's picks after deciding it."""

    def __init__(self, cfg: LegionConfig, chosen: Sequence[AgentConfig]):
        a = cfg.arbiter
        if a.profile is None:
            raise InvalidRequest("adapt: agreement adapts a profile; give --profile or a config with one")
        self.profile = load_profile(a.profile)
        owner = {m.name: ag.name for ag in cfg.agents for m in ag.members()}
        if len({owner[m.name] for m in chosen}) < 2:
            raise InvalidRequest(
                "adapt: agreement learns from agreement across agents: evaluate at least two"
            )
        settings = Settings(a.adapt_window, a.adapt_min_items, a.adapt_every, a.adapt_bound)
        self.adaptation = Adaptation(self.profile, owner, settings)
        self.stats = {"n": 0, "correct": 0, "same": 0, "seconds": 0.0}

    def item(self, cands, scores, truth, seconds, full_key) -> None:
        strat = Learned(self.adaptation.adapt(self.profile), "adapted")
        d = strat.decide(list(cands), None, scores)
        st = self.stats
        st["n"] += 1
        st["correct"] += int(d.answer_key == truth)
        st["same"] += int(full_key is not None and d.answer_key == full_key)
        st["seconds"] += seconds
        picks = {c.agent: int(c.normalized) for c in cands if c.ok and c.normalized}
        self.adaptation.record(picks, len(scores.options))

    def rows(self) -> dict[str, dict[str, Any]]:
        st = self.stats
        n = max(1, st["n"])
        state = self.adaptation.state()
        return {
            "learned@adapted": {
                "accuracy": round(st["correct"] / n, 4),
                "n": st["n"],
                "seconds": round(st["seconds"], 2),
                "same_as_full": round(st["same"] / n, 4),
                "refits": state.refits,
                "factors": {m: round(f, 4) for m, f in self.adaptation.factors().items()},
            }
        }


def _restrict_names(scores: OptionScores, names: Sequence[str]) -> OptionScores:
    keep = set(names)
    return OptionScores(
        options=scores.options,
        texts=scores.texts,
        loglik={a: v for a, v in scores.loglik.items() if a in keep},
        prior={a: v for a, v in scores.prior.items() if a in keep},
        n_tokens={a: v for a, v in scores.n_tokens.items() if a in keep},
        n_bytes=scores.n_bytes,
        rule_applied=scores.rule_applied,
    )


def agreement(picks: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Share of items on which each pair of agents picks the same choice."""
    names = list(picks)
    return {
        a: {
            b: round(sum(x == y for x, y in zip(picks[a], picks[b], strict=True)) / len(picks[a]), 4)
            for b in names
        }
        for a in names
    }


def _same(a: Sequence[int], b: Sequence[int]) -> float:
    return round(sum(x == y for x, y in zip(a, b, strict=True)) / len(a), 4)


def timing(
    agents: Sequence[AgentConfig],
    passes: dict[str, AgentPass],
    plain: dict[str, float] | None = None,
    eval_on_plain_items: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Seconds per item of every agent's pass; each few-shot agent's cost against the zero-shot
    agent of the same form and rule (or the first zero-shot agent); the plain scorer's seconds
    per item and ``legion eval``'s on the same items (``eval_on_plain_items``), and their ratio
    (below 1: ``legion eval`` is faster)."""
    rows: dict[str, Any] = {}
    zero = [a for a in agents if not a.few_shot and a.name in passes]
    for a in agents:
        p = passes.get(a.name)
        if p is None:
            continue
        row: dict[str, Any] = {
            "s_per_item": round(p.s_per_item, 4),
            "calls": p.calls,
        }
        if a.few_shot:
            ref = next(
                (z for z in zero if (z.prompt_form, z.scoring) == (a.prompt_form, a.scoring)),
                zero[0] if zero else None,
            )
            if ref is not None and passes[ref.name].s_per_item > 0:
                row["vs_zero_shot"] = round(p.s_per_item / passes[ref.name].s_per_item, 3)
                row["zero_shot_agent"] = ref.name
        mine = (eval_on_plain_items or {}).get(a.name)
        if plain and plain.get(a.name, 0) > 0 and mine is not None:
            row["plain_s_per_item"] = round(plain[a.name], 4)
            row["eval_s_per_item_same_items"] = round(mine, 4)
            row["vs_plain"] = round(mine / plain[a.name], 3)
        rows[a.name] = row
    out: dict[str, Any] = {"agents": rows}
    measured = [n for n, r in rows.items() if "vs_plain" in r]
    if measured:
        eval_s = sum(rows[n]["eval_s_per_item_same_items"] for n in measured)
        out["eval_vs_plain_per_agent"] = round(eval_s / sum(plain[n] for n in measured), 3)
    few = [r["vs_zero_shot"] for r in rows.values() if "vs_zero_shot" in r]
    if few:
        out["few_shot_vs_zero_shot_max"] = max(few)
    return out


def _restrict(scores: OptionScores, agents: Sequence[AgentConfig]) -> OptionScores:
    return _restrict_names(scores, [a.name for a in agents])


def plot_svg(curve: dict[int, dict[str, float]], title: str) -> str:
    """A line chart (SVG text) of accuracy against the number of agents, one line per strategy."""
    width, height, left, right, top, bottom = 640, 400, 60, 170, 40, 50
    ks = sorted(curve)
    series = sorted({s for row in curve.values() for s in row})
    values = [v for row in curve.values() for v in row.values()]
    lo = math.floor(min(values) * 20) / 20
    hi = math.ceil(max(values) * 20) / 20
    hi = hi if hi > lo else lo + 0.05

    def x(k: int) -> float:
        return left + (width - left - right) * ((k - ks[0]) / max(1, ks[-1] - ks[0]))

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{y(lo)}" x2="{width - right}" y2="{y(lo)}" stroke="black"/>',
        f'<line x1="{left}" y1="{y(lo)}" x2="{left}" y2="{y(hi)}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">'
        "number of agents</text>",
        f'<text x="15" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 15 {(top + height - bottom) / 2})">accuracy</text>',
    ]
    steps = round((hi - lo) / 0.05)
    for i in range(steps + 1):
        v = lo + i * 0.05
        parts.append(
            f'<line x1="{left - 4}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#ddd"/>'
        )
        parts.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for k in ks:
        parts.append(f'<text x="{x(k):.1f}" y="{y(lo) + 18:.1f}" text-anchor="middle">{k}</text>')
    for j, s in enumerate(series):
        color = "black" if s == "best_single" else colors[j % len(colors)]
        dash = ' stroke-dasharray="6 4"' if s == "best_single" else ""
        pts = " ".join(f"{x(k):.1f},{y(curve[k][s]):.1f}" for k in ks if s in curve[k])
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for k in ks:
            if s in curve[k]:
                parts.append(f'<circle cx="{x(k):.1f}" cy="{y(curve[k][s]):.1f}" r="3" fill="{color}"/>')
        ly = top + 16 * j
        parts.append(
            f'<line x1="{width - right + 10}" y1="{ly}" x2="{width - right + 30}" y2="{ly}" stroke="{color}" '
            f'stroke-width="2"{dash}/>'
        )
        label = "best single agent" if s == "best_single" else s
        parts.append(f'<text x="{width - right + 36}" y="{ly + 4}">{_esc(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def print_progress(done: int, total: int) -> None:
    width = 30
    filled = math.floor(width * done / total)
    sys.stderr.write(f"\r[eval] [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_eval_cli(args: Any) -> int:
    """``legion eval``: print the table (or JSON) and optionally write it to ``--out``."""
    import pandas as pd

    cfg = load_config(args.config)
    if getattr(args, "adaptive_risk", None) is not None:
        cfg = cfg.model_copy(
            update={
                "arbiter": cfg.arbiter.model_validate(
                    {**cfg.arbiter.model_dump(), "adaptive_risk": args.adaptive_risk}
                )
            }
        )
    items = load_items(args.data, args.limit)
    agents = [a.strip() for a in args.agents.split(",")] if getattr(args, "agents", None) else None
    # Without --profile, the config's own (the shipped one with the default line-up): legion eval
    # then decides as legion serve does.
    profile_path = getattr(args, "profile", None) or cfg.arbiter.profile
    if profile_path:
        # The profile must be fitted for exactly the agents evaluated, each in the same view.
        chosen = [a for a in cfg.panel if agents is None or a.name in agents]
        check_agents(load_profile(profile_path), chosen, f"profile {profile_path}")
        arbiter = cfg.arbiter.model_copy(update={"profile": str(profile_path)})
        cfg = cfg.model_copy(update={"arbiter": arbiter})
    strategies = (
        [s.strip() for s in args.strategies.split(",") if s.strip()]
        if args.strategies
        else default_strategies(profile=bool(profile_path))
    )
    check_strategies(strategies, profile=bool(profile_path))
    # Exemplars from --shots, else each member's own pool (its shots file or the shipped ARC-Easy
    # train split), as the served agents draw them.
    shots_path = Path(args.shots) if args.shots else None
    shots = load_items(shots_path) if shots_path is not None else None
    if any(a.few_shot for a in cfg.panel):
        log.info("few-shot exemplars from %s", shots_path or "each member's own pool")
    curve: dict[int, dict[str, float]] | None = {} if getattr(args, "plot", None) else None
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    res = evaluate(
        cfg,
        items,
        strategies,
        shots=shots,
        agents=agents,
        n_threads=args.threads,
        progress=print_progress if sys.stderr.isatty() else None,
        cache=ScoreCache(args.scores) if getattr(args, "scores", None) else None,
        curve=curve,
        report=report,
        baseline_items=getattr(args, "baseline_items", 0) or 0,
        fanout=getattr(args, "fanout", None) or "all",
        adapt=getattr(args, "adapt", None),
    )
    log.info("evaluated %d items in %.1fs", len(items), time.perf_counter() - t0)
    if curve is not None:
        Path(args.plot).write_text(plot_svg(curve, f"{Path(args.data).name}: accuracy vs number of agents"))
        log.info("accuracy by number of agents: %s", json.dumps(curve))
    extra = ("agents_asked", "calls_share", "seconds_share", "same_as_full")
    table = {
        k: {"accuracy": v["accuracy"], "n": v["n"], "seconds": v["seconds"]}
        | {x: v[x] for x in extra if x in v}
        for k, v in res.items()
    }
    if args.out:
        meta = {
            "data": str(args.data),
            "limit": args.limit,
            "threads": args.threads,
            "agents": [a.model_dump(mode="json") for a in cfg.panel],
            "shots": str(shots_path) if shots_path else None,
            "profile": str(profile_path) if profile_path else None,
            **({"by_agents": curve} if curve is not None else {}),
        }
        Path(args.out).write_text(
            json.dumps({"results": res, "report": report, "meta": meta}, indent=2) + "\n"
        )
    lines = _report_lines(report)
    if args.json:
        for line in lines:
            log.info("%s", line)
        print(json.dumps(table))
        return 0
    df = pd.DataFrame([{"strategy": k, **v} for k, v in table.items()])
    print(df.to_string(index=False))
    if lines:
        print()
        print("\n".join(lines))
    return 0


def _report_lines(report: dict[str, Any]) -> list[str]:
    """The timing ratios and the agreement between agents, as printed under the table."""
    lines: list[str] = []
    models = report.get("models", {})
    if models:
        lines.append("models:")
        for name, m in models.items():
            about = f" ({m['description']}, {m['size_bytes'] / 2**20:.0f} MiB)" if "description" in m else ""
            lines.append(f"  {name}: {m['file']}{about}")
    t = report.get("timing", {})
    rows = t.get("agents", {})
    for name, r in rows.items():
        parts = [f"{name}: {r['s_per_item']:.3f} s/item"]
        if "vs_zero_shot" in r:
            parts.append(f"{r['vs_zero_shot']:.2f}x the zero-shot {r['zero_shot_agent']}")
        if "vs_plain" in r:
            parts.append(
                f"{r['vs_plain']:.2f}x the plain scorer ({r['eval_s_per_item_same_items']:.3f} vs "
                f"{r['plain_s_per_item']:.3f} s/item on the first {report.get('baseline_items')} items)"
            )
        lines.append("  " + ", ".join(parts))
    if rows:
        lines.insert(0, "cost per item:")
    if "few_shot_vs_zero_shot_max" in t:
        lines.append(
            f"few-shot agent cost / zero-shot agent cost (max): {t['few_shot_vs_zero_shot_max']:.3f}"
        )
    if "eval_vs_plain_per_agent" in t:
        lines.append(
            f"legion eval / plain one-at-a-time scorer, per agent: {t['eval_vs_plain_per_agent']:.3f}"
        )
    agree = report.get("agreement", {})
    if len(agree) > 1:
        names = list(agree)
        width = max(len(n) for n in names)
        lines.append("")
        lines.append("pairwise agreement (share of items with the same choice):")
        lines.append(" " * (width + 1) + " ".join(f"{n[:7]:>7}" for n in names))
        for a in names:
            lines.append(f"{a:<{width}} " + " ".join(f"{agree[a][b]:>7.3f}" for b in names))
        lines.append(f"some agent right (oracle): {report.get('oracle', 0):.4f}")
    return lines
