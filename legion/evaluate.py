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

from legion.arbitration import OptionScores, build_strategy, strategy_names
from legion.config import AgentConfig, LegionConfig
from legion.errors import InvalidRequest
from legion.messages import Candidate
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


@dataclass
class Scorer:
    """Scores choices for every agent: one in-process engine per distinct model."""

    agents: list[AgentConfig]
    prefixes: dict[str, str]
    engines: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, agents: list[AgentConfig], prefixes: dict[str, str], n_threads: int = 2) -> Scorer:
        from legion.engine import LlamaEngine, bundled_model_path

        engines: dict[str, Any] = {}
        for a in agents:
            path = a.model_path or bundled_model_path()
            if path not in engines:
                engines[path] = LlamaEngine(path, n_ctx=max(a.n_ctx, 2048), n_threads=n_threads)
        return cls(agents, prefixes, engines)

    def _engine(self, a: AgentConfig):
        from legion.engine import bundled_model_path

        return self.engines[a.model_path or bundled_model_path()]

    def score(self, item: Item) -> tuple[OptionScores, dict[str, float], float]:
        """The option scores of ``item`` for every agent, each agent's seconds, the prior's seconds."""
        conts = [" " + c for c in item.choices]
        scores = OptionScores(
            options=[str(i) for i in range(len(item.choices))],
            texts=list(item.choices),
            n_bytes=[len(c.encode("utf-8")) for c in conts],
        )
        seconds: dict[str, float] = {}
        priors: dict[int, list[float]] = {}
        t_prior = 0.0
        for a in self.agents:
            eng = self._engine(a)
            t0 = time.perf_counter()
            res = eng.score(self.prefixes[a.name] + item.context, conts)
            seconds[a.name] = time.perf_counter() - t0
            scores.loglik[a.name] = [r.logprob for r in res]
            scores.n_tokens[a.name] = [r.n_tokens for r in res]
            if id(eng) not in priors:
                t0 = time.perf_counter()
                priors[id(eng)] = [r.logprob for r in eng.score(PRIOR_CONTEXT, conts)]
                t_prior += time.perf_counter() - t0
            scores.prior[a.name] = priors[id(eng)]
        return scores, seconds, t_prior

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


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
) -> dict[str, dict[str, Any]]:
    """Accuracy, item count and seconds of every strategy and of ``single:<agent>`` for each
    agent (restricted to ``agents`` when given), on the same items in order."""
    chosen = [a for a in cfg.agents if agents is None or a.name in agents]
    if not chosen:
        raise InvalidRequest(
            f"no agent named {', '.join(agents or [])}; configured: {[a.name for a in cfg.agents]}"
        )
    names = check_strategies(strategies)
    prefixes = {a.name: a.role_prompt + exemplars(a, shots) for a in chosen}
    own = scorer is None
    scorer = scorer or Scorer.load(chosen, prefixes, n_threads=n_threads)
    runners = {s: build_strategy(s, cfg.arbiter) for s in names}
    results = {f"single:{a.name}": _Result() for a in chosen} | {s: _Result() for s in names}
    weights = {a.name: 1.0 for a in chosen}
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
                w = weights if getattr(strat, "uses_trust", False) else None
                d = strat.decide(cands, w, scores)
                took = time.perf_counter() - t0
                r = results[s]
                r.n += 1
                r.correct += int(d.answer_key == truth)
                r.seconds += all_s + took
                if s == "equilibrium":
                    solver_s += d.details.get("solver_ms", 0.0) / 1000
                    wall_s += all_s + took
            weights = hedge_update(
                weights,
                {c.agent: (0.0 if c.normalized == truth else 1.0) for c in cands},
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
    return out


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
    t0 = time.perf_counter()
    res = evaluate(
        cfg,
        items,
        strategies,
        shots=shots,
        agents=agents,
        n_threads=args.threads,
        progress=_bar if sys.stderr.isatty() else None,
    )
    log.info("evaluated %d items in %.1fs", len(items), time.perf_counter() - t0)
    table = {k: {"accuracy": v["accuracy"], "n": v["n"], "seconds": v["seconds"]} for k, v in res.items()}
    if args.out:
        meta = {
            "data": str(args.data),
            "limit": args.limit,
            "agents": [a.model_dump(mode="json") for a in cfg.agents],
            "shots": str(shots_path) if shots else None,
        }
        Path(args.out).write_text(json.dumps({"results": res, "meta": meta}, indent=2) + "\n")
    if args.json:
        print(json.dumps(table))
        return 0
    df = pd.DataFrame([{"strategy": k, **v} for k, v in table.items()])
    print(df.to_string(index=False))
    return 0
