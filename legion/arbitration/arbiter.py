"""The Arbiter: one task's fan-out to the agents, the strategy's decision, the trace, the trust step.

A slow or dead agent never blocks the answer: the Arbiter waits at most ``agent_timeout_s``
and answers from what arrived, naming the missing agents in the trace. Multi-round strategies
call the agents again through the task's session; every round is traced. After each task the
agents' trust weights take one Hedge step (agreement with the decision). No Ray here: the
Arbiter reaches the agents through ``Agents`` (``actors.remote.RayAgents`` in a running Legion).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from legion import metrics
from legion.arbitration import adaptive
from legion.arbitration.adaptation import Adaptation
from legion.arbitration.adaptation import from_config as adaptation_from_config
from legion.arbitration.admission import TaskAdmission
from legion.arbitration.equivalence import AgentJudge, EmbeddingSimilarity, Equivalence
from legion.arbitration.strategies import OptionScores, Strategy, build_strategy, normalize_answer
from legion.arbitration.strategies.base import choice_candidates
from legion.arbitration.strategies.learned import Learned, learned_distribution
from legion.arbitration.trust import TrustStore, agreement_losses
from legion.config import LegionConfig
from legion.engine.constrained import AnswerMismatch, parse_answer, unwrap_json, vote_key
from legion.engine.llama import ScoredContinuation
from legion.errors import AgentGone, ErrorCode, InvalidChoices, LegionError, Overloaded, TaskTimeout
from legion.messages import (
    AgentHealth,
    Candidate,
    ChoiceResult,
    ChoiceScores,
    Decision,
    GenerateRequest,
    Generation,
    TaskRequest,
    TaskResult,
    TraceEvent,
)
from legion.profile import Profile, load_profile
from legion.streaming import relay

log = logging.getLogger(__name__)

Event = Candidate | TraceEvent
"""What a task streams while it runs: each fan-out candidate, every other trace event."""


class Agents(Protocol):
    """How the Arbiter reaches the agents, by name. A failed call raises: a ``LegionError``
    when the agent refused or is gone, any other exception when it broke."""

    def saturated(self) -> bool:
        """Whether no agent can take another call now (every one's sequences and queue are full)."""
        ...

    async def status(self, agent: str) -> tuple[AgentHealth, dict]:
        """The agent's health and its stats. Raises ``AgentGone`` when it is gone for good,
        another error when it is restarting or does not answer."""
        ...

    def pool_info(self, agent: str) -> dict:
        """The agent's replicas and their autoscaling bounds (no call to the agent)."""
        ...

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        """The agent's answer, in the voice of the member ``req.view`` names."""
        ...

    async def score(
        self, agent: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        """The agent's log-likelihood of each continuation after member ``view``'s own prompt for
        ``task`` with ``context`` (rendered by the agent: its role, its prompt format, its template)."""
        ...

    async def score_choices(
        self, agent: str, task: str, choices: list[str], members: list[str], context: str = ""
    ) -> list[ChoiceScores]:
        """Each of the agent's ``members`` scores ``choices`` in its own view, in one call."""
        ...


class PanelAgents:
    """The panel as the strategies and the equivalence judge see it: every member (each view of
    each agent) by its name, each call sent to the agent that owns it, in that member's voice."""

    def __init__(self, agents: Agents, owner: Mapping[str, str]):
        self._agents = agents
        self._owner = dict(owner)

    def saturated(self) -> bool:
        return self._agents.saturated()

    async def status(self, member: str) -> tuple[AgentHealth, dict]:
        return await self._agents.status(self._owner[member])

    def pool_info(self, member: str) -> dict:
        return self._agents.pool_info(self._owner[member])

    async def generate(self, member: str, req: GenerateRequest) -> Generation:
        return await self._agents.generate(self._owner[member], req.model_copy(update={"view": member}))

    async def score(
        self, member: str, task: str, context: str, continuations: list[str], view: str | None = None
    ) -> list[ScoredContinuation]:
        return await self._agents.score(self._owner[member], task, context, continuations, member)


def _softmax_list(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    total = sum(e)
    return [x / total for x in e]


def describe_failure(exc: BaseException) -> str:
    """One line on why a call to an agent failed."""
    if isinstance(exc, LegionError):
        return exc.message
    return f"agent raised {type(exc).__name__}: {exc}"


def _overloaded(detail: str) -> Overloaded:
    return Overloaded(
        f"every agent is saturated ({detail}); retry after the Retry-After delay",
        details={"retry_after_s": 2},
    )


def candidate_event(c: Candidate, during: str) -> TraceEvent:
    """A first-round candidate as its trace step: its answer group, or why it failed."""
    if c.ok:
        data = {"agent": c.agent, "normalized": c.normalized, "score": c.score}
        return TraceEvent(step="candidate", at_ms=c.latency_ms, data=data)
    data = {"agent": c.agent, "error": c.error, "during": during}
    return TraceEvent(step="agent_failed", at_ms=c.latency_ms, data=data)


def _check_constrained(c: Candidate, gen: GenerateRequest) -> Candidate:
    """A constrained answer with its vote key (canonical JSON), or, when it does not parse or
    validate, a failed candidate that says why: it takes no part in the vote."""
    try:
        value = parse_answer(c.text, gen.output)
    except AnswerMismatch as exc:
        why = str(exc)
        if c.finish_reason == "length":
            why = f"the answer was cut at max_tokens ({c.completion_tokens} tokens): {why}; raise max_tokens"
        elif c.finish_reason == "timeout":
            why = f"the answer was cut by the task's timeout: {why}"
        return c.model_copy(update={"error": why, "normalized": ""})
    return c.model_copy(update={"normalized": vote_key(value, gen.output)})


def _constrained_answer(s: _Session, key: str, fallback: str) -> str:
    """The whole JSON text of the best-scoring candidate whose vote key won (a strategy's
    representative text is an answer's first line, which is not JSON)."""
    pool = [c for c in [*s.latest, *(s.first or [])] if c.ok and c.normalized == key]
    if not pool:
        return fallback
    return max(pool, key=lambda c: c.score if c.score is not None else float("-inf")).text


class _Session:
    """One task's access to the agents (``legion.arbitration.strategies.Session``), with its trace."""

    def __init__(self, arbiter: Arbiter, req: TaskRequest, on_event: Callable[[Event], None] | None):
        self._agents = arbiter.members
        self._cfg = arbiter.cfg
        self._panel = arbiter.panel
        self._equivalence = arbiter.equivalence
        self._on_event = on_event
        self.req = req
        self.task = req.task
        self.settings = arbiter.cfg.arbiter
        self.roles = {m.name: m.role for m in arbiter.panel}
        self.weights: Mapping[str, float] | None = None
        self.t0 = time.perf_counter()
        self.events: list[TraceEvent] = []
        self.first: list[Candidate] | None = None
        self.latest: list[Candidate] = []
        self.missing: set[str] = set()
        self.standing: Mapping[str, float] = {}  # each member's weight in a tie (Candidate.weight)
        self.rounds = 0  # rounds of agent calls, for the metrics
        self.call_keys: set[str] = set()  # tool_choice auto: the vote keys that are calls
        # fanout adaptive: the stop rule, then the members asked and skipped and the risk at the stop.
        self.rule: adaptive.StopRule | None = None
        self.asked: list[str] = list(self.roles)
        self.skipped: list[str] = []
        self.risk: float | None = None

    def now_ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000, 2)

    def trace(self, step: str, **data: Any) -> None:
        self._record(TraceEvent(step=step, at_ms=self.now_ms(), data=data))

    def _record(self, event: TraceEvent, streamed: bool = False) -> None:
        self.events.append(event)
        if self._on_event is not None and not streamed:
            self._on_event(event)

    def _stream(self, candidate: Candidate) -> None:
        if self._on_event is not None:
            self._on_event(candidate)

    def request(self, task: str, context: str = "") -> GenerateRequest:
        ctx = "\n\n".join(x for x in (self.req.context.strip(), context.strip()) if x)
        sampling = self.req.sampling.model_dump() if self.req.sampling is not None else {}
        return GenerateRequest(
            task=task,
            max_tokens=self.req.max_tokens,
            # The request's sampling holds for every call the task makes, whatever the strategy.
            **sampling,
            context=ctx,
            request_id=self.req.request_id,
            timeout_s=self.remaining_s(),
            # The schema binds every answer to the task itself (fan-out, debate rounds, the
            # integrator), not a plan or the sub-questions a strategy asks on the way.
            output=self.req.output if task == self.task else None,
            instruction=self.req.instruction if task == self.task else None,
            tools=self.req.tools if task == self.task else None,
        )

    def remaining_s(self) -> float | None:
        """What is left of the task's ``timeout_s`` (None: no deadline)."""
        if self.req.timeout_s is None:
            return None
        return max(0.0, self.req.timeout_s - (time.perf_counter() - self.t0))

    async def fanout(self) -> list[Candidate]:
        """Every agent's first answer (asked once). Raises ``Overloaded`` when every agent
        refused it for a full queue."""
        if self.first is None:
            gen = self.request(self.task)
            if self.rule is None:
                self.first = await self._gather({a: gen for a in self.roles}, "fanout", trace_each=True)
            else:
                self.first = await self._adaptive_fanout(gen)
            self.missing = {c.agent for c in self.first if not c.ok}
            if self.first and all(c.error_code == ErrorCode.OVERLOADED.value for c in self.first):
                raise _overloaded("every agent's queue is full")
        return self.first

    async def in_waves(
        self,
        ask: Callable[[list[str]], Awaitable[None]],
        look: Callable[[list[str], list[str]], adaptive.Settlement],
    ) -> None:
        """Adaptive fan-out (``legion.arbitration.adaptive``; ``run_waves`` replays it in
        ``legion eval``): ``ask`` each wave of the rule's plan in turn, then ``look(asked,
        remaining)`` weighs the vote; once the risk that the full panel decides otherwise is at
        most ``adaptive_risk`` the members left are never asked. Sets ``asked``, ``skipped`` and
        ``risk``, and traces the plan, each look and the stop."""
        assert self.rule is not None
        plan = self.rule.plan(self.settings.adaptive_first_wave, self.settings.adaptive_wave)
        order = [m for wave in plan for m in wave]
        self.trace("fanout", agents=order, fanout="adaptive", waves=plan)
        asked: list[str] = []
        stop = adaptive.Settlement(None, 1.0, len(order))
        for i, wave in enumerate(plan):
            asked += wave
            await ask(wave)
            stop = look(list(asked), order[len(asked) :])
            self.trace(
                "adaptive_look", wave=i + 1, asked=list(asked), leader=stop.leader, risk=round(stop.risk, 4)
            )
            if stop.settled(self.settings.adaptive_risk):
                break
        self.asked, self.skipped, self.risk = asked, order[len(asked) :], stop.risk
        self.trace("adaptive_stop", asked=asked, skipped=self.skipped, risk=round(stop.risk, 4))

    async def _adaptive_fanout(self, gen: GenerateRequest) -> list[Candidate]:
        """The first answers in waves, weighed by the Bayes vote of their rule-normalised keys;
        the answers asked are then grouped (equivalence) together, as a full fan-out's are."""
        rule = self.rule
        assert rule is not None
        got: list[Candidate] = []

        async def ask(wave: list[str]) -> None:
            got.extend(await self._collect({m: gen for m in wave}, trace_each=True))

        def look(asked: list[str], remaining: list[str]) -> adaptive.Settlement:
            votes = {c.agent: (c.normalized if c.ok and c.normalized else None) for c in got}
            return rule.look_votes(votes, self._vote_leader(got), remaining, None)

        self.rounds += 1
        await self.in_waves(ask, look)
        return await self._settle_answers(
            got, {m: gen for m in self.asked}, "fanout", trace_each=True, streamed=set(self.asked)
        )

    def _vote_leader(self, got: Sequence[Candidate]) -> str | None:
        """The answer leading the Bayes vote of ``got`` (a tie: the members' standing, then the first)."""
        assert self.rule is not None
        votes = {c.agent: c.normalized for c in got if c.ok and c.normalized}
        if not votes:
            return None
        k = adaptive.n_labels(dict.fromkeys(votes.values(), 0.0), None, None)
        points = adaptive.vote_points(votes, self.rule.skill, k)
        rank = {v: i for i, v in enumerate(votes.values())}
        stand = {v: sum(self.standing.get(m, 0.0) for m, x in votes.items() if x == v) for v in points}
        return max(points, key=lambda v: (round(points[v], 9), stand[v], -rank[v]))

    async def ask(self, requests: Mapping[str, GenerateRequest], step: str) -> list[Candidate]:
        return await self._gather(requests, step, trace_each=False)

    async def _answer(self, name: str, gen: GenerateRequest) -> Candidate:
        role = self.roles[name]
        try:
            out = await self._agents.generate(name, gen)
        except Exception as exc:
            code = exc.code.value if isinstance(exc, LegionError) else None
            return Candidate(
                agent=name, role=role, error=describe_failure(exc), error_code=code, latency_ms=self.now_ms()
            )
        c = Candidate(
            agent=name,
            role=role,
            text=out.text.strip(),
            normalized=normalize_answer(out.text),
            score=round(out.mean_logprob, 4),
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            latency_ms=self.now_ms(),
            finish_reason=out.finish_reason,
            weight=self.standing.get(name),
        )
        if gen.output is not None:
            return _check_constrained(c, gen)
        return self._as_call(c) if self.req.calls is not None and gen.task == self.task else c

    def _as_call(self, c: Candidate) -> Candidate:
        # tool_choice auto: a valid call votes as its canonical JSON, a call that does not
        # validate is left out with the reason, and any other answer is text.
        text = unwrap_json(c.text)
        try:
            value = parse_answer(text, self.req.calls)
        except AnswerMismatch as exc:
            try:
                attempt = json.loads(text)
            except ValueError:
                return c
            items = attempt if isinstance(attempt, list) else [attempt]
            if items and all(isinstance(i, dict) and "name" in i for i in items):
                return c.model_copy(update={"error": f"the call is not valid: {exc}", "normalized": ""})
            return c
        key = vote_key(value, self.req.calls)
        self.call_keys.add(key)
        return c.model_copy(update={"normalized": key})

    async def _gather(
        self, requests: Mapping[str, GenerateRequest], step: str, trace_each: bool
    ) -> list[Candidate]:
        self.rounds += 1
        self.trace(
            step,
            agents=list(requests),
            **({} if trace_each else {"tasks": {a: r.task for a, r in requests.items()}}),
        )
        answers = await self._collect(requests, trace_each)
        return await self._settle_answers(answers, requests, step, trace_each, streamed=set(requests))

    async def _collect(self, requests: Mapping[str, GenerateRequest], trace_each: bool) -> list[Candidate]:
        """Every named member's answer within ``agent_timeout_s`` (a failed one says why), in the
        order of ``requests``; with ``trace_each`` each goes to the stream as it arrives."""

        async def collect(name: str, gen: GenerateRequest) -> Candidate:
            c = await self._answer(name, gen)
            if trace_each:  # a fan-out candidate goes to the stream the moment it arrives
                self._stream(c)
            return c

        timeout = self.settings.agent_timeout_s
        out: dict[str, Candidate] = {}
        tasks = {asyncio.ensure_future(collect(n, g)): n for n, g in requests.items()}
        try:
            done, pending = (await asyncio.wait(tasks, timeout=timeout)) if tasks else (set(), set())
        finally:
            for t in tasks:  # past the deadline, or the whole task cancelled: stop the agents' work
                t.cancel()
        for t in done:
            c = t.result()
            out[c.agent] = c
        for t in pending:
            name = tasks[t]
            out[name] = Candidate(
                agent=name,
                role=self.roles[name],
                error=f"no answer within agent_timeout_s={timeout}",
                latency_ms=self.now_ms(),
            )
            if trace_each:  # timed out: streamed now, as failed
                self._stream(out[name])
        return [out[n] for n in requests]

    async def _settle_answers(
        self,
        answers: list[Candidate],
        requests: Mapping[str, GenerateRequest],
        step: str,
        trace_each: bool,
        streamed: set[str],
    ) -> list[Candidate]:
        """``answers`` with their vote keys (equivalent answers grouped), traced."""
        # Constrained (JSON) answers already carry their canonical JSON as the key.
        constrained = any(r.output is not None for r in requests.values())
        if constrained:
            ordered = answers
        else:  # calls (tool_choice auto) already carry their key; the equivalence groups the text
            texts = iter(await self._group([c for c in answers if not self._is_call(c)], requests, step))
            ordered = [c if self._is_call(c) else next(texts) for c in answers]
        for c in ordered:
            if trace_each or not c.ok:
                self._record(candidate_event(c, step), streamed=trace_each and c.agent in streamed)
            else:
                self.trace(f"{step}_answer", agent=c.agent, normalized=c.normalized, text=c.text)
        self.latest = ordered
        return ordered

    async def _group(
        self, answers: list[Candidate], requests: Mapping[str, GenerateRequest], step: str
    ) -> list[Candidate]:
        """Equivalent answers ("4", "2 + 2 = 4") share one normalized key, so a vote is not split;
        the trace names each merged group, its members and what joined them."""
        tasks = {r.task for r in requests.values()}
        equivalence = self._equivalence([c.agent for c in answers if c.ok])
        grouping = await equivalence.group(answers, question=tasks.pop() if len(tasks) == 1 else "")
        if grouping.fallback_error:
            self.trace(
                "equivalence_fallback_failed",
                during=step,
                fallback=equivalence.mode,
                error=grouping.fallback_error,
                consequence="answers the rules did not join stay apart",
            )
        if grouping.groups or grouping.checked:
            self.trace("equivalent_answers", during=step, mode=equivalence.mode, **grouping.trace())
        return grouping.candidates

    def _is_call(self, c: Candidate) -> bool:
        return c.ok and c.normalized in self.call_keys

    async def option_scores(self, candidates: Sequence[Candidate]) -> OptionScores | None:
        """Every answering agent's log-likelihood of every distinct answer, given its own prompt
        for the task, and given the same prompt without the question (for calibration)."""
        options: dict[str, str] = {}
        for c in candidates:
            if c.ok and c.normalized:
                # JSON (a schema's answer, a call): the whole answer; text: its first line.
                whole = self.req.output is not None or self._is_call(c) or not c.text.strip()
                options.setdefault(c.normalized, c.text if whole else c.text.splitlines()[0].strip())
        if not options:
            return None
        keys, texts = list(options), list(options.values())
        conts = [" " + t for t in texts]
        agents = [m for m in self._panel if m.name not in self.missing]
        scores = OptionScores(options=keys, texts=texts, n_bytes=[len(c.encode()) for c in conts])
        timeout = self.settings.agent_timeout_s
        t0 = self.now_ms()

        async def both(agent) -> tuple[list[ScoredContinuation], list[ScoredContinuation]]:
            calls = (
                self._agents.score(agent.name, self.task, self.req.context, conts),
                self._agents.score(agent.name, "N/A", "", conts),  # the question-free prior
            )
            try:
                return await asyncio.wait_for(asyncio.gather(*calls), timeout)
            except TimeoutError:
                raise TimeoutError(f"no scores within agent_timeout_s={timeout}") from None

        got = await asyncio.gather(*(both(a) for a in agents), return_exceptions=True)
        for agent, result in zip(agents, got, strict=True):
            if isinstance(result, BaseException):
                error = str(result) if isinstance(result, TimeoutError) else describe_failure(result)
                self.trace("agent_failed", agent=agent.name, error=error, during="scoring")
                continue
            task_s, prior_s = result
            scores.loglik[agent.name] = [s.logprob for s in task_s]
            scores.prior[agent.name] = [s.logprob for s in prior_s]
            scores.n_tokens[agent.name] = [s.n_tokens for s in task_s]
        self.trace("scores", scoring_ms=round(self.now_ms() - t0, 2), **scores.trace())
        return scores if scores.loglik else None


class Arbiter:
    """Answers tasks with the agents behind ``agents``; keeps their trust weights."""

    def __init__(
        self,
        cfg: LegionConfig,
        agents: Agents,
        trust: TrustStore | None = None,
        embedder: Callable[[], Any] | None = None,
        admission: TaskAdmission | None = None,
    ):
        """``embedder`` builds the embedding model for ``arbiter.equivalence: embedding`` (default:
        the bundled all-MiniLM-L6-v2 on one thread); it is called once, by
        ``load_equivalence_model`` or at the first pair of answers the rules cannot tell apart,
        never in the other modes."""
        self.cfg = cfg
        self.agents = agents
        self.admission = admission  # the served Arbiter's (ArbiterActor); None: every task is taken
        # The panel: every view of every agent votes as one member, named <agent>/<view>.
        self.panel = cfg.panel
        self.owner = {m.name: a.name for a in cfg.agents for m in a.members()}
        self.members = PanelAgents(agents, self.owner)
        a = cfg.arbiter
        self.trust = trust or TrustStore(cfg.data_path / a.trust_file, eta=a.trust_eta, floor=a.trust_floor)
        self._similarity = (
            EmbeddingSimilarity(embedder, min_similarity=a.equivalence_min_similarity)
            if a.equivalence == "embedding"
            else None
        )
        self.adaptation = self._adaptation()

    def _adaptation(self) -> Adaptation | None:
        """``arbiter.adapt``'s adaptation of the profile (None when off), stored in ``adapt_file``."""
        return adaptation_from_config(self.cfg)

    def _profile(self, choices: bool = True, adapted: bool = True) -> Profile | None:
        """The profile in force: ``arbiter.profile`` for a task with choices, its weights adapted
        when ``arbiter.adapt`` is on (and ``adapted``); ``arbiter.free_text_profile`` (else that
        one) for free text."""
        path = self.cfg.arbiter.profile if choices else self.cfg.arbiter.text_profile
        if path is None:
            return None
        profile = load_profile(path)
        if self.adaptation is None or not choices or not adapted:
            return profile
        try:
            return self.adaptation.adapt(profile)
        except Exception:  # the adaptation is a refinement: the fitted profile still stands
            log.exception("could not read the adaptation; the profile as fitted decides")
            return profile

    def load_equivalence_model(self) -> None:
        """Load the embedding model now (blocking) when ``arbiter.equivalence`` is ``embedding``,
        so the first task the rules cannot group does not wait for it; otherwise nothing."""
        if self._similarity is not None:
            self._similarity.load()

    def equivalence(self, judges: Sequence[str]) -> Equivalence:
        """How this Arbiter groups equivalent answers (``arbiter.equivalence``); in ``judge`` mode
        the agents named in ``judges`` judge."""
        a = self.cfg.arbiter
        if self._similarity is not None:
            return Equivalence(self._similarity)
        if a.equivalence == "judge":
            return Equivalence(AgentJudge(self.members, judges, timeout_s=a.agent_timeout_s))
        return Equivalence()

    async def run(self, req: TaskRequest, on_event: Callable[[Event], None] | None = None) -> TaskResult:
        """Answer one task: fan out, collect within the deadlines, decide (calling the agents
        again for multi-round strategies), trace, and update the trust weights. ``on_event``
        gets each fan-out candidate as it arrives and every other trace event as it is recorded.

        Raises ``UnknownStrategy``, ``Overloaded`` (every agent full), ``NoCandidates`` (every
        agent failed) and ``TaskTimeout`` (with the trace so far) past ``req.timeout_s``."""
        a = self.cfg.arbiter
        choices = req.choices is not None
        # Free text is weighed by the profile fitted on candidates, where there is one.
        settings = (
            a if choices or a.free_text_profile is None else a.model_copy(update={"profile": a.text_profile})
        )
        strategy = build_strategy(req.strategy, settings)  # fails fast on an unknown name
        if choices and self.adaptation is not None and isinstance(strategy, Learned):
            strategy = Learned(self._profile(), a.profile)
        if self.agents.saturated():
            raise _overloaded("every pool has its sequences and queue full")
        # What a task costs depends on its kind: learned and estimated per kind.
        kind = (req.choices is not None, strategy.name, req.fanout, req.max_tokens)
        ticket = self.admission.admit(kind, req.timeout_s) if self.admission is not None else None
        session = _Session(self, req, on_event)
        answered = False
        try:
            if req.timeout_s is None:
                result = await self._arbitrate(session, strategy)
            else:
                try:
                    result = await asyncio.wait_for(self._arbitrate(session, strategy), timeout=req.timeout_s)
                except TimeoutError:
                    raise TaskTimeout(
                        f"the task ran past its timeout of {req.timeout_s:g} s; the agents were stopped. "
                        "Retry with a smaller max_tokens or a simpler strategy",
                        trace=[e.model_dump() for e in session.events],
                    ) from None
            answered = True
            return result
        finally:
            if ticket is not None and self.admission is not None:
                self.admission.done(ticket, answered)

    async def describe_agents(self, timeout_s: float = 5.0) -> list[dict]:
        """Each agent's config, pool, trust record, health and stats (``GET /v1/agents``). An
        agent that does not answer within ``timeout_s`` is ``loading`` (it may come back), one
        gone for good ``failed``; either way its stats are ``None``."""
        names = [m.name for m in self.panel]
        try:
            trust = await asyncio.to_thread(self.trust.records, names)
        except Exception:
            log.exception("could not read the trust weights")
            trust = {}
        weights = self._profile_weights(adapted=False)
        factors: dict[str, float] = {}
        if self.adaptation is not None:
            try:
                factors = await asyncio.to_thread(self.adaptation.factors)
            except Exception:
                log.exception("could not read the adaptation")

        def trusted(name: str) -> dict | None:
            t = trust.get(name)
            if t is None:
                return None
            return {"weight": round(t.weight, 6), "updates": t.updates, "agreements": t.agreements}

        async def entry(a) -> dict:
            out = {
                "name": a.name,
                "role": a.role,
                "config": a.model_dump(mode="json"),
                "pool": self.agents.pool_info(a.name),
                "trust": trusted(a.name),
                # The panel members it speaks as: each votes, has its trust and its profile weight.
                "views": [
                    {
                        "name": m.name,
                        "role": m.role,
                        "prompt_form": m.prompt_form,
                        "scoring": m.scoring,
                        "few_shot": m.few_shot,
                        "trust": trusted(m.name),
                        "profile_weight": weights.get(m.name),
                        "adaptation_factor": factors.get(m.name),
                    }
                    for m in a.members()
                ],
            }
            try:
                health, out["stats"] = await asyncio.wait_for(self.agents.status(a.name), timeout_s)
                out["health"] = health.model_dump()
            except Exception as exc:
                state = "failed" if isinstance(exc, AgentGone) else "loading"
                error = (
                    f"no answer within {timeout_s:g} s"
                    if isinstance(exc, TimeoutError)
                    else describe_failure(exc)
                )
                out["health"] = {"name": a.name, "loaded": False, "state": state, "error": error}
                out["stats"] = None
            return out

        return list(await asyncio.gather(*(entry(a) for a in self.cfg.agents)))

    async def _stop_rule(
        self, strategy: Strategy, names: list[str], choices: bool, s: _Session | None = None
    ) -> adaptive.StopRule:
        """The adaptive stop rule of ``strategy`` for this task: the members' skills from the
        profile's train accuracies, else from their trust records. Free text too takes them from
        ``arbiter.profile``: a free-text profile's accuracies are of picking among generated
        candidates (most near chance), not of answering, and would make the rule skip members
        that count in the vote."""
        profile = None
        try:
            profile = self._profile(True)
        except LegionError:
            log.exception("could not read the profile")
        records = None
        if profile is None or any(a.train_accuracy is None for a in profile.agents):
            try:
                got = await asyncio.to_thread(self.trust.records, names)
                records = {n: (r.agreements, r.updates) for n, r in got.items()}
            except Exception:
                log.exception("could not read the trust records")
        return adaptive.stop_rule(
            strategy.name,
            self.panel,
            profile,
            records,
            choices,
            self.owner,
            weights=s.weights if s is not None else None,
            standing=s.standing if s is not None else None,
            limit=s.settings.adaptive_risk if s is not None else self.cfg.arbiter.adaptive_risk,
        )

    def adaptation_summary(self) -> dict[str, Any] | None:
        """Where ``arbiter.adapt`` stands (``GET /v1/agents``); None when it is off."""
        return None if self.adaptation is None else self.adaptation.summary()

    def _profile_weights(self, choices: bool = True, adapted: bool = True) -> dict[str, float]:
        """The weights of ``_profile(choices, adapted)`` ({} without one, or unreadable)."""
        try:
            profile = self._profile(choices, adapted)
            return {} if profile is None else {k: round(v, 6) for k, v in profile.weights.items()}
        except LegionError:
            log.exception("could not read the profile")
            return {}

    def stream(self, req: TaskRequest) -> AsyncIterator[Event | TaskResult]:
        """``run``'s events as they happen, then its result; its errors after the events."""
        return relay(lambda emit: self.run(req, emit))

    async def _arbitrate(self, s: _Session, strategy: Strategy) -> TaskResult:
        names = [m.name for m in self.panel]
        profiled = self._profile_weights(s.req.choices is not None)
        trust = None
        if strategy.uses_trust or not profiled:
            try:
                trust = await asyncio.to_thread(self.trust.weights, names)
            except Exception:  # the trust store is a tie-breaker here, never a reason to fail
                if strategy.uses_trust:
                    raise
                log.exception("could not read the trust weights")
        if strategy.uses_trust:
            s.weights = trust
            s.trace("trust", weights={a: round(w, 4) for a, w in s.weights.items()})
        # Votes that tie between answers go to the members' standing: the profile's weights,
        # else the trust weights, never one model's likelihood of its own answer.
        s.standing = profiled or trust or {}
        fanout = s.req.fanout or self.cfg.arbiter.fanout
        if fanout == "adaptive" and getattr(strategy, "adaptive_fanout", False):
            s.rule = await self._stop_rule(strategy, names, choices=s.req.choices is not None, s=s)
        choice = None
        if s.req.choices is not None:
            decision, choice = await self._choose(s, strategy)
        else:
            decision = await strategy.deliberate(s)
        if s.req.output is not None or decision.answer_key in s.call_keys:
            decision.answer = _constrained_answer(s, decision.answer_key, decision.answer)
        first = s.first or s.latest
        first_ok = [c for c in first if c.ok]
        agreement = (
            sum(c.normalized == decision.answer_key for c in first_ok) / len(first_ok) if first_ok else None
        )
        metrics.arbitration(strategy.name, s.rounds, agreement)
        metrics.agents_asked("adaptive" if s.rule is not None else "all", len(s.asked), len(self.panel))
        if decision.answer_key:
            metrics.member_votes(
                {
                    c.agent: "failed"
                    if not c.ok
                    else "agreed"
                    if c.normalized == decision.answer_key
                    else "disagreed"
                    for c in first
                }
            )
        s.trace(
            "decision",
            strategy=strategy.name,
            winner=decision.answer_key,
            votes=decision.votes,
            ranking=decision.ranking,
            **decision.details,
        )
        if first and decision.answer_key:
            losses = agreement_losses(
                {c.agent: (c.normalized if c.ok else None) for c in first}, decision.answer_key
            )
            try:
                await asyncio.to_thread(self.trust.update, names, losses)
            except Exception:  # a trust update must never cost the answer
                log.exception("trust update failed")
        return TaskResult(
            id=s.req.id,
            answer=decision.answer,
            strategy=strategy.name,
            candidates=first,
            votes=decision.votes,
            latency_ms=s.now_ms(),
            missing_agents=sorted({c.agent for c in (s.first or []) if not c.ok}),
            trace=s.events,
            choice=choice,
            fanout="adaptive" if s.rule is not None else "all",
            agents_asked=len(s.asked),
            skipped_agents=s.skipped,
            adaptive_risk=None if s.risk is None else round(s.risk, 6),
        )

    async def _choose(self, s: _Session, strategy: Strategy) -> tuple[Decision, ChoiceResult]:
        """A task with choices: every member scores every choice in its own view (one call per
        agent, its members' calls batched in its engine), each member picks its best, and the
        strategy decides over those picks and scores, as ``legion eval`` decides an item."""
        req = s.req
        choices = list(req.choices or [])
        if not getattr(strategy, "decides_choices", False):
            raise InvalidChoices(
                f"strategy {strategy.name!r} asks the agents to write and argue; a task with choices is "
                "decided over their scores: use plurality, borda, approval, trust, equilibrium, learned "
                "or conflict (or leave strategy out)",
                details={"field": "strategy"},
            )
        conts = [" " + c for c in choices]
        scores = OptionScores(
            options=[str(i) for i in range(len(choices))],
            texts=choices,
            n_bytes=[len(c.encode("utf-8")) for c in conts],
            rule_applied=True,
        )
        failed: dict[str, Candidate] = {}
        s.rounds += 1
        if s.rule is None:
            await self._score_members(s, [m.name for m in self.panel], scores, failed)
        else:
            await self._adaptive_choices(s, strategy, scores, failed)
        answered = {c.agent: c for c in choice_candidates(scores, s.roles, s.standing)}
        for c in answered.values():
            c.latency_ms = s.now_ms()
        cands = [answered.get(m) or failed[m] for m in s.roles if m in answered or m in failed]
        s.first = s.latest = cands
        s.missing = set(failed)
        if cands and all(c.error_code == ErrorCode.OVERLOADED.value for c in cands):
            raise _overloaded("every agent's queue is full")
        for c in cands:
            s._stream(c)
            s._record(candidate_event(c, "choices"), streamed=True)
        if scores.loglik:
            s.trace("scores", **scores.trace())
        decision = strategy.decide(cands, s.weights, scores)
        probabilities, source = self._choice_probabilities(scores)
        index = int(decision.answer_key) if decision.answer_key else None
        confidence = probabilities[index] if index is not None else None
        abstained = None
        if index is not None and req.min_confidence is not None and confidence < req.min_confidence:
            abstained = (
                f"the decided choice {choices[index]!r} has probability {confidence:.3f}, below "
                f"min_confidence {req.min_confidence:g}"
            )
            s.trace("below_min_confidence", choice=index, confidence=round(confidence, 6))
        choice = ChoiceResult(
            choices=choices,
            index=None if abstained else index,
            confidence=None if confidence is None else round(confidence, 6),
            probabilities=[round(p, 6) for p in probabilities],
            probability_source=source,
            picks={c.agent: int(c.normalized) for c in cands if c.ok and c.normalized},
            abstained=abstained,
        )
        if index is not None:
            decision.answer = choices[index]
        if self.adaptation is not None and choice.picks:
            try:  # the picks, unlabelled, are what the adaptation learns from
                await asyncio.to_thread(self.adaptation.record, choice.picks, len(choices))
            except Exception:  # never a reason to lose the answer
                log.exception("could not record the picks for arbiter.adapt")
        return decision, choice

    async def _score_members(
        self, s: _Session, members: list[str], scores: OptionScores, failed: dict[str, Candidate]
    ) -> None:
        """``members`` score the task's choices (one call per agent, its members batched in its
        engine); their scores go into ``scores``, a failed call's members into ``failed``."""
        by_agent: dict[str, list[str]] = {}
        for m in members:
            by_agent.setdefault(self.owner[m], []).append(m)
        s.trace("choices", choices=scores.texts, agents=by_agent)
        timeout = self.cfg.arbiter.agent_timeout_s
        req = s.req

        async def scored(agent: str, ms: list[str]) -> list[ChoiceScores]:
            call = self.agents.score_choices(agent, req.task, list(scores.texts), ms, req.context)
            try:
                return await asyncio.wait_for(call, timeout)
            except TimeoutError:
                raise TimeoutError(f"no scores within agent_timeout_s={timeout}") from None

        got = await asyncio.gather(*(scored(a, ms) for a, ms in by_agent.items()), return_exceptions=True)
        for ms, result in zip(by_agent.values(), got, strict=True):
            if isinstance(result, BaseException):
                error = str(result) if isinstance(result, TimeoutError) else describe_failure(result)
                code = result.code.value if isinstance(result, LegionError) else None
                for m in ms:
                    failed[m] = Candidate(
                        agent=m, role=s.roles[m], error=error, error_code=code, latency_ms=s.now_ms()
                    )
                continue
            for cs in result:
                scores.loglik[cs.member] = cs.scores
                scores.n_tokens[cs.member] = cs.n_tokens

    async def _adaptive_choices(
        self, s: _Session, strategy: Strategy, scores: OptionScores, failed: dict[str, Candidate]
    ) -> None:
        """Choices scored in waves until the vote is settled: after each wave, the strategy's
        leader over the members so far and the risk that the full panel decides otherwise (by the
        profile's combined scores for ``learned``, else by the Bayes vote of the members' picks)."""
        rule = s.rule
        assert rule is not None

        async def ask(wave: list[str]) -> None:
            await self._score_members(s, wave, scores, failed)

        def look(asked: list[str], remaining: list[str]) -> adaptive.Settlement:
            cands = choice_candidates(scores, {m: s.roles[m] for m in asked}, s.standing)
            votes = {m: None for m in asked} | {c.agent: c.normalized for c in cands}

            def decide() -> str | None:
                return (strategy.decide(cands, s.weights, scores).answer_key or None) if cands else None

            return rule.look_choices(scores, votes, decide, remaining)

        await s.in_waves(ask, look)

    def _choice_probabilities(self, scores: OptionScores) -> tuple[list[float], str]:
        """P(choice): the profile's fitted combination of the members' scores where there is a
        profile, else the mean over the members of each one's softmax over its scores."""
        n = len(scores.options)
        if not scores.loglik:
            return [1.0 / n] * n, "uniform"
        profile = self._profile()
        if profile is not None:
            got = learned_distribution(scores, profile, scores.options)
            if got is not None:
                return [float(p) for p in got[0]], "profile"
        each = [_softmax_list(v) for v in scores.loglik.values()]
        return [sum(p[i] for p in each) / len(each) for i in range(n)], "mean"
