"""One agent without Ray: its engine, the views it speaks as, its counters.

An agent owns one engine and speaks as each of its views (``AgentConfig.members``): a request
names the member, whose role prompt, exemplars and sampling build the prompt; the members'
requests share the engine's continuous batch and its prefix cache. ``Agent`` loads its model
on a background thread so that health checks answer while it loads; ``actors.agent.AgentActor``
is the Ray shell around it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from legion.config import AgentConfig
from legion.engine import views
from legion.engine.chat_template import ChatTemplate, chat_template_for, read_model_chat_info
from legion.engine.constrained import instruction
from legion.engine.llama import LlamaEngine, SamplingParams, ScoredContinuation, model_file
from legion.engine.preflight import check_model
from legion.engine.prompts import DATA_NOTICE, frame_as_data, neutralize, prompt_markers, quote_as_data
from legion.errors import Cancelled, InvalidRequest, LegionError, LlamaUnusable, ModelLoadError, NotReady
from legion.messages import (
    AgentHealth,
    AgentStats,
    ChatTurn,
    ChoiceScores,
    CompletionRequest,
    GenerateRequest,
    Generation,
)

log = logging.getLogger(__name__)

# How often a call waiting on its engine work asks whether its caller cancelled it.
CANCEL_POLL_S = 0.05

SHIPPED_SHOTS = Path(__file__).resolve().parent / "data" / "arc_easy_train.jsonl"


@lru_cache(maxsize=8)
def _exemplar_pool(path: str) -> tuple[views.Item, ...]:
    return tuple(views.load_items(path))


def exemplar_pool(cfg: AgentConfig) -> tuple[views.Item, ...]:
    """The items a member's ``few_shot`` exemplars are drawn from: its ``shots`` file, else the
    ARC-Easy train split Legion ships (``legion/data``); none for a zero-shot member."""
    if not cfg.few_shot:
        return ()
    return _exemplar_pool(str(Path(cfg.shots).expanduser() if cfg.shots else SHIPPED_SHOTS))


def member_prefix(cfg: AgentConfig, shots: Sequence[views.Item] | None = None) -> str:
    """What a member puts before every multiple-choice item: its role prompt and its exemplars in
    its prompt form (``legion eval`` builds the same, ``shots`` replacing the member's pool)."""
    pool = exemplar_pool(cfg) if shots is None else shots
    return cfg.role_prompt + views.exemplars(cfg, pool)


def _speaking(cfg: AgentConfig) -> AgentConfig:
    """The member as it writes answers: its exemplars, asked and answered in the question form
    (the letters and cloze forms are for scoring given choices), after its role prompt."""
    if not cfg.few_shot:
        return cfg
    pool = exemplar_pool(cfg)
    shown = "".join(views.solved(x, "qa") for x in views.exemplar_items(cfg, pool))
    return cfg.model_copy(update={"role_prompt": cfg.role_prompt + shown})


def build_prompt(
    cfg: AgentConfig,
    task: str,
    context: str = "",
    *,
    chat: ChatTemplate | None = None,
    history: Sequence[ChatTurn] = (),
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt an agent sends its model for ``task``, in the agent's ``prompt_format``.

    completion: ``prompt_template`` as plain text; earlier turns in ``history``, if any, are
    quoted before the context. chat: ``chat_turns`` rendered by ``chat``, the agent's template
    (``Agent.prompt`` passes it). The task, the context and the history are data, never
    instructions: ``legion.engine.prompts`` marks them so (a notice, the context between delimiters,
    no forged turns or control tokens in user text).
    """
    if cfg.prompt_format == "chat":
        if chat is None:
            raise ValueError(f"agent {cfg.name} has prompt_format chat: pass its ChatTemplate (Agent.prompt)")
        return chat.render(chat_turns(cfg, task, context, history), add_generation_prompt=True, tools=tools)
    if history:
        lines = [f"{'Assistant' if t.role == 'assistant' else 'User'}: {t.content.strip()}" for t in history]
        context = "Conversation so far:\n" + "\n".join(lines) + (f"\n\n{context}" if context.strip() else "")
    body = cfg.prompt_template.format(role_prompt=cfg.role_prompt, task=neutralize(task.strip()))
    return frame_as_data(body, context)


def chat_turns(
    cfg: AgentConfig, task: str, context: str = "", history: Sequence[ChatTurn] = ()
) -> list[ChatTurn]:
    """A chat agent's conversation: its role prompt and the data notice as the system message,
    the history as turns, then the task (after the context, quoted as data) as the user turn."""
    role = cfg.role_prompt.strip()
    system = f"{role}\n\n{DATA_NOTICE.strip()}" if role else DATA_NOTICE.strip()
    turns = [ChatTurn(role="system", content=system)]
    turns += [ChatTurn(role=t.role, content=neutralize(t.content.strip())) for t in history]
    quoted = f"{quote_as_data(context)}\n\n" if context.strip() else ""
    turns.append(ChatTurn(role="user", content=quoted + neutralize(task.strip())))
    return turns


class Agent:
    """An agent: builds prompts from its role, generates and scores with its engine."""

    def __init__(self, cfg: AgentConfig, *, load_in_background: bool = True):
        self.cfg = cfg
        # Each member as it writes (exemplars in its role prompt), by name; the first answers a
        # request that names none.
        self.members = {m.name: m for m in cfg.members()}
        self._writers = {name: _speaking(m) for name, m in self.members.items()}
        self._engine: LlamaEngine | None = None
        self._chat: ChatTemplate | None = None  # prompt_format chat: set while loading
        self._load_error: str | None = None
        self._loaded = threading.Event()
        self._stats = AgentStats()
        self._stats_lock = threading.Lock()
        # Generations in flight by prompt and sampling: two members whose prompts come out the
        # same (views that differ only in how they score choices) share one decode.
        self._inflight: dict[tuple, Any] = {}
        # How many calls wait on each engine future: a shared decode stops only when every one
        # of its callers has cancelled.
        self._waiters: dict[Any, int] = {}
        if load_in_background:
            threading.Thread(target=self._load, name=f"load-{cfg.name}", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            path = model_file(self.cfg)
            # A llama.cpp built for another CPU dies by a signal: find out in a child process,
            # so this agent reports why instead of dying (and being restarted) in a loop.
            check = check_model(path)
            if not check.ok:
                raise LlamaUnusable(check.message)
            chat = next((m for m in self.members.values() if m.prompt_format == "chat"), None)
            if chat is not None:  # no template: fail before loading the weights
                self._chat = chat_template_for(chat, read_model_chat_info(path))
            engine = LlamaEngine(
                path,
                n_ctx=self.cfg.n_ctx,
                n_batch=self.cfg.n_batch,
                n_threads=self.cfg.threads,
                n_gpu_layers=self.cfg.n_gpu_layers,
                n_parallel=self.cfg.n_parallel,
                max_queue=self.cfg.max_queue,
                prefix_cache_slots=self.cfg.prefix_cache_slots,
            )
            try:  # ready means answering: decode one token through the engine before saying so
                engine.generate("Hello", SamplingParams(max_tokens=1, temperature=0.0))
            except Exception:
                engine.close()
                raise
            self._engine = engine
            log.info(
                "agent %s loaded %s in %.1fs (%d threads)",
                self.cfg.name,
                self._engine.model_path,
                time.perf_counter() - t0,
                self.cfg.threads,
            )
        except Exception as exc:  # kept and reported by health(); the agent never serves
            self._load_error = exc.message if isinstance(exc, LegionError) else str(exc)
            log.exception("agent %s failed to load its model", self.cfg.name)
        finally:
            self._loaded.set()

    def engine(self, timeout_s: float | None = None) -> LlamaEngine:
        """The loaded engine; waits up to ``timeout_s`` for the model to finish loading."""
        if not self._loaded.wait(timeout_s):
            raise NotReady(f"agent {self.cfg.name} is still loading its model; retry shortly")
        if self._engine is None:
            raise ModelLoadError(f"agent {self.cfg.name} could not load its model: {self._load_error}")
        return self._engine

    def member(self, view: str | None = None) -> AgentConfig:
        """The member named ``view`` as it writes answers (its exemplars in its role prompt);
        ``None``: the first. An unknown name is an ``InvalidRequest`` naming the members."""
        if view is None:
            return next(iter(self._writers.values()))
        try:
            return self._writers[view]
        except KeyError:
            raise InvalidRequest(
                f"agent {self.cfg.name} has no view {view!r}; its members: {', '.join(self.members)}"
            ) from None

    def _stops(self, cfg: AgentConfig, asked: Sequence[str] | None = None) -> tuple[str, ...]:
        """The member's ``sampling.stop``, a request's own stops, and its prompt's end markers. A
        chat request's stops add to the agent's: those end its answers where its prompt does."""
        configured = [*cfg.sampling.stop, *(asked or ())]
        if cfg.prompt_format == "chat" and self._chat is not None:  # the template's end markers
            return tuple(dict.fromkeys([*configured, *self._chat.stop]))
        # A completion prompt's own markers end an answer where its next turn would begin.
        return tuple(dict.fromkeys([*configured, *prompt_markers(cfg.prompt_template)]))

    def sampling(self, req: GenerateRequest) -> SamplingParams:
        cfg = self.member(req.view)
        s = cfg.sampling
        return SamplingParams(
            max_tokens=req.max_tokens or s.max_tokens,
            temperature=s.temperature if req.temperature is None else req.temperature,
            top_p=s.top_p if req.top_p is None else req.top_p,
            top_k=s.top_k,
            seed=s.seed if req.seed is None else req.seed,
            stop=self._stops(cfg, req.stop),
            grammar=None if req.output is None else req.output.grammar,
        )

    def prompt(
        self,
        task: str,
        context: str = "",
        history: Sequence[ChatTurn] = (),
        timeout_s: float | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        view: str | None = None,
    ) -> str:
        """The prompt of member ``view`` for ``task`` (see ``build_prompt``); a chat member's
        needs the template, so it waits up to ``timeout_s`` for the model to load."""
        cfg = self.member(view)
        if cfg.prompt_format == "chat":
            self.engine(timeout_s)
        return build_prompt(cfg, task, context, chat=self._chat, history=history, tools=tools)

    def prompt_for_engine(
        self,
        task: str,
        context: str = "",
        history: Sequence[ChatTurn] = (),
        timeout_s: float | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        view: str | None = None,
    ) -> str | list[int]:
        """``prompt`` as the engine takes it: a completion prompt as text (tokenized as text);
        a chat prompt as tokens, its template's markers as control tokens and the messages'
        text as text, so user text never becomes a control token (``ChatTemplate.render_pieces``)."""
        cfg = self.member(view)
        if cfg.prompt_format != "chat":
            return self.prompt(task, context, history, view=view)
        engine = self.engine(timeout_s)
        assert self._chat is not None
        pieces = self._chat.render_pieces(chat_turns(cfg, task, context, history), tools=tools)
        tokens = engine.tokenize("", add_bos=True)  # BOS, where the model takes one
        for piece in pieces:
            tokens += [piece] if isinstance(piece, int) else engine.tokenize(piece, add_bos=False)
        return tokens

    def generate(self, req: GenerateRequest, timeout_s: float | None = None) -> Generation:
        """One completion of ``req`` (``req.n`` is ignored; see ``generate_n``)."""
        return self.generate_n(req.model_copy(update={"n": 1}), timeout_s)[0]

    def generate_n(
        self,
        req: GenerateRequest,
        timeout_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        """``req.n`` completions of one prompt, decoded together with the engine's other work.

        ``timeout_s`` bounds the wait for the model to load; ``req.timeout_s`` bounds decoding.
        ``cancelled`` (the Ray shell's: was this call cancelled?) is asked while it waits; once
        it says yes, the decode stops (unless another call shares it) and ``Cancelled`` is raised.
        """
        engine = self.engine(timeout_s)
        # A template that renders tools itself gets them; any other prompt gets Legion's words.
        tools = req.tools if req.tools and self._chat is not None and self._chat.takes_tools else None
        said = None
        if tools is None:
            said = req.instruction or (instruction(req.output) if req.output is not None else None)
        task = req.task if said is None else f"{req.task}\n\n{said}"
        prompt = self.prompt_for_engine(task, req.context, req.history, tools=tools, view=req.view)
        params = self.sampling(req)
        same = (prompt if isinstance(prompt, str) else tuple(prompt), repr(params), req.n, req.timeout_s)
        return self._counted(engine, prompt, params, req.n, req.timeout_s, share=same, cancelled=cancelled)

    def complete(
        self,
        req: CompletionRequest,
        timeout_s: float | None = None,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """The model's continuation of ``req.prompt``, the client's own text as it is (no role
        prompt, no template; tokenized as text, so it holds no control tokens). Sampling
        fields left ``None`` come from the agent's config; ``req.stop`` replaces its stops.
        ``on_text`` gets the text piece by piece as it is decoded (``LlamaEngine.submit_generate``)."""
        engine = self.engine(timeout_s)
        s = self.member().sampling
        params = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=s.temperature if req.temperature is None else req.temperature,
            top_p=s.top_p if req.top_p is None else req.top_p,
            top_k=s.top_k,
            seed=s.seed if req.seed is None else req.seed,
            stop=tuple(req.stop),
            top_logprobs=req.top_logprobs,
        )
        (gen,) = self._counted(engine, req.prompt, params, 1, req.timeout_s, on_text, cancelled=cancelled)
        if req.echo_logprobs:
            gen.prompt_token_texts, gen.prompt_token_logprobs = engine.prompt_logprobs(req.prompt)
        return gen

    def complete_stream(
        self,
        req: CompletionRequest,
        timeout_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[str | Generation]:
        """``complete``'s text piece by piece as it is decoded, then its ``Generation``; its
        errors are raised where they happen. The decode stops (``Cancelled``) once ``cancelled``
        says so, asked on the caller's thread, or when the caller stops reading."""
        pieces: queue.Queue = queue.Queue()
        done = object()
        stop = threading.Event()  # the decoding thread's view of the caller's cancel

        def run() -> None:
            try:
                pieces.put(self.complete(req, timeout_s, on_text=pieces.put, cancelled=stop.is_set))
            except BaseException as exc:  # handed to the reader, raised there
                pieces.put(exc)
            pieces.put(done)

        threading.Thread(target=run, name=f"{self.cfg.name}-stream", daemon=True).start()
        try:
            while True:
                if cancelled is not None and not stop.is_set() and cancelled():
                    stop.set()
                try:
                    item = pieces.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    continue
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # finished, failed, or the caller stopped reading: nothing more is wanted
            stop.set()

    def _counted(
        self,
        engine: LlamaEngine,
        prompt: str | list[int],
        params: SamplingParams,
        n: int,
        timeout_s: float | None,
        on_text: Callable[[str], None] | None = None,
        share: tuple | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        """``n`` generations of ``prompt``, counted in this agent's stats (in flight, errors,
        requests, tokens). With ``share``, a key of the prompt and its sampling: a request whose
        key is already being decoded waits for that decode instead of starting its own (its
        tokens are counted once)."""
        with self._stats_lock:
            future = self._inflight.get(share) if share is not None else None
            if future is not None:  # joined where it is found: a cancel sees this waiter
                self._waiters[future] = self._waiters.get(future, 0) + 1
        shared = future is not None
        with self._working():
            if future is None:
                future = engine.submit_generate(prompt, params, n, timeout_s, on_text)
                self._wait_on(future)
                if share is not None:
                    with self._stats_lock:
                        self._inflight.setdefault(share, future)
                    future.add_done_callback(lambda f: self._forget(share, f))
            (gens,) = self._results(engine, [future], cancelled)
        with self._stats_lock:
            self._stats.requests += 1
            if not shared:
                self._stats.prompt_tokens += gens[0].prompt_tokens
                self._stats.completion_tokens += sum(g.completion_tokens for g in gens)
        return [g.model_copy() for g in gens] if shared else gens

    @contextmanager
    def _working(self) -> Iterator[None]:
        """Counts one request in flight while the block runs, and an error when it raises one."""
        with self._stats_lock:
            self._stats.in_flight += 1
        try:
            yield
        except Cancelled:  # the caller's choice, not the agent's failure
            raise
        except LegionError:
            with self._stats_lock:
                self._stats.errors += 1
            raise
        finally:
            with self._stats_lock:
                self._stats.in_flight -= 1

    def _results(
        self, engine: LlamaEngine, futures: Sequence[Any], cancelled: Callable[[], bool] | None
    ) -> list:
        """The results of the engine's ``futures`` (each counted in ``_waiters`` by its caller),
        in order. With ``cancelled``, asked every CANCEL_POLL_S while they run: once it says yes,
        each future no other call waits on is cancelled in the engine (its sequences freed; no
        later call joins it) and ``Cancelled`` is raised."""
        gave_up = False
        try:
            if cancelled is not None:
                for f in futures:
                    while not f.done():
                        if cancelled():
                            raise Cancelled("the caller cancelled this call; the engine stopped its work")
                        try:
                            f.result(timeout=CANCEL_POLL_S)
                        except FutureTimeout:
                            pass
            return [f.result() for f in futures]
        except Cancelled:
            gave_up = True
            raise
        finally:
            self._leave(engine, futures, cancel=gave_up)

    def _wait_on(self, future: Any) -> None:
        """Count one more call waiting on the engine's ``future`` (``_results`` counts it out)."""
        with self._stats_lock:
            self._waiters[future] = self._waiters.get(future, 0) + 1

    def _leave(self, engine: LlamaEngine, futures: Sequence[Any], cancel: bool) -> None:
        """One call stops waiting on ``futures``; with ``cancel``, those no other call waits on
        are cancelled in the engine (their sequences freed), and no later call joins them."""
        with self._stats_lock:
            alone = [f for f in futures if self._waiters.get(f, 0) <= 1] if cancel else []
            for key in [k for k, f in self._inflight.items() if f in alone]:
                del self._inflight[key]
            for f in futures:
                left = self._waiters.get(f, 0) - 1
                if left > 0:
                    self._waiters[f] = left
                else:
                    self._waiters.pop(f, None)
        for f in alone:
            engine.cancel(f)

    def _forget(self, share: tuple, future: Any) -> None:
        with self._stats_lock:
            if self._inflight.get(share) is future:
                del self._inflight[share]

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Block until loading has finished (or failed); False on timeout."""
        return self._loaded.wait(timeout_s)

    def score(
        self,
        task: str,
        context: str,
        continuations: list[str],
        timeout_s: float | None = None,
        view: str | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[ScoredContinuation]:
        """Log-likelihood of each continuation after member ``view``'s own prompt for ``task``
        and ``context`` (its prompt format and template: a chat prompt ends where its reply
        begins). ``cancelled`` as for ``generate_n``."""
        prompt = self.prompt_for_engine(task, context, timeout_s=timeout_s, view=view)
        if not continuations:
            return []
        engine = self.engine(timeout_s)
        future = engine.submit_score(prompt, continuations)
        self._wait_on(future)
        (scored,) = self._results(engine, [future], cancelled)
        return scored

    def score_choices(
        self,
        task: str,
        choices: Sequence[str],
        members: Sequence[str] | None = None,
        context: str = "",
        timeout_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[ChoiceScores]:
        """Each of ``members`` (default: all) scores ``choices`` as the answer to ``task`` in its
        own view, as ``legion eval`` scores an item (``legion.engine.views.view_calls``: its prompt
        form, its exemplars, its rule). The calls of every member go to the engine at once, so
        they share its batch, and a call two members make alike (one text, two rules) runs once.
        ``context`` (documents, history) is quoted as data before each member's rendering.
        ``cancelled`` as for ``generate_n``: the calls not yet scored are dropped."""
        engine = self.engine(timeout_s)
        names = list(members) if members is not None else list(self.members)
        for n in names:
            self.member(n)  # an unknown member is refused before any work
        item = views.question_item(neutralize(task.strip()), [neutralize(c) for c in choices])
        quoted = f"{quote_as_data(context)}\n\n" if context.strip() else ""
        plans = {
            n: views.view_calls(self.members[n], quoted + member_prefix(self.members[n]), item) for n in names
        }
        futures: dict[tuple[str, tuple[str, ...]], Any] = {}
        with self._working():
            try:
                for calls in plans.values():
                    for ctx, conts in calls:
                        key = (ctx, tuple(conts))
                        if key not in futures:
                            futures[key] = engine.submit_score(ctx, conts)
                            self._wait_on(futures[key])
            except BaseException:  # one call refused (a full queue): the others are not wanted
                self._leave(engine, list(futures.values()), cancel=True)
                raise
            done = dict(zip(futures, self._results(engine, list(futures.values()), cancelled), strict=True))
        out = []
        for n, calls in plans.items():
            got = [done[(ctx, tuple(conts))] for ctx, conts in calls]
            logprobs = [[s.logprob for s in g] for g in got]
            n_tokens = [s.n_tokens for s in got[0]]
            scores = views.view_scores(self.members[n].scoring, calls, logprobs, n_tokens)
            out.append(ChoiceScores(member=n, scores=scores, loglik=logprobs[0], n_tokens=n_tokens))
        with self._stats_lock:
            self._stats.requests += 1
        return out

    def health(self) -> AgentHealth:
        loaded = self._engine is not None
        state = "ready" if loaded else ("failed" if self._loaded.is_set() else "loading")
        model = self._engine.describe() if self._engine is not None else None
        return AgentHealth(
            name=self.cfg.name, loaded=loaded, state=state, error=self._load_error, model=model
        )

    def stats(self) -> dict:
        """Request counters, plus the engine's batch counters once the model is loaded.

        ``tokens_per_s`` is the engine's: tokens decoded over the time it had work, so
        requests decoded together are not counted as separate waits.
        """
        with self._stats_lock:
            s = self._stats.model_copy()
        out = s.model_dump()
        out["tokens_per_s"] = 0.0
        if self._engine is not None:
            out["engine"] = self._engine.stats()
            out["tokens_per_s"] = out["engine"]["tokens_per_s"]
        return out
