"""Typed messages between the ingress, the Arbiter and the agents.

Everything that crosses an actor boundary is one of these models, never a loose dict;
the arbitration trace is plain data a client gets back.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OutputSpec(BaseModel):
    """What a constrained answer must be: JSON that validates against ``json_schema``, generated
    under ``grammar`` (GBNF, root rule ``root``). ``vote_field``: the Arbiter votes on this
    top-level field of the answer instead of on the whole answer (in canonical JSON)."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(..., description="json_schema, or json_object (any JSON object).")
    json_schema: dict[str, Any]
    grammar: str
    vote_field: str | None = None


class ChatTurn(BaseModel):
    """One turn of a conversation as a chat agent's template sees it."""

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """How a request wants every agent to sample, over each agent's own ``sampling`` config for
    this request only (``None``: the agent's own). ``stop`` adds to the sequences that already end
    an agent's answer (its configured ``stop`` and its prompt's end-of-turn markers), which
    keep a base model from writing on into the next turn."""

    model_config = ConfigDict(frozen=True)

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


class GenerateRequest(BaseModel):
    """What the Arbiter asks one agent for. ``None`` fields fall back to the agent's config."""

    task: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None  # more stop sequences, beside the agent's own
    context: str = ""  # extra quoted material placed before the task (history, documents)
    n: int = 1  # samples of the same prompt (generate_n); decoded together, prompt evaluated once
    timeout_s: float | None = None  # past this the agent stops decoding and returns what it has
    request_id: str | None = None  # the HTTP request's X-Request-Id, for the agent's log lines
    # Earlier turns (user/assistant) of the conversation: a chat agent renders them as turns of
    # its template, a completion agent quotes them before the task (legion.agent.build_prompt).
    history: list[ChatTurn] = Field(default_factory=list)
    output: OutputSpec | None = None  # constrained output: the grammar the answer must follow
    # Said after the task in place of the output's own instruction (a chat request's tools).
    instruction: str | None = None
    # The tools as OpenAI function definitions, for a chat template that renders them itself.
    tools: list[dict[str, Any]] | None = None
    # The panel member (``<agent>/<view>``) that answers: its prompt, exemplars and sampling.
    # None: the agent's first member (the agent itself when it has no views).
    view: str | None = None


class ChoiceScores(BaseModel):
    """One panel member's scores of a task's choices, in its own view (``Agent.score_choices``):
    ``scores`` under its scoring rule (higher is better), ``loglik`` the raw log-likelihoods and
    ``n_tokens`` the choices' token counts in its rendering."""

    member: str
    scores: list[float]
    loglik: list[float]
    n_tokens: list[int]


class CompletionRequest(BaseModel):
    """A raw-prompt completion by one agent (``POST /v1/completions``): the prompt is the
    client's own text, used as it is, with no role prompt and no template."""

    prompt: str
    max_tokens: int
    temperature: float | None = None  # None: the agent's sampling config
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    top_logprobs: int = 0  # the N most likely tokens at each step (OpenAI's logprobs=N)
    echo_logprobs: bool = False  # also the prompt's tokens and their log-probabilities
    timeout_s: float | None = None
    request_id: str | None = None


class Generation(BaseModel):
    """One completion from an engine."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop sequence, end of text, grammar complete), "length" or "timeout"
    mean_logprob: float  # mean log-probability of the generated tokens under the model
    seconds: float
    # Each generated token's text and log-probability (what /v1/completions' logprobs shows).
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    # With SamplingParams.top_logprobs: each token's most likely alternatives (text -> logprob).
    top_logprobs: list[dict[str, float]] | None = None
    # With CompletionRequest.echo_logprobs: the prompt's tokens and their log-probabilities.
    prompt_token_texts: list[str] | None = None
    prompt_token_logprobs: list[float | None] | None = None


class Candidate(BaseModel):
    """One agent's answer as the Arbiter saw it (``error`` set when the agent failed)."""

    agent: str
    role: str = ""
    text: str = ""
    normalized: str = ""
    score: float | None = None  # the agent's mean token log-likelihood of its answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None
    error_code: str | None = None  # the ErrorCode value when the agent refused with a LegionError
    finish_reason: str | None = None  # the engine's: stop, length (cut at max_tokens) or timeout
    # The member's standing when votes tie: its profile weight, else its trust weight (None: none).
    weight: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Decision(BaseModel):
    """What a strategy decided over a set of candidates."""

    answer: str
    answer_key: str  # the normalised answer that won
    votes: dict[str, float]  # normalised answer -> votes
    ranking: list[str]  # normalised answers, best first
    details: dict[str, Any] = Field(default_factory=dict)


class TraceEvent(BaseModel):
    """One step of how the Arbiter reached its answer."""

    step: str
    at_ms: float
    data: dict[str, Any] = Field(default_factory=dict)


class Source(BaseModel):
    """A retrieved chunk that went into the agents' prompts."""

    file: str
    chunk: int
    score: float


class RetrievalInfo(BaseModel):
    """Whether retrieval ran for a task, and if not, why (the task answered without it)."""

    used: bool
    collection: str
    reason: str | None = None
    dropped: list[dict[str, Any]] = Field(
        default_factory=list, description="Chunks the injection guard kept out of the prompts."
    )


class ChoiceResult(BaseModel):
    """The decision of a task with ``choices``: which choice, how likely each is, and each panel
    member's own pick. ``index`` is None when no choice reached the request's ``min_confidence``
    (``abstained`` says so)."""

    choices: list[str]
    index: int | None
    confidence: float | None = Field(None, description="The probability of the decided choice.")
    probabilities: list[float] = Field(..., description="P(choice), in the order of choices.")
    probability_source: str = Field(
        ...,
        description="profile: the Arbiter profile's fitted combination of the members' scores; "
        "mean: the mean over the members of each one's softmax over its scores (no profile).",
    )
    picks: dict[str, int] = Field(..., description="Each member's best-scored choice (its index).")
    abstained: str | None = None


class TaskResult(BaseModel):
    """The Arbiter's answer to a task, with the trace of how it got there."""

    id: str
    answer: str
    strategy: str
    candidates: list[Candidate]
    votes: dict[str, float]
    latency_ms: float
    missing_agents: list[str] = Field(default_factory=list)
    trace: list[TraceEvent] = Field(default_factory=list)
    cached: bool = False  # served from the result cache without touching an agent
    sources: list[Source] = Field(default_factory=list)
    retrieval: RetrievalInfo | None = None  # None when the task did not ask for retrieval
    choice: ChoiceResult | None = None  # a task with choices: the decision over them
    fanout: Literal["all", "adaptive"] = "all"  # how the first round asked the panel
    agents_asked: int | None = None  # panel members asked in the first round (None: cached)
    skipped_agents: list[str] = Field(default_factory=list)  # members adaptive fan-out never asked
    adaptive_risk: float | None = None  # adaptive: P(the full panel would differ) at the stop


class AgentStats(BaseModel):
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ModelDescription(BaseModel):
    """The GGUF an agent runs, as llama.cpp reports it once loaded."""

    file: str = Field(..., description="The GGUF's file name.")
    path: str
    architecture: str = Field(..., description="general.architecture, e.g. gemma3, llama, qwen2.")
    description: str = Field(..., description="llama_model_desc: architecture, size, quantisation.")
    size_bytes: int = Field(..., description="llama_model_size: the weights' bytes.")
    n_params: int = Field(..., description="llama_model_n_params.")
    n_ctx_train: int = Field(..., description="The context length it was trained with.")


class AgentHealth(BaseModel):
    """``state``: ``loading`` (the model is loading, or the actor is restarting), ``ready`` (it
    loaded and decoded a token), ``failed`` (it cannot serve: ``error`` says why)."""

    name: str
    loaded: bool
    state: Literal["loading", "ready", "failed"] = "loading"
    error: str | None = None
    node_id: str | None = None
    pid: int | None = None
    model: ModelDescription | None = Field(None, description="The model it runs (once loaded).")


class TaskRequest(BaseModel):
    """A validated task as the ingress hands it to the Arbiter."""

    id: str
    task: str
    strategy: str
    max_tokens: int | None = None
    context: str = ""
    request_id: str | None = None  # the HTTP request's X-Request-Id; the Arbiter passes it on
    timeout_s: float | None = None  # the whole task's budget; past it the Arbiter answers 504
    output: OutputSpec | None = None  # constrained output (a JSON schema); in the cache key
    sampling: Sampling | None = None  # the request's sampling for every agent; in the cache key
    instruction: str | None = None  # said after the task to every agent (the tools it may call)
    tools: list[dict[str, Any]] | None = None  # those tools as function definitions (chat templates)
    # tool_choice auto: an answer that validates against this is a call, voted on as its canonical
    # JSON beside the text answers (which the equivalence groups as usual).
    calls: OutputSpec | None = None
    # The answer is one of these: every member scores each in its own view, the strategy decides.
    choices: list[str] | None = None
    # With choices: below this probability of the decided choice the answer is None, with why.
    min_confidence: float | None = None
    # Which members the task asks: "all", or "adaptive" (waves until the vote is settled); None:
    # the Arbiter's arbiter.fanout. In the cache key: an adaptive answer may differ from the full panel's.
    fanout: Literal["all", "adaptive"] | None = None


# Retrieval (the ingress and the CLI talk to ``actors.retriever.RetrieverActor`` with these).


class RetrievedChunk(BaseModel):
    """One chunk a search found, with its text."""

    source: str
    chunk: int
    score: float
    text: str


class Retrieval(BaseModel):
    """The outcome of one search; ``info.used`` is False when the store could not answer."""

    info: RetrievalInfo
    chunks: list[RetrievedChunk] = Field(default_factory=list)


class Document(BaseModel):
    """A document to ingest: its source (a path or a name) and its text as read."""

    source: str = Field(..., min_length=1, max_length=1000)
    text: str
    format: Literal["txt", "md", "html"] = "txt"


class IngestReport(BaseModel):
    """What one ingest did to a collection."""

    collection: str
    location: str
    documents: int
    chunks: int
    removed: int  # stale chunks of re-ingested documents that got shorter
    seconds: float
    skipped: int = 0  # documents already stored with the same text and chunking, left as they were
    embed_threads: int = 1  # threads that embedded this ingest's chunks
