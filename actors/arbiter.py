"""``ArbiterActor``: fans a task out to every agent through object refs and arbitrates.

An async actor, so one Arbiter serves many tasks at once. A slow or dead agent never blocks
the answer: the Arbiter waits at most ``agent_timeout_s`` and answers from what arrived,
naming the missing agents in the trace. Multi-round strategies (debate, decomposition,
conflict resolution) call the agents again through ``_Session``; every round is traced.
After each task the agents' trust weights take one Hedge step (agreement with the decision).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.pool import AgentPool
from legion import metrics
from legion.agent import build_prompt
from legion.arbitration import OptionScores, build_strategy, normalize_answer
from legion.config import LegionConfig
from legion.equivalence import canonical
from legion.errors import ErrorCode, LegionError
from legion.logging_setup import configure_logging
from legion.messages import Candidate, GenerateRequest, TaskRequest, TaskResult, TraceEvent
from legion.trust import TrustStore, agreement_losses

log = logging.getLogger(__name__)


def _agent_error(exc: BaseException) -> str:
    if isinstance(exc, RayTaskError):
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, LegionError):
            return cause.message
        return f"agent raised {type(cause or exc).__name__}: {cause or exc}"
    if isinstance(exc, RayActorError):
        return "agent actor died during the task (it restarts and rejoins)"
    return f"{type(exc).__name__}: {exc}"


class _Session:
    """One task's access to the agents (``legion.deliberation.Session``), with its trace."""

    def __init__(
        self,
        arbiter: ArbiterActor,
        req: TaskRequest,
        weights: Mapping[str, float] | None,
        sink: asyncio.Queue | None = None,
    ):
        self._arb = arbiter
        # ``run_stream``'s queue: fan-out candidates as they arrive, every other trace event.
        self.sink = sink
        self.req = req
        self.task = req.task
        self.settings = arbiter.cfg.arbiter
        self.roles = {a.name: a.role for a in arbiter.cfg.agents}
        self.weights = weights
        self.t0 = time.perf_counter()
        self.events: list[TraceEvent] = []
        self.first: list[Candidate] | None = None
        self.latest: list[Candidate] = []
        self.missing: set[str] = set()
        self.rounds = 0  # rounds of agent calls, for the metrics

    def now_ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000, 2)

    def trace(self, step: str, **data: Any) -> None:
        self._record(TraceEvent(step=step, at_ms=self.now_ms(), data=data))

    def _record(self, event: TraceEvent, streamed: bool = False) -> None:
        self.events.append(event)
        if self.sink is not None and not streamed:
            self.sink.put_nowait(event)

    def _stream(self, candidate: Candidate) -> None:
        if self.sink is not None:
            self.sink.put_nowait(candidate)

    def request(self, task: str, context: str = "") -> GenerateRequest:
        ctx = "\n\n".join(x for x in (self.req.context.strip(), context.strip()) if x)
        return GenerateRequest(
            task=task,
            max_tokens=self.req.max_tokens,
            context=ctx,
            request_id=self.req.request_id,
            timeout_s=self.remaining_s(),
        )

    def remaining_s(self) -> float | None:
        """What is left of the task's ``timeout_s`` (None: no deadline)."""
        if self.req.timeout_s is None:
            return None
        return max(0.0, self.req.timeout_s - (time.perf_counter() - self.t0))

    async def fanout(self) -> list[Candidate]:
        if self.first is None:
            gen = self.request(self.task)
            self.first = await self._gather({a: gen for a in self.roles}, "fanout", trace_each=True)
            self.missing = {c.agent for c in self.first if not c.ok}
        return self.first

    async def ask(self, requests: Mapping[str, GenerateRequest], step: str) -> list[Candidate]:
        return await self._gather(requests, step, trace_each=False)

    async def _gather(
        self, requests: Mapping[str, GenerateRequest], step: str, trace_each: bool
    ) -> list[Candidate]:
        self.rounds += 1
        refs: dict[str, ray.ObjectRef] = {}
        out: dict[str, Candidate] = {}
        for name, gen in requests.items():
            try:
                refs[name] = self._arb._agent(name).generate.remote(gen)
            except ValueError as exc:  # the named actor is gone
                out[name] = Candidate(agent=name, role=self.roles[name], error=str(exc))
        self.trace(
            step,
            agents=list(refs),
            **({} if trace_each else {"tasks": {a: r.task for a, r in requests.items()}}),
        )

        streamed: set[str] = set()

        async def collect(name: str, ref: ray.ObjectRef) -> Candidate:
            c = await answer(name, ref)
            if trace_each:  # a fan-out candidate goes to the stream the moment it arrives
                streamed.add(name)
                self._stream(c)
            return c

        async def answer(name: str, ref: ray.ObjectRef) -> Candidate:
            try:
                gen = await ref
                return Candidate(
                    agent=name,
                    role=self.roles[name],
                    text=gen.text.strip(),
                    normalized=normalize_answer(gen.text),
                    score=round(gen.mean_logprob, 4),
                    prompt_tokens=gen.prompt_tokens,
                    completion_tokens=gen.completion_tokens,
                    latency_ms=self.now_ms(),
                )
            except (RayTaskError, RayActorError, GetTimeoutError) as exc:
                cause = getattr(exc, "cause", None)
                return Candidate(
                    agent=name,
                    role=self.roles[name],
                    error=_agent_error(exc),
                    error_code=cause.code.value if isinstance(cause, LegionError) else None,
                    latency_ms=self.now_ms(),
                )

        timeout = self.settings.agent_timeout_s
        tasks = {asyncio.ensure_future(collect(n, r)): n for n, r in refs.items()}
        done, pending = (await asyncio.wait(tasks, timeout=timeout)) if tasks else (set(), set())
        for t in done:
            c = t.result()
            out[c.agent] = c
        for t in pending:
            name = tasks[t]
            t.cancel()
            ray.cancel(refs[name])
            out[name] = Candidate(
                agent=name,
                role=self.roles[name],
                error=f"no answer within agent_timeout_s={timeout}",
                latency_ms=self.now_ms(),
            )
        # Equivalent answers ("4", "2 + 2 = 4") share one normalized key, so a vote is not split.
        ordered, merged = canonical([out[n] for n in requests])
        if merged:
            self.trace("equivalent_answers", step=step, groups=merged)
        for c in ordered:
            if trace_each and c.agent not in streamed:  # gone, or timed out
                self._stream(c)
            if trace_each or not c.ok:
                self._record(
                    TraceEvent(
                        step="candidate" if c.ok else "agent_failed",
                        at_ms=c.latency_ms,
                        data={"agent": c.agent, "normalized": c.normalized, "score": c.score}
                        if c.ok
                        else {"agent": c.agent, "error": c.error, "during": step},
                    ),
                    streamed=trace_each,
                )
            else:
                self.trace(f"{step}_answer", agent=c.agent, normalized=c.normalized, text=c.text)
        self.latest = ordered
        return ordered

    async def option_scores(self, candidates: Sequence[Candidate]) -> OptionScores | None:
        """Every answering agent's log-likelihood of every distinct answer, given its own prompt
        for the task, and given the same prompt without the question (for calibration)."""
        ok = [c for c in candidates if c.ok and c.normalized]
        options: dict[str, str] = {}
        for c in ok:
            options.setdefault(c.normalized, c.text.splitlines()[0].strip() if c.text.strip() else c.text)
        if not options:
            return None
        keys, texts = list(options), list(options.values())
        conts = [" " + t for t in texts]
        agents = [a for a in self.cfg_agents() if a.name not in self.missing]
        refs = {}
        for a in agents:
            h = self._arb._agent(a.name)
            prompt = build_prompt(a, self.task, self.req.context)
            empty = build_prompt(a, "N/A")
            refs[a.name] = (h.score.remote(prompt, conts), h.score.remote(empty, conts))
        scores = OptionScores(options=keys, texts=texts, n_bytes=[len(c.encode()) for c in conts])
        t0 = self.now_ms()
        for name, (r_task, r_prior) in refs.items():
            try:
                task_s, prior_s = await asyncio.wait_for(
                    asyncio.gather(r_task, r_prior), timeout=self.settings.agent_timeout_s
                )
            except (RayTaskError, RayActorError, GetTimeoutError, TimeoutError) as exc:
                self.trace("agent_failed", agent=name, error=_agent_error(exc), during="scoring")
                continue
            scores.loglik[name] = [s.logprob for s in task_s]
            scores.prior[name] = [s.logprob for s in prior_s]
            scores.n_tokens[name] = [s.n_tokens for s in task_s]
        self.trace("scores", scoring_ms=round(self.now_ms() - t0, 2), **scores.trace())
        return scores if scores.loglik else None

    def cfg_agents(self):
        return self._arb.cfg.agents


class ArbiterActor:
    def __init__(self, config: dict, agent_actor_names: dict[str, str], namespace: str):
        self.cfg = LegionConfig(**config)
        configure_logging(self.cfg.log_level, self.cfg.log_format)  # this worker's log format
        self._names = agent_actor_names
        self._namespace = namespace
        # One pool of replicas per agent; every ingress replica reaches them through this Arbiter.
        self._pools = {
            a.name: AgentPool(self.cfg, a, agent_actor_names[a.name], namespace) for a in self.cfg.agents
        }
        self._autoscaler: asyncio.Task | None = None
        a = self.cfg.arbiter
        self._trust = TrustStore(self.cfg.data_path / a.trust_file, eta=a.trust_eta, floor=a.trust_floor)

    def _agent(self, name: str) -> AgentPool:
        """The agent's pool; it takes calls like an actor handle (``.generate.remote(req)``)."""
        self._ensure_autoscaler()
        return self._pools[name]

    def _ensure_autoscaler(self) -> None:
        if self._autoscaler is None or self._autoscaler.done():
            self._autoscaler = asyncio.get_running_loop().create_task(self._autoscale_loop())

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.arbiter.autoscale_interval_s)
            for name, pool in self._pools.items():
                try:
                    await asyncio.to_thread(pool.autoscale)
                    metrics.pool_size(name, pool.size)
                except Exception:  # autoscaling must never take the Arbiter down
                    log.exception("autoscaling agent %s failed", name)

    def _overloaded(self, detail: str) -> LegionError:
        return LegionError(
            f"every agent is saturated ({detail}); retry after the Retry-After delay",
            code=ErrorCode.OVERLOADED,
            details={"retry_after_s": 2},
        )

    async def run(self, req: TaskRequest) -> TaskResult:
        """Answer one task: fan out, collect within the timeout, decide (calling the agents
        again for multi-round strategies), trace, and update the trust weights.

        Raises OVERLOADED (503) when every agent's pool is full, and TIMEOUT (504, with the
        trace so far in ``details``) when ``req.timeout_s`` runs out."""
        return await self._answer(req)

    async def run_stream(self, req: TaskRequest) -> AsyncIterator[Candidate | TraceEvent | TaskResult]:
        """``run`` as a Ray streaming generator (``.options(num_returns="streaming")``): each
        fan-out ``Candidate`` as it arrives, every other ``TraceEvent`` as it is recorded, then
        the ``TaskResult``. Errors are ``run``'s, raised after the items already yielded."""
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._answer(req, queue))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after the task's last item
        try:
            while (item := await queue.get()) is not None:
                yield item
            yield task.result()
        finally:
            task.cancel()  # the caller went away (or cancelled): stop the agents' work too

    async def _answer(self, req: TaskRequest, sink: asyncio.Queue | None = None) -> TaskResult:
        strategy = build_strategy(req.strategy, self.cfg.arbiter)  # fails fast on an unknown name
        if all(self._agent(n).saturated() for n in self._pools):
            raise self._overloaded("every pool has its sequences and queue full")
        if req.timeout_s is None:
            return await self._run(req, strategy, sink=sink)
        holder: dict = {}
        try:
            return await asyncio.wait_for(self._run(req, strategy, holder, sink), timeout=req.timeout_s)
        except TimeoutError:
            s = holder.get("session")
            trace = [e.model_dump() for e in s.events] if s else []
            raise LegionError(
                f"the task ran past its timeout of {req.timeout_s:g} s; the agents were stopped. "
                "Retry with a smaller max_tokens or a simpler strategy",
                code=ErrorCode.TIMEOUT,
                details={"trace": trace},
            ) from None

    async def _run(
        self, req: TaskRequest, strategy, holder: dict | None = None, sink: asyncio.Queue | None = None
    ) -> TaskResult:
        names = [a.name for a in self.cfg.agents]
        weights = await asyncio.to_thread(self._trust.weights, names) if strategy.uses_trust else None
        s = _Session(self, req, weights, sink)
        if holder is not None:
            holder["session"] = s
        if weights is not None:
            s.trace("trust", weights={a: round(w, 4) for a, w in weights.items()})
        if hasattr(strategy, "deliberate"):
            decision = await strategy.deliberate(s)
        else:
            cands = await s.fanout()
            if cands and all(c.error_code == ErrorCode.OVERLOADED.value for c in cands):
                raise self._overloaded("every agent's queue is full")
            scores = None
            if getattr(strategy, "needs_scores", False) and len({c.normalized for c in cands if c.ok}) > 1:
                scores = await s.option_scores(cands)
            decision = strategy.decide(cands, weights, scores)
        first_ok = [c for c in (s.first or s.latest) if c.ok]
        agreement = (
            sum(c.normalized == decision.answer_key for c in first_ok) / len(first_ok) if first_ok else None
        )
        metrics.arbitration(strategy.name, s.rounds, agreement)
        s.trace(
            "decision",
            strategy=strategy.name,
            winner=decision.answer_key,
            votes=decision.votes,
            ranking=decision.ranking,
            **decision.details,
        )
        first = s.first or s.latest
        if first and decision.answer_key:
            losses = agreement_losses(
                {c.agent: (c.normalized if c.ok else None) for c in first}, decision.answer_key
            )
            try:
                await asyncio.to_thread(self._trust.update, names, losses)
            except Exception:  # a trust update must never cost the answer
                log.exception("trust update failed")
        candidates = s.latest if s.first is None else s.first
        missing = sorted({c.agent for c in (s.first or []) if not c.ok})
        return TaskResult(
            id=req.id,
            answer=decision.answer,
            strategy=strategy.name,
            candidates=candidates,
            votes=decision.votes,
            latency_ms=s.now_ms(),
            missing_agents=missing,
            trace=s.events,
        )

    async def agents(self) -> list[dict]:
        """Each agent's config, health, stats and trust weight (health ``None`` if it did not answer)."""
        names = [a.name for a in self.cfg.agents]
        try:
            trust = await asyncio.to_thread(self._trust.records, names)
        except Exception:
            log.exception("could not read the trust weights")
            trust = {}
        out = []
        for a in self.cfg.agents:
            entry = {
                "name": a.name,
                "role": a.role,
                "config": a.model_dump(mode="json"),
                "pool": self._pools[a.name].info(),
            }
            t = trust.get(a.name)
            entry["trust"] = (
                {"weight": round(t.weight, 6), "updates": t.updates, "agreements": t.agreements}
                if t
                else None
            )
            try:
                h = self._agent(a.name)
                health, stats = await asyncio.wait_for(
                    asyncio.gather(h.health.remote(), h.stats.remote()), timeout=5.0
                )
                entry["health"] = health.model_dump()
                entry["stats"] = stats
            except Exception as exc:  # an agent that is dead or restarting
                entry["health"] = {"name": a.name, "loaded": False, "error": _agent_error(exc)}
                entry["stats"] = None
            out.append(entry)
        return out

    async def ready(self) -> bool:
        return all(e["health"]["loaded"] for e in await self.agents())
