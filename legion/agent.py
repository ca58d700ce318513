"""One agent without Ray: its role prompt, its engine, its counters.

``Agent`` loads its model on a background thread so that health checks answer while it
loads; ``actors.agent.AgentActor`` is the Ray shell around it.
"""

from __future__ import annotations

import logging
import threading
import time

from legion.config import AgentConfig
from legion.engine import LlamaEngine, SamplingParams, ScoredContinuation, bundled_model_path
from legion.errors import LegionError, LlamaUnusable, ModelLoadError, NotReady
from legion.guard import frame_as_data, neutralize
from legion.messages import AgentHealth, AgentStats, GenerateRequest, Generation
from legion.preflight import check_model

log = logging.getLogger(__name__)


def build_prompt(cfg: AgentConfig, task: str, context: str = "") -> str:
    """The completion-style prompt an agent sends its model for ``task``.

    The task and the context are data, never instructions: ``legion.guard`` marks them so
    (a notice, the context between delimiters, no forged turns in the task).
    """
    body = cfg.prompt_template.format(role_prompt=cfg.role_prompt, task=neutralize(task.strip()))
    return frame_as_data(body, context)


class Agent:
    """An agent: builds prompts from its role, generates and scores with its engine."""

    def __init__(self, cfg: AgentConfig, *, load_in_background: bool = True):
        self.cfg = cfg
        self._engine: LlamaEngine | None = None
        self._load_error: str | None = None
        self._loaded = threading.Event()
        self._stats = AgentStats()
        self._stats_lock = threading.Lock()
        if load_in_background:
            threading.Thread(target=self._load, name=f"load-{cfg.name}", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            path = self.cfg.model_path or bundled_model_path()
            # A llama.cpp built for another CPU dies by a signal: find out in a child process,
            # so this agent reports why instead of dying (and being restarted) in a loop.
            check = check_model(path)
            if not check.ok:
                raise LlamaUnusable(check.message)
            engine = LlamaEngine(
                path,
                n_ctx=self.cfg.n_ctx,
                n_batch=self.cfg.n_batch,
                n_threads=self.cfg.threads,
                n_gpu_layers=self.cfg.n_gpu_layers,
                n_parallel=self.cfg.n_parallel,
                max_queue=self.cfg.max_queue,
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

    def sampling(self, req: GenerateRequest) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(
            max_tokens=req.max_tokens or s.max_tokens,
            temperature=s.temperature if req.temperature is None else req.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed if req.seed is None else req.seed,
            stop=tuple(s.stop),
        )

    def generate(self, req: GenerateRequest, timeout_s: float | None = None) -> Generation:
        """One completion of ``req`` (``req.n`` is ignored; see ``generate_n``)."""
        return self.generate_n(req.model_copy(update={"n": 1}), timeout_s)[0]

    def generate_n(self, req: GenerateRequest, timeout_s: float | None = None) -> list[Generation]:
        """``req.n`` completions of one prompt, decoded together with the engine's other work.

        ``timeout_s`` bounds the wait for the model to load; ``req.timeout_s`` bounds decoding.
        """
        engine = self.engine(timeout_s)
        prompt = build_prompt(self.cfg, req.task, req.context)
        with self._stats_lock:
            self._stats.in_flight += 1
        try:
            gens = engine.submit_generate(prompt, self.sampling(req), req.n, req.timeout_s).result()
        except LegionError:
            with self._stats_lock:
                self._stats.errors += 1
            raise
        finally:
            with self._stats_lock:
                self._stats.in_flight -= 1
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.prompt_tokens += gens[0].prompt_tokens
            self._stats.completion_tokens += sum(g.completion_tokens for g in gens)
        return gens

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Block until loading has finished (or failed); False on timeout."""
        return self._loaded.wait(timeout_s)

    def score(
        self, context: str, continuations: list[str], timeout_s: float | None = None
    ) -> list[ScoredContinuation]:
        return self.engine(timeout_s).score(context, continuations)

    def health(self) -> AgentHealth:
        loaded = self._engine is not None
        state = "ready" if loaded else ("failed" if self._loaded.is_set() else "loading")
        return AgentHealth(name=self.cfg.name, loaded=loaded, state=state, error=self._load_error)

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
