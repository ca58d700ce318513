"""``legion eval``: multiple-choice accuracy of every strategy against every single agent.

Each item (``{"id", "context", "choices", "answer"}``, one JSON object a line) is scored by
log-likelihood: every agent scores every choice after its own prompt variant (its
``role_prompt``, then ``few_shot`` exemplars drawn from the training split, then the item's
context), with the context's KV cells reused across choices. An agent alone answers with its
most likely choice (``single:<agent>``); the strategies arbitrate between the agents exactly
as they do for ``/v1/tasks``, over the same candidates and option scores. Trust weights learn
online from the ground truth: each item is decided with the weights the earlier items left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legion.config import AgentConfig, LegionConfig
from legion.errors import InvalidRequest
from legion.messages import Candidate
from legion.strategies import OptionScores, build_strategy, strategy_names
from legion.trust import hedge_update

log = logging.getLogger(__name__)

# Strategies that call the agents again for free text have no meaning on scored choices.
GENERATIVE_ONLY = ("debate", "decompose")
PRIOR_CONTEXT = "Answer:"  # the question-free prompt whose likelihoods calibrate (PMI)


@dataclass
class Item:
    """One multiple-choice item; the scored text of choice ``i`` is ``context + " " + choices[i]``."""

    id: str
    context: str
    choices: list[str]
    answer: int


def load_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """The items of a JSONL file in file order (the first ``limit``); a bad line raises
    ``InvalidRequest`` naming its line number and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise InvalidRequest(f"data file {p} does not exist")
    items: list[Item] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            items.append(_parse_item(line, lineno, p))
    if not items:
        raise InvalidRequest(f"{p} holds no items: one JSON object per line is expected")
    return items


def _parse_item(line: str, lineno: int, path: Path) -> Item:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise InvalidRequest(f"{where}: each line must be a JSON object")
    for key in ("context", "choices", "answer"):
        if key not in row:
            raise InvalidRequest(f"{where}: missing field {key!r} (need context, choices, answer)")
    context, choices, answer = row["context"], row["choices"], row["answer"]
    if not isinstance(context, str):
        raise InvalidRequest(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise InvalidRequest(f"{where}: 'choices' must be a list of at least two strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InvalidRequest(
            f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}), got {answer!r}"
        )
    return Item(id=str(row.get("id", lineno)), context=context, choices=choices, answer=answer)


def train_file_for(data: str | Path) -> Path | None:
    """The training split beside ``data`` (``x_dev.jsonl`` / ``x_test.jsonl`` -> ``x_train.jsonl``)."""
    p = Path(data)
    for split in ("_dev", "_test", "_validation", "_val"):
        if p.stem.endswith(split):
            cand = p.with_name(p.stem[: -len(split)] + "_train" + p.suffix)
            return cand if cand.is_file() else None
    return None


def exemplars(agent: AgentConfig, pool: Sequence[Item]) -> str:
    """The agent's few-shot block: ``few_shot`` training items drawn with a seed fixed by the
    agent's name, each written as its context and correct choice."""
    k = getattr(agent, "few_shot", 0)
    if not k or not pool:
        return ""
    rng = random.Random(zlib.crc32(agent.name.encode()))
    picked = rng.sample(list(pool), min(k, len(pool)))
    return "".join(f"{x.context} {x.choices[x.answer]}\n\n" for x in picked)


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
class Scorer:
    """Scores choices for every agent: one in-process engine per distinct model (loaded on
    first use, so a run served entirely from the cache loads none)."""

    agents: list[AgentConfig]
    prefixes: dict[str, str]
    engines: dict[str, Any] = field(default_factory=dict)
    cache: ScoreCache | None = None
    n_threads: int = 2
    _bundled: str | None = None

    @classmethod
    def load(
        cls,
        agents: list[AgentConfig],
        prefixes: dict[str, str],
        n_threads: int = 2,
        cache: ScoreCache | None = None,
    ) -> Scorer:
        return cls(agents, prefixes, cache=cache, n_threads=n_threads)

    def _engine(self, path: str, n_ctx: int):
        from legion.engine import LlamaEngine

        if path not in self.engines:
            self.engines[path] = LlamaEngine(path, n_ctx=max(n_ctx, 2048), n_threads=self.n_threads)
        return self.engines[path]

    def _model(self, a: AgentConfig) -> str:
        # Resolved once: locating the bundled model checks its files (half a second).
        if a.model_path:
            return a.model_path
        if self._bundled is None:
            from legion.engine import bundled_model_path

            self._bundled = bundled_model_path()
        return self._bundled

    def _score(self, a: AgentConfig, context: str, conts: list[str]) -> tuple[list[float], list[int], float]:
        path = self._model(a)
        key = ScoreCache.key(path, context, conts)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            return hit["logprob"], hit["n_tokens"], hit["seconds"]
        eng = self._engine(path, a.n_ctx)
        t0 = time.perf_counter()
        res = eng.score(context, conts)
        took = time.perf_counter() - t0
        lp, nt = [r.logprob for r in res], [r.n_tokens for r in res]
        if self.cache is not None:
            self.cache.put(key, lp, nt, took)
        return lp, nt, took

    def score(self, item: Item) -> tuple[OptionScores, dict[str, float], float]:
        """The option scores of ``item`` for every agent, each agent's seconds, the prior's seconds."""
        conts = [" " + c for c in item.choices]
        scores = OptionScores(
            options=[str(i) for i in range(len(item.choices))],
            texts=list(item.choices),
            n_bytes=[len(c.encode("utf-8")) for c in conts],
        )
        seconds: dict[str, float] = {}
        priors: dict[str | None, list[float]] = {}
        t_prior = 0.0
        for a in self.agents:
            lp, nt, took = self._score(a, self.prefixes[a.name] + item.context, conts)
            seconds[a.name] = took
            scores.loglik[a.name] = lp
            scores.n_tokens[a.name] = nt
            if a.model_path not in priors:
                priors[a.model_path], _, took = self._score(a, PRIOR_CONTEXT, conts)
                t_prior += took
            scores.prior[a.name] = priors[a.model_path]
        return scores, seconds, t_prior

    def close(self) -> None:
        for e in self.engines.values():
            e.close()
        if self.cache is not None:
            self.cache.close()


def candidates_from(scores: OptionScores, agents: Sequence[AgentConfig]) -> list[Candidate]:
    """Each agent's answer: its most likely choice (raw log-likelihood)."""
    out = []
    for a in agents:
        ll = scores.loglik[a.name]
        best = max(range(len(ll)), key=lambda i: (ll[i], -i))
        out.append(
            Candidate(
                agent=a.name,
                role=a.role,
                text=scores.texts[best],
                normalized=scores.options[best],
                score=ll[best] / max(1, scores.n_tokens[a.name][best]),
            )
        )
    return out


def check_strategies(names: Sequence[str]) -> list[str]:
    """The strategies to run, each known and meaningful on scored choices."""
    known = strategy_names()
    runnable = [s for s in known if s not in GENERATIVE_ONLY]
    for s in names:
        if s not in known:
            raise InvalidRequest(f"unknown strategy {s!r}; legion eval runs: {', '.join(runnable)}")
        if s in GENERATIVE_ONLY:
            raise InvalidRequest(
                f"strategy {s!r} needs agents that write free text; legion eval scores fixed "
                f"choices and runs: {', '.join(runnable)}"
            )
    return list(dict.fromkeys(names))


def default_strategies() -> list[str]:
    return [s for s in strategy_names() if s not in GENERATIVE_ONLY]


def evaluate(
    cfg: LegionConfig,
    items: Sequence[Item],
    strategies: Sequence[str],
    *,
    shots: Sequence[Item] = (),
    agents: Sequence[str] | None = None,
    n_threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
    scorer: Scorer | None = None,
    cache: ScoreCache | None = None,
    curve: dict[int, dict[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Accuracy, item count and seconds of every strategy and of ``single:<agent>`` for each
    agent (restricted to ``agents`` when given), on the same items in order.

    When ``curve`` is a dict it is filled with ``{k: {strategy: accuracy, "best_single": ...}}``
    for the first ``k`` agents, k = 1 .. all (from the same scores; no extra model time).
    """
    chosen = [a for a in cfg.agents if agents is None or a.name in agents]
    if not chosen:
        raise InvalidRequest(
            f"no agent named {', '.join(agents or [])}; configured: {[a.name for a in cfg.agents]}"
        )
    names = check_strategies(strategies)
    prefixes = {a.name: a.role_prompt + exemplars(a, shots) for a in chosen}
    own = scorer is None
    scorer = scorer or Scorer.load(chosen, prefixes, n_threads=n_threads, cache=cache)
    runners = {s: build_strategy(s, cfg.arbiter) for s in names}
    results = {f"single:{a.name}": _Result() for a in chosen} | {s: _Result() for s in names}
    sizes = list(range(1, len(chosen))) if curve is not None else []
    sub_results = {k: {s: _Result() for s in names} for k in sizes}
    weights = {k: {a.name: 1.0 for a in chosen[:k]} for k in [*sizes, len(chosen)]}
    solver_s = 0.0
    wall_s = 0.0
    try:
        for i, item in enumerate(items):
            scores, agent_s, prior_s = scorer.score(item)
            all_s = sum(agent_s.values()) + prior_s
            cands = candidates_from(scores, chosen)
            truth = str(item.answer)
            for a, c in zip(chosen, cands, strict=True):
                r = results[f"single:{a.name}"]
                r.n += 1
                r.correct += int(c.normalized == truth)
                r.seconds += agent_s[a.name]
            for s, strat in runners.items():
                t0 = time.perf_counter()
                w = weights[len(chosen)] if getattr(strat, "uses_trust", False) else None
                d = strat.decide(cands, w, scores)
                took = time.perf_counter() - t0
                r = results[s]
                r.n += 1
                r.correct += int(d.answer_key == truth)
                r.seconds += all_s + took
                if s == "equilibrium":
                    solver_s += d.details.get("solver_ms", 0.0) / 1000
                    wall_s += all_s + took
            for k in sizes:
                sub = _restrict(scores, chosen[:k])
                for s, strat in runners.items():
                    w = weights[k] if getattr(strat, "uses_trust", False) else None
                    d = strat.decide(cands[:k], w, sub)
                    sub_results[k][s].n += 1
                    sub_results[k][s].correct += int(d.answer_key == truth)
            for k, w in weights.items():
                weights[k] = hedge_update(
                    w,
                    {c.agent: (0.0 if c.normalized == truth else 1.0) for c in cands[:k]},
                    cfg.arbiter.trust_eta,
                    cfg.arbiter.trust_floor,
                )
            if progress is not None:
                progress(i + 1, len(items))
    finally:
        if own:
            scorer.close()
    if wall_s > 0:
        log.info(
            "equilibrium solver: %.2f ms per item, %.2f%% of the item's wall time",
            1000 * solver_s / len(items),
            100 * solver_s / wall_s,
        )
    out = {k: r.row() for k, r in results.items()}
    if wall_s > 0:
        out["equilibrium"]["solver_share"] = round(solver_s / wall_s, 5)
    if curve is not None:
        singles = [out[f"single:{a.name}"]["accuracy"] for a in chosen]
        for k in sizes:
            curve[k] = {s: r.row()["accuracy"] for s, r in sub_results[k].items()}
            curve[k]["best_single"] = max(singles[:k])
        curve[len(chosen)] = {s: out[s]["accuracy"] for s in names} | {"best_single": max(singles)}
    return out


def _restrict(scores: OptionScores, agents: Sequence[AgentConfig]) -> OptionScores:
    keep = {a.name for a in agents}
    return OptionScores(
        options=scores.options,
        texts=scores.texts,
        loglik={a: v for a, v in scores.loglik.items() if a in keep},
        prior={a: v for a, v in scores.prior.items() if a in keep},
        n_tokens={a: v for a, v in scores.n_tokens.items() if a in keep},
        n_bytes=scores.n_bytes,
    )


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


def _bar(done: int, total: int) -> None:
    width = 30
    filled = math.floor(width * done / total)
    sys.stderr.write(f"\r[eval] [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_eval_cli(args: Any) -> int:
    """``legion eval``: print the table (or JSON) and optionally write it to ``--out``."""
    import pandas as pd

    from legion.config import load_config

    cfg = load_config(args.config)
    items = load_items(args.data, args.limit)
    strategies = (
        [s.strip() for s in args.strategies.split(",") if s.strip()]
        if args.strategies
        else default_strategies()
    )
    check_strategies(strategies)
    shots_path = Path(args.shots) if args.shots else train_file_for(args.data)
    shots = load_items(shots_path) if shots_path is not None and any(a.few_shot for a in cfg.agents) else []
    if any(a.few_shot for a in cfg.agents):
        log.info("few-shot exemplars from %s", shots_path if shots else "(none found: zero-shot)")
    agents = [a.strip() for a in args.agents.split(",")] if getattr(args, "agents", None) else None
    curve: dict[int, dict[str, float]] | None = {} if getattr(args, "plot", None) else None
    t0 = time.perf_counter()
    res = evaluate(
        cfg,
        items,
        strategies,
        shots=shots,
        agents=agents,
        n_threads=args.threads,
        progress=_bar if sys.stderr.isatty() else None,
        cache=ScoreCache(args.scores) if getattr(args, "scores", None) else None,
        curve=curve,
    )
    log.info("evaluated %d items in %.1fs", len(items), time.perf_counter() - t0)
    if curve is not None:
        Path(args.plot).write_text(plot_svg(curve, f"{Path(args.data).name}: accuracy vs number of agents"))
        log.info("accuracy by number of agents: %s", json.dumps(curve))
    table = {k: {"accuracy": v["accuracy"], "n": v["n"], "seconds": v["seconds"]} for k, v in res.items()}
    if args.out:
        meta = {
            "data": str(args.data),
            "limit": args.limit,
            "agents": [a.model_dump(mode="json") for a in cfg.agents],
            "shots": str(shots_path) if shots else None,
            **({"by_agents": curve} if curve is not None else {}),
        }
        Path(args.out).write_text(json.dumps({"results": res, "meta": meta}, indent=2) + "\n")
    if args.json:
        print(json.dumps(table))
        return 0
    df = pd.DataFrame([{"strategy": k, **v} for k, v in table.items()])
    print(df.to_string(index=False))
    return 0
