"""Legion's configuration: one YAML file for agents and deployment, ``LEGION_*`` overrides.

Every field has a default, bounds and a description. ``load_config`` turns any validation
failure into a ``ConfigError`` naming the field, the bad value and the allowed range.
Precedence, highest first: ``LEGION_*`` environment variables, the YAML file, the defaults.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from legion.errors import ConfigError

_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
DEFAULT_CONFIG_FILE = "legion.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Strict):
    """Sampling defaults of one agent; a request may override ``max_tokens``."""

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(40, ge=0, le=1000, description="Keep the k most likely tokens; 0 = all.")
    max_tokens: int = Field(48, ge=1, le=4096, description="Default reply length in tokens.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="RNG seed; same seed, same reply.")
    stop: list[str] = Field(
        default_factory=lambda: ["\n\n", "\nQuestion:", "\nQ:"],
        max_length=16,
        description="Stop sequences (the bundled model is a base model: prompt it completion-style).",
    )


class AgentConfig(_Strict):
    """One agent: a Ray actor owning one llama.cpp model."""

    name: str = Field(..., pattern=_NAME_PATTERN, description="Unique name; also the Ray actor name.")
    role: str = Field("solver", min_length=1, max_length=32, description="Role (solver, critic, ...).")
    role_prompt: str = Field(
        "",
        max_length=8000,
        description="Text put before the task: an instruction, a persona, or few-shot exemplars.",
    )
    prompt_template: str = Field(
        "{role_prompt}Question: {task}\nAnswer:",
        max_length=2000,
        description="Completion-style template; must contain {task}, may contain {role_prompt}.",
    )
    model_path: str | None = Field(
        None, description="Path to a GGUF file; empty means the bundled Gemma 3 270M (Q4_K_M)."
    )
    n_ctx: int = Field(2048, ge=128, le=131072, description="Context window in tokens.")
    n_batch: int = Field(512, ge=16, le=8192, description="Prompt tokens decoded per llama_decode.")
    num_cpus: float = Field(
        0.6, gt=0.0, le=256.0, description="CPU share reserved in Ray; sets the thread count."
    )
    num_gpus: float = Field(
        0.0, ge=0.0, le=16.0, description="GPU share reserved in Ray; fractions pack agents."
    )
    n_gpu_layers: int = Field(
        0, ge=-1, le=10000, description="Layers offloaded to the GPU (-1 = all); needs num_gpus > 0."
    )
    n_threads: int | None = Field(
        None, ge=1, le=256, description="Override the thread count derived from num_cpus."
    )
    max_restarts: int = Field(3, ge=-1, le=1000, description="Ray restarts after a crash (-1 = forever).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_task(cls, v: str) -> str:
        if "{task}" not in v:
            raise ValueError("prompt_template must contain the placeholder {task}")
        try:
            v.format(task="", role_prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"prompt_template may only use {{task}} and {{role_prompt}} (bad placeholder: {exc})"
            ) from None
        return v

    @model_validator(mode="after")
    def _gpu_consistent(self) -> AgentConfig:
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"num_gpus above 1 must be a whole number of GPUs, got {self.num_gpus}")
        if self.n_gpu_layers != 0 and self.num_gpus == 0:
            raise ValueError(
                "n_gpu_layers offloads layers to a GPU the actor has not reserved: "
                "set num_gpus > 0 (a fraction is fine) or n_gpu_layers to 0"
            )
        return self

    @property
    def threads(self) -> int:
        """llama.cpp threads: from this agent's CPU share, never from the host's core count."""
        if self.n_threads is not None:
            return self.n_threads
        return max(1, math.floor(self.num_cpus))


class ArbiterConfig(_Strict):
    default_strategy: str = Field("plurality", description="Strategy when a request names none.")
    agent_timeout_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="How long the Arbiter waits for agents' candidates."
    )
    num_cpus: float = Field(0.05, ge=0.0, le=16.0, description="CPU share of the Arbiter actor.")
    max_concurrency: int = Field(256, ge=1, le=10000, description="Tasks one Arbiter runs at once.")


class ServeConfig(_Strict):
    app_name: str = Field("legion", pattern=_NAME_PATTERN, description="Serve app and actor prefix.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix of the app.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Autoscaling: fewest ingress replicas.")
    max_replicas: int = Field(2, ge=1, le=1000, description="Autoscaling: most ingress replicas.")
    target_ongoing_requests: float = Field(
        8.0, gt=0.0, le=10000.0, description="Autoscaling: in-flight requests per replica to aim for."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, le=100000, description="Requests one replica accepts before Serve queues."
    )
    ingress_num_cpus: float = Field(0.05, ge=0.0, le=64.0, description="CPU share of a replica.")
    max_task_chars: int = Field(8000, ge=1, le=1_000_000, description="Longest task accepted.")
    max_tokens_limit: int = Field(512, ge=1, le=4096, description="Largest max_tokens accepted.")
    max_messages: int = Field(64, ge=1, le=10000, description="Most chat messages in one request.")

    @model_validator(mode="after")
    def _replicas_ordered(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


class CacheConfig(_Strict):
    """The SQLite result cache shared by every ingress replica (see ``legion.cache``)."""

    enabled: bool = Field(True, description="Look tasks up in the cache; a request may send cache: false.")
    ttl_s: float = Field(
        86400.0, gt=0.0, le=365 * 86400.0, description="Seconds a cached answer stays valid."
    )
    max_entries: int = Field(
        10000, ge=1, le=10_000_000, description="Most answers kept; the least recently used go first."
    )
    file: str = Field("cache.db", min_length=1, description="SQLite file, relative to data_dir.")


class HistoryConfig(_Strict):
    """Conversation history of /v1/chat/completions, by session id (see ``legion.history``)."""

    enabled: bool = Field(True, description="Keep turns of chats that carry a session id.")
    file: str = Field("history.db", min_length=1, description="SQLite file, relative to data_dir.")
    max_turns: int = Field(8, ge=0, le=1000, description="Most recent turns given to the agents.")
    max_chars: int = Field(
        2000, ge=0, le=1_000_000, description="Most characters of history given to the agents."
    )
    max_stored_turns: int = Field(
        1000, ge=2, le=1_000_000, description="Turns kept per session; older ones are dropped."
    )


class RagConfig(_Strict):
    """Retrieval over documents in Qdrant (see ``legion.vectorstore`` and ``actors.retriever``)."""

    enabled: bool = Field(False, description="Retrieve for every task unless it sends use_rag: false.")
    collection: str = Field("legion", pattern=_NAME_PATTERN, description="Default Qdrant collection.")
    qdrant_url: str | None = Field(
        None, description="Qdrant server URL; empty means local mode. QDRANT_URL overrides it."
    )
    local_dir: str = Field("qdrant", min_length=1, description="Local-mode folder, relative to data_dir.")
    top_k: int = Field(4, ge=1, le=50, description="Chunks retrieved per task.")
    score_threshold: float = Field(
        0.3, ge=-1.0, le=1.0, description="Cosine similarity a chunk needs to reach the prompt."
    )
    max_context_chars: int = Field(
        3000, ge=100, le=1_000_000, description="Most characters of retrieved text given to the agents."
    )
    chunk_chars: int = Field(600, ge=50, le=20000, description="Characters per chunk.")
    chunk_overlap: int = Field(100, ge=0, le=10000, description="Characters shared by neighbouring chunks.")
    embed_batch_size: int = Field(32, ge=1, le=4096, description="Chunks embedded per batch.")
    upsert_batch_size: int = Field(128, ge=1, le=10000, description="Points upserted per request.")
    max_upload_chars: int = Field(
        5_000_000, ge=1, le=1_000_000_000, description="Largest POST /v1/documents body, in characters."
    )
    timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="How long a task waits for retrieval before going on without."
    )
    load_timeout_s: float = Field(
        180.0, gt=0.0, le=3600.0, description="How long the retriever may take to load its embedding model."
    )
    num_cpus: float = Field(0.05, ge=0.0, le=64.0, description="CPU share of the retriever actor.")

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> RagConfig:
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_chars ({self.chunk_chars})"
            )
        return self


def _default_agents() -> list[AgentConfig]:
    # Three agents that differ in prompt and sampling, so that arbitration has something to do.
    return [
        AgentConfig(name="solver", role="solver", num_cpus=0.6),
        AgentConfig(
            name="reasoner",
            role="reasoner",
            role_prompt="Answer the question with a short, factual answer.\n\n",
            num_cpus=0.6,
            sampling=SamplingConfig(temperature=0.3, seed=1),
        ),
        AgentConfig(
            name="critic",
            role="critic",
            role_prompt=(
                "Question: What is the capital of France?\nAnswer: Paris\n\n"
                "Question: How many legs does a spider have?\nAnswer: eight\n\n"
            ),
            num_cpus=0.6,
            sampling=SamplingConfig(temperature=0.6, seed=2),
        ),
    ]


class LegionConfig(BaseSettings):
    """The whole configuration. Build it with ``load_config``."""

    model_config = SettingsConfigDict(
        env_prefix="LEGION_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    agents: list[AgentConfig] = Field(
        default_factory=_default_agents, min_length=1, max_length=64, description="The agents."
    )
    arbiter: ArbiterConfig = Field(default_factory=ArbiterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    data_dir: str = Field("~/.legion", description="Where Legion keeps its files.")
    ray_namespace: str = Field("legion", pattern=_NAME_PATTERN, description="Ray namespace.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")

    @model_validator(mode="after")
    def _unique_names(self) -> LegionConfig:
        seen: set[str] = set()
        for a in self.agents:
            if a.name in seen:
                raise ValueError(f"agent names must be unique; '{a.name}' appears twice")
            seen.add(a.name)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so that LEGION_* overrides the YAML file passed as init values.
        return (env_settings, init_settings)

    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    def agent(self, name: str) -> AgentConfig:
        for a in self.agents:
            if a.name == name:
                return a
        raise KeyError(name)


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = err.get("msg", "invalid")
    got = err.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{loc}: {msg}{shown}"


def config_from_dict(data: dict[str, Any], source: str = "configuration") -> LegionConfig:
    """Validate a config mapping; raise ``ConfigError`` naming each bad field."""
    try:
        return LegionConfig(**data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines), details={"errors": lines}) from None


def load_config(path: str | os.PathLike | None = None) -> LegionConfig:
    """Load the config: ``path``, else ``$LEGION_CONFIG``, else ``./legion.yaml``, else defaults."""
    explicit = path or os.environ.get("LEGION_CONFIG")
    candidate = Path(explicit) if explicit else Path(DEFAULT_CONFIG_FILE)
    data: dict[str, Any] = {}
    if candidate.is_file():
        try:
            loaded = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{candidate} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{candidate} must hold a mapping at the top level, not {type(loaded).__name__}"
            )
        data = loaded
    elif explicit:
        raise ConfigError(f"config file {candidate} does not exist")
    return config_from_dict(data, source=str(candidate) if candidate.is_file() else "configuration")
