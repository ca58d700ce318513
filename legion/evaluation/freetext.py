"""``legion eval --free-text``: accuracy of generated answers, for every strategy that generates.

Multiple-choice scoring cannot rate ``plurality`` over free text, ``debate``, ``decompose`` or
sampled answers: they write answers. Here the items become short-answer tasks: the question
(in the ``listed`` form followed by its choices, as a user would ask it; in the ``open`` form
alone) with the correct choice's text as the reference answer. Every strategy answers through
the same ``Arbiter`` that serves ``/v1/tasks``, over the agents in this process
(``LocalAgents``); an answer is right when the equivalence that groups votes
(``legion.arbitration.equivalence.equivalent``) says it states the reference and no other choice. Exact
match (the normalised final answer equals the reference) is reported beside it, with how often
the two judges agree.

Self-consistency is measured against the same token budget: one agent sampled ``n`` times and
voted (``self-consistency:<agent>x<n>``) beside the same agent's single greedy answer
(``greedy:<agent>``) and the agents' fan-out, each row with the tokens it generated per item.

``--dump-candidates FILE`` keeps, per item, what ``learned`` decided over: the distinct answers,
every member's option scores of them (the ``OptionScores`` the strategy got, and each member's
scores under its view's rule), and which of them the judge holds right: the data
``legion calibrate --candidates`` fits a free-text profile on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legion.agent import Agent
from legion.arbitration.arbiter import Arbiter, PanelAgents
from legion.arbitration.equivalence import EmbeddingSimilarity, Equivalence, canonical, final_answer
from legion.arbitration.strategies import (
    OptionScores,
    build_strategy,
    get_strategy,
    group_candidates,
    normalize_answer,
    representative_text,
    strategy_names,
    usable,
)
from legion.arbitration.strategies.learned import agent_scores
from legion.arbitration.trust import TrustStore
from legion.config import LegionConfig, load_config
from legion.engine import views
from legion.engine.llama import ScoredContinuation
from legion.engine.views import Item, load_items
from legion.errors import InvalidRequest
from legion.evaluation.local_agents import LocalAgents
from legion.messages import Candidate, GenerateRequest, TaskRequest, TaskResult
from legion.profile import check_agents, load_profile, view_of

log = logging.getLogger(__name__)

FORMS = ("listed", "open")
CANDIDATES_FORMAT = "legion-free-text-candidates"
CANDIDATES_VERSION = 1


# Strategies that need scored options or a profile decide free text too, but these are the ones
# whose answers only a free-text eval can rate; the rest run when named.
def default_strategies(profile: bool) -> list[str]:
    """Every strategy (``learned`` only with a profile to decide by)."""
    return [s for s in strategy_names() if profile or s != "learned"]


@dataclass
class ShortItem:
    """A short-answer task built from a multiple-choice item."""

    id: str
    task: str
    reference: str
    others: list[str]  # the wrong choices: an answer that states one of them is not right


def short_item(item: Item, form: str = "listed") -> ShortItem:
    """``item`` as a short-answer task in ``form`` (``listed``: the question and its choices;
    ``open``: the question alone)."""
    if form not in FORMS:
        raise InvalidRequest(f"unknown free-text form {form!r}; use one of {', '.join(FORMS)}")
    parts = views.split_question(item.context)
    question = (parts[1] if parts is not None else item.context).strip()
    if form == "listed":
        question += "\nChoices: " + "; ".join(c.strip() for c in item.choices)
    others = [c for i, c in enumerate(item.choices) if i != item.answer]
    return ShortItem(id=item.id, task=question, reference=item.choices[item.answer], others=others)


def exact_match(answer: str, reference: str) -> bool:
    """The normalised final answer equals the normalised reference."""
    return bool(reference.strip()) and normalize_answer(final_answer(answer)) == normalize_answer(reference)


async def judge(answer: str, item: ShortItem, equivalence: Equivalence | None = None) -> bool:
    """``answer`` states the reference (``equivalence``: the rules alone by default) and states
    no wrong choice that is not itself the same as the reference."""
    eq = equivalence or Equivalence()
    if not answer.strip() or not await eq.judge(answer, item.reference, item.task):
        return False
    for other in item.others:
        if await eq.judge(answer, other, item.task) and not await eq.judge(item.reference, other, item.task):
            return False
    return True


@dataclass
class Answered:
    """One method's answer to one item, judged."""

    answer: str
    tokens: int
    right: bool
    exact: bool


@dataclass
class _Row:
    right: int = 0
    exact: int = 0
    tokens: int = 0
    n: int = 0

    def add(self, a: Answered) -> None:
        self.n += 1
        self.right += a.right
        self.exact += a.exact
        self.tokens += a.tokens

    def summary(self) -> dict[str, float | int]:
        n = max(self.n, 1)
        return {
            "accuracy": round(self.right / n, 4),
            "exact_match": round(self.exact / n, 4),
            "tokens_per_item": round(self.tokens / n, 1),
            "n": self.n,
        }


@dataclass
class JudgeAgreement:
    """How the equivalence judge and exact match agree over every judged answer."""

    both: int = 0
    judge_only: int = 0
    exact_only: int = 0
    neither: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)  # distinct disagreements, a few

    def add(self, a: Answered, item: ShortItem, keep: int = 8) -> None:
        if a.right and a.exact:
            self.both += 1
        elif a.right:
            self.judge_only += 1
        elif a.exact:
            self.exact_only += 1
        else:
            self.neither += 1
        example = {"answer": a.answer, "reference": item.reference, "judge": str(a.right)}
        if a.right != a.exact and len(self.examples) < keep and example not in self.examples:
            self.examples.append(example)

    def summary(self) -> dict[str, Any]:
        n = self.both + self.judge_only + self.exact_only + self.neither
        agree = (self.both + self.neither) / n if n else 0.0
        p_judge = (self.both + self.judge_only) / n if n else 0.0
        p_exact = (self.both + self.exact_only) / n if n else 0.0
        chance = p_judge * p_exact + (1 - p_judge) * (1 - p_exact)
        kappa = (agree - chance) / (1 - chance) if chance < 1 else 1.0
        return {
            "answers": n,
            "agreement": round(agree, 4),
            "cohen_kappa": round(kappa, 4),
            "both_right": self.both,
            "judge_only": self.judge_only,
            "exact_only": self.exact_only,
            "both_wrong": self.neither,
            "disagreements": self.examples,
        }


class _Counted:
    """One run's view of the shared ``LocalAgents``: the same answers (and memory), its own
    token count, so that runs going on at once each know what they cost. Remembered answers
    count too: a strategy's budget is what it asks for, not what the memory saved."""

    def __init__(self, agents: LocalAgents):
        self._agents = agents
        self.completion_tokens = 0
        # Every score call (member, task, context, continuations, scores): what the strategy decided by.
        self.scored: list[tuple[str, str, str, list[str], list[ScoredContinuation]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agents, name)

    async def generate(self, agent: str, req: GenerateRequest):
        gen = await self._agents.generate(agent, req)
        self.completion_tokens += gen.completion_tokens
        return gen

    async def score(
        self, agent: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        got = await self._agents.score(agent, task, context, continuations, view)
        self.scored.append((view or agent, task, context, list(continuations), got))
        return got


def decided_scores(result: TaskResult, scored: Sequence[tuple], task: str) -> OptionScores | None:
    """The option scores ``result`` was decided by, rebuilt as the Arbiter built them: the options
    and the members that scored from the trace's ``scores`` step, each member's raw
    log-likelihoods (after its prompt for ``task``, and after the content-free ``N/A``) and token
    counts from the score calls the run made (``_Counted.scored``). None when nothing was scored
    (every member gave the same answer). Raises ``RuntimeError`` when the calls do not give the
    trace's scores (the rebuilt scores would not be the ones decided by)."""
    step = next((e for e in result.trace if e.step == "scores"), None)
    if step is None:
        return None
    keys = list(step.data["options"])
    calls = {(member, t, ctx): (conts, got) for member, t, ctx, conts, got in scored}
    scores: OptionScores | None = None
    for member, traced in step.data["loglik"].items():
        conts, on_task = calls[(member, task, "")]
        _, prior = calls.get((member, "N/A", ""), ([], []))
        if len(conts) != len(keys) or [round(s.logprob, 4) for s in on_task] != traced:
            raise RuntimeError(f"the score calls of {member} are not the scores the trace decided by")
        if scores is None:
            scores = OptionScores(
                options=keys,
                texts=[c.removeprefix(" ") for c in conts],  # the Arbiter scores " " + each option's text
                n_bytes=[len(c.encode()) for c in conts],
            )
        scores.loglik[member] = [s.logprob for s in on_task]
        scores.prior[member] = [s.logprob for s in prior]
        scores.n_tokens[member] = [s.n_tokens for s in on_task]
    return scores


class FreeTextEval:
    """Answers short-answer items with every method and judges them."""

    def __init__(
        self,
        cfg: LegionConfig,
        agents: LocalAgents,
        strategies: Sequence[str],
        max_tokens: int = 32,
        samples: int = 5,
        sc_agent: str | None = None,
        sc_temperature: float = 0.7,
        equivalence: Equivalence | None = None,
        trust_dir: Path | None = None,
        fanout: str = "all",
        dump_candidates: bool = False,
    ):
        """``dump_candidates``: keep what ``learned`` decided each item over (``candidates``);
        ``learned`` must be among ``strategies``, with a profile (``arbiter.free_text_profile``
        or ``arbiter.profile``)."""
        self.cfg = cfg
        if dump_candidates and ("learned" not in strategies or cfg.arbiter.text_profile is None):
            raise InvalidRequest(
                "--dump-candidates keeps the option scores the learned strategy decides by: add learned "
                "to --strategies, with a profile (arbiter.free_text_profile, arbiter.profile or --profile)"
            )
        self.dump_candidates = dump_candidates
        # Per item, the candidates learned chose between, their scores and the judge's verdicts.
        self.candidates: list[dict[str, Any]] = []
        # fanout adaptive: every strategy that can stop early also answers as <strategy>@adaptive.
        self.adaptive = [
            s
            for s in strategies
            if fanout == "adaptive" and getattr(get_strategy(s), "adaptive_fanout", False)
        ]
        self.agents = agents
        self.strategies = list(strategies)
        self.max_tokens = max_tokens
        self.samples = samples
        members = {m.name for m in cfg.panel}
        self.sc_agent = sc_agent or cfg.panel[0].name
        if self.sc_agent not in members:
            raise InvalidRequest(
                f"--sc-agent {self.sc_agent!r} is not a panel member; choose one of {sorted(members)}"
            )
        # The self-consistency agent is a panel member: its calls go to the agent that owns it.
        self._panel = PanelAgents(agents, {m.name: cfg.owner(m.name).name for m in cfg.panel})
        self.sc_temperature = sc_temperature
        self.equivalence = equivalence or Equivalence()  # the judge's: rules alone by default
        # Each strategy keeps its own trust weights, as a service running only it would: one
        # update per item, however many strategies answer it.
        self.trust = (
            {
                s: TrustStore(
                    trust_dir / f"trust-{s}.json", eta=cfg.arbiter.trust_eta, floor=cfg.arbiter.trust_floor
                )
                for s in [*self.strategies, *(f"{x}@adaptive" for x in self.adaptive)]
            }
            if trust_dir is not None
            else {}
        )
        self.rows: dict[str, _Row] = {}
        self._asked: dict[str, list[int]] = {}  # strategy (or <strategy>@adaptive) -> members asked per item
        self.agreement = JudgeAgreement()
        self.answers: dict[str, dict[str, Any]] = {}  # item id -> its reference and each method's answer

    async def _answered(self, text: str, tokens: int, item: ShortItem) -> Answered:
        return Answered(
            answer=text,
            tokens=tokens,
            right=await judge(text, item, self.equivalence),
            exact=exact_match(text, item.reference),
        )

    async def _strategy(
        self, name: str, item: ShortItem, fanout: str = "all"
    ) -> tuple[Answered, list[Candidate]]:
        counted = _Counted(self.agents)
        trust = self.trust.get(name if fanout == "all" else f"{name}@adaptive")
        arbiter = Arbiter(self.cfg, counted, trust=trust)  # type: ignore[arg-type]
        req = TaskRequest(
            id=f"{item.id}:{name}", task=item.task, strategy=name, max_tokens=self.max_tokens, fanout=fanout
        )
        result = await arbiter.run(req)
        self._asked.setdefault(name if fanout == "all" else f"{name}@adaptive", []).append(
            result.agents_asked or 0
        )
        if self.dump_candidates and name == "learned" and fanout == "all":
            self.candidates.append(await self._candidate_record(item, result, counted.scored))
        return await self._answered(result.answer, counted.completion_tokens, item), result.candidates

    async def _candidate_record(self, item: ShortItem, result: TaskResult, scored: Sequence[tuple]) -> dict:
        """What ``learned`` decided ``item`` over: each option, the text it answers with when
        chosen, whether the judge holds that right, the raw option scores and each member's
        scores under its view's rule (``features``, the strategy's own ``agent_scores``)."""
        scores = decided_scores(result, scored, item.task)
        groups = group_candidates(usable(result.candidates))
        keys = scores.options if scores is not None else list(groups)
        answers = [representative_text(k, groups, scores) for k in keys]
        decision = next(e for e in result.trace if e.step == "decision")
        rec: dict[str, Any] = {
            "id": item.id,
            "task": item.task,
            "reference": item.reference,
            "options": keys,
            "answers": answers,
            "right": [await judge(a, item, self.equivalence) for a in answers],
            "decided": decision.data["winner"],
        }
        if scores is not None:
            profile = load_profile(self.cfg.arbiter.text_profile)  # type: ignore[arg-type]
            rec.update(
                loglik=scores.loglik,
                prior=scores.prior,
                n_tokens=scores.n_tokens,
                n_bytes=scores.n_bytes,
                features=agent_scores(scores, profile),
            )
        return rec

    def candidates_file(self, data: str, form: str) -> dict[str, Any]:
        """The ``--dump-candidates`` file: the members and their views, then one record per item
        (``_candidate_record``) in the items' order of completion."""
        return {
            "format": CANDIDATES_FORMAT,
            "version": CANDIDATES_VERSION,
            "data": data,
            "form": form,
            "max_tokens": self.max_tokens,
            "profile": self.cfg.arbiter.text_profile,
            "members": [{"name": m.name, "view": view_of(m)} for m in self.cfg.panel],
            "items": self.candidates,
        }

    async def _self_consistency(self, item: ShortItem) -> tuple[Answered, Answered]:
        """``samples`` sampled answers of one agent voted (plurality over equivalence groups),
        and the agent's greedy answer."""
        greedy_req = GenerateRequest(task=item.task, max_tokens=self.max_tokens, temperature=0.0)
        greedy = await self._panel.generate(self.sc_agent, greedy_req)
        cands = []
        tokens = 0
        for i in range(self.samples):  # one seed per sample: remembered answers stay reproducible
            req = GenerateRequest(
                task=item.task, max_tokens=self.max_tokens, temperature=self.sc_temperature, seed=1000 + i
            )
            g = await self._panel.generate(self.sc_agent, req)
            tokens += g.completion_tokens
            cands.append(
                Candidate(
                    agent=f"sample{i}",
                    role="sample",
                    text=g.text.strip(),
                    normalized=normalize_answer(g.text),
                    score=round(g.mean_logprob, 4),
                )
            )
        grouped, _ = canonical(cands)
        decision = build_strategy("plurality", self.cfg.arbiter).decide(grouped)
        return (
            await self._answered(decision.answer, tokens, item),
            await self._answered(greedy.text.strip(), greedy.completion_tokens, item),
        )

    def _add(self, method: str, a: Answered, item: ShortItem) -> None:
        self.rows.setdefault(method, _Row()).add(a)
        self.agreement.add(a, item)
        rec = self.answers.setdefault(
            item.id, {"task": item.task, "reference": item.reference, "others": item.others, "by": {}}
        )
        rec["by"][method] = {"answer": a.answer, "right": a.right, "tokens": a.tokens}

    async def item(self, item: ShortItem) -> None:
        """Every method's answer to ``item``, judged and counted."""
        singles_done = False
        for name in self.strategies:
            answered, cands = await self._strategy(name, item)
            self._add(name, answered, item)
            if name in self.adaptive:
                self._add(f"{name}@adaptive", (await self._strategy(name, item, "adaptive"))[0], item)
            if not singles_done:  # every agent's own fan-out answer: the single-agent rows
                singles_done = True
                for c in cands:
                    text = c.text if c.ok else ""
                    answered = await self._answered(text, c.completion_tokens or 0, item)
                    self._add(f"single:{c.agent}", answered, item)
        if self.samples > 0:
            sc, greedy = await self._self_consistency(item)
            self._add(f"greedy:{self.sc_agent}", greedy, item)
            self._add(f"self-consistency:{self.sc_agent}x{self.samples}", sc, item)

    async def run(
        self,
        items: Sequence[ShortItem],
        concurrency: int = 2,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, dict[str, float | int]]:
        """Every item through every method, ``concurrency`` items at a time (the agents'
        engines decode the items' sequences together)."""
        sem = asyncio.Semaphore(max(1, concurrency))
        done = 0

        async def one(it: ShortItem) -> None:
            nonlocal done
            async with sem:
                await self.item(it)
            done += 1
            if progress is not None:
                progress(done, len(items))

        await asyncio.gather(*(one(it) for it in items))
        return self.results()

    async def rejudge(self, saved: dict[str, dict[str, Any]], items: Sequence[ShortItem]) -> None:
        """Judge again, with this eval's equivalence, the answers an earlier run saved (its
        ``--out`` file's ``answers``): no agent is asked anything."""
        by_id = {it.id: it for it in items}
        for item_id, rec in saved.items():
            item = by_id.get(item_id)
            if item is None:
                raise InvalidRequest(
                    f"item {item_id!r} of the saved answers is not in --data (or past --limit)"
                )
            for method, got in rec["by"].items():
                self._add(method, await self._answered(got["answer"], got.get("tokens", 0), item), item)

    def results(self) -> dict[str, dict[str, float | int]]:
        order = sorted(self.rows, key=lambda m: (m.split(":")[0].split("@")[0] in self.strategies, m))
        out = {m: self.rows[m].summary() for m in order}
        for m, asked in self._asked.items():
            if m in out and asked:
                out[m]["agents_asked"] = round(sum(asked) / len(asked), 3)
        return out


def check_freetext_strategies(names: Sequence[str]) -> list[str]:
    known = set(strategy_names())
    bad = [n for n in names if n not in known]
    if bad:
        raise InvalidRequest(f"unknown strategies {bad}; choose from {sorted(known)}")
    return list(names)


def load_agents(cfg: LegionConfig, threads: int) -> dict[str, Agent]:
    """Every configured agent, loaded in this process with ``threads`` llama.cpp threads."""
    out: dict[str, Agent] = {}
    for a in cfg.agents:
        agent = Agent(a.model_copy(update={"n_threads": threads}), load_in_background=False)
        agent.engine()  # raises the load error now, naming the agent
        out[a.name] = agent
    return out


def run_freetext_cli(args: Any) -> int:
    """``legion eval --free-text``: the table (or JSON), the judges' agreement, ``--out``;
    with ``--rejudge FILE``, the answers saved in FILE judged again (no model is loaded)."""
    import json

    cfg = load_config(args.config)
    profile_path = getattr(args, "profile", None)
    if profile_path:  # the profile learned (and equilibrium) decide by: fitted for exactly the panel
        check_agents(load_profile(profile_path), cfg.panel, f"profile {profile_path}")
        cfg = cfg.model_copy(
            update={"arbiter": cfg.arbiter.model_copy(update={"free_text_profile": str(profile_path)})}
        )
    dump = getattr(args, "dump_candidates", None)
    if dump and args.rejudge:
        raise InvalidRequest("--dump-candidates needs the agents' scores: it does not go with --rejudge")
    if args.samples < 0:
        raise InvalidRequest("--samples must be 0 (no self-consistency) or more")
    if not 1 <= args.max_tokens <= 512:
        raise InvalidRequest("--max-tokens must be between 1 and 512")
    strategies = check_freetext_strategies(
        [s.strip() for s in args.strategies.split(",") if s.strip()]
        if args.strategies
        else default_strategies(cfg.arbiter.text_profile is not None)
    )
    items = [short_item(it, args.form) for it in load_items(args.data, args.limit)]
    if not 0.0 <= args.min_similarity <= 1.0:
        raise InvalidRequest("--min-similarity must be between 0 and 1")
    embedding = args.judge == "embedding"
    equivalence = Equivalence(EmbeddingSimilarity(min_similarity=args.min_similarity) if embedding else None)
    t0 = time.perf_counter()
    if args.rejudge:
        ev = FreeTextEval(cfg, None, strategies, samples=0, equivalence=equivalence)  # type: ignore[arg-type]
        try:
            saved = json.loads(Path(args.rejudge).read_text())["answers"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidRequest(f"--rejudge {args.rejudge}: not a saved free-text eval ({exc})") from None
        asyncio.run(ev.rejudge(saved, items))
        results = ev.results()
        return _print_results(args, ev, results, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="legion-freetext-") as tmp:
        # Trust weights learn in a scratch file: an eval never moves the served weights.
        cfg = cfg.model_copy(update={"data_dir": tmp})
        agents = LocalAgents(load_agents(cfg, args.threads))
        ev = FreeTextEval(
            cfg,
            agents,
            strategies,
            max_tokens=args.max_tokens,
            samples=args.samples,
            sc_agent=args.sc_agent,
            sc_temperature=args.sc_temperature,
            trust_dir=Path(tmp),
            equivalence=equivalence,
            fanout=getattr(args, "fanout", None) or "all",
            dump_candidates=bool(dump),
        )
        progress = _bar if sys.stderr.isatty() else None
        results = asyncio.run(ev.run(items, concurrency=args.concurrency, progress=progress))
    if dump:
        Path(dump).write_text(json.dumps(ev.candidates_file(str(args.data), args.form)) + "\n")
    return _print_results(args, ev, results, time.perf_counter() - t0)


def _print_results(args: Any, ev: FreeTextEval, results: dict[str, Any], seconds: float) -> int:
    import json

    import pandas as pd

    agreement = ev.agreement.summary()
    log.info("free-text eval of %d items in %.1fs", len(ev.answers), seconds)
    if args.out:
        meta = {
            "data": str(args.data),
            "form": args.form,
            "limit": args.limit,
            "max_tokens": args.max_tokens,
            "judge": args.judge,
            "min_similarity": args.min_similarity if args.judge == "embedding" else None,
            "rejudged": args.rejudge,
            "samples": args.samples,
            "sc_agent": ev.sc_agent,
            "sc_temperature": args.sc_temperature,
            "seconds": round(seconds, 1),
            "profile": ev.cfg.arbiter.text_profile,
            "agents": [a.model_dump(mode="json") for a in ev.cfg.agents],
        }
        Path(args.out).write_text(
            json.dumps(
                {"results": results, "judge_agreement": agreement, "meta": meta, "answers": ev.answers},
                indent=2,
            )
            + "\n"
        )
    if args.json:
        print(json.dumps({"results": results, "judge_agreement": agreement}))
        return 0
    print(pd.DataFrame([{"method": k, **v} for k, v in results.items()]).to_string(index=False))
    print()
    print("\n".join(agreement_lines(agreement)))
    return 0


def agreement_lines(s: dict[str, Any]) -> list[str]:
    lines = [
        f"judge (equivalence) vs exact match over {s['answers']} answers: agreement {s['agreement']:.3f}, "
        f"Cohen's kappa {s['cohen_kappa']:.3f} (both right {s['both_right']}, judge only {s['judge_only']}, "
        f"exact only {s['exact_only']}, both wrong {s['both_wrong']})"
    ]
    for d in s["disagreements"]:
        lines.append(
            f"  judge {'right' if d['judge'] == 'True' else 'wrong'}: {d['answer']!r} vs {d['reference']!r}"
        )
    return lines


def _bar(done: int, total: int) -> None:
    width = 30
    filled = math.floor(width * done / max(total, 1))
    sys.stderr.write(f"\r[free-text] [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
