"""One agent without Ray: its role prompt, its engine, its counters.

``Agent`` loads its model on a background thread so that health checks answer while it
loads; ``actors.agent.AgentActor`` is the Ray shell around it.
"""

from __future__ import annotations

import logging
import threading
import time

from legion.config import AgentConfig
from legion.engine import LlamaEngine, SamplingParams, ScoredContinuation
from legion.errors import LegionError, ModelLoadError, NotReady
from legion.messages import AgentHealth, AgentStats, GenerateRequest, Generation

log = logging.getLogger(__name__)


def build_prompt(cfg: AgentConfig, task: str, context: str = "") -> str:
    """The completion-style prompt an agent sends its model for ``task``."""
    body = cfg.prompt_template.format(role_prompt=cfg.role_prompt, task=task.strip())
    return f"{context.rstrip()}\n\n{body}" if context.strip() else body


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
            self._engine = LlamaEngine(
                self.cfg.model_path,
                n_ctx=self.cfg.n_ctx,
                n_batch=self.cfg.n_batch,
                n_threads=self.cfg.threads,
                n_gpu_layers=self.cfg.n_gpu_layers,
            )
            log.info(
                "agent %s loaded %s in %.1fs (%d threads)",
                self.cfg.name,
                self._engine.model_path,
                time.perf_counter() - t0,
                self.cfg.threads,
            )
        except Exception as exc:  # kept and reported by health(); the agent never serves
            self._load_error = str(exc)
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
        engine = self.engine(timeout_s)
        prompt = build_prompt(self.cfg, req.task, req.context)
        with self._stats_lock:
            self._stats.in_flight += 1
        try:
            gen = engine.generate(prompt, self.sampling(req))
        except LegionError:
            with self._stats_lock:
                self._stats.errors += 1
            raise
        finally:
            with self._stats_lock:
                self._stats.in_flight -= 1
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.prompt_tokens += gen.prompt_tokens
            self._stats.completion_tokens += gen.completion_tokens
            self._stats.busy_s += gen.seconds
        return gen

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Block until loading has finished (or failed); False on timeout."""
        return self._loaded.wait(timeout_s)

    def score(
        self, context: str, continuations: list[str], timeout_s: float | None = None
    ) -> list[ScoredContinuation]:
        return self.engine(timeout_s).score(context, continuations)

    def health(self) -> AgentHealth:
        return AgentHealth(name=self.cfg.name, loaded=self._engine is not None, error=self._load_error)

    def stats(self) -> dict:
        with self._stats_lock:
            s = self._stats.model_copy()
        return {**s.model_dump(), "tokens_per_s": round(s.tokens_per_s, 2)}
