"""HTTP request bodies and their validation against the configured limits (no Ray here).

The ingress turns a body into a ``TaskRequest``; every rule a client can break raises a
``LegionError`` whose message says what to change.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from legion.arbitration.strategies import get_strategy, strategy_names
from legion.config import LegionConfig
from legion.engine.constrained import response_format_spec, schema_spec
from legion.errors import (
    InvalidChoices,
    InvalidRequest,
    InvalidTools,
    ModelNotFound,
    PayloadTooLarge,
    UnsupportedField,
)
from legion.messages import (
    AgentHealth,
    Candidate,
    ChoiceResult,
    CompletionRequest,
    Document,
    Generation,
    ModelDescription,
    RetrievalInfo,
    Sampling,
    Source,
    TaskRequest,
    TaskResult,
    TraceEvent,
)
from legion.service.tools import ToolCall, ToolChoice, ToolDef, tool_calls_of, tool_plan
from legion.state.history import Turn

MODEL_PREFIX = "legion"
AGENT_PREFIX = "agent:"  # /v1/completions' model: one agent, by name


class ErrorInfo(BaseModel):
    message: str = Field(..., description="What went wrong and what to change.")
    type: str = Field(..., description="The error code again (OpenAI's field name).")
    code: str = Field(..., description="A stable error code, e.g. invalid_request, rate_limited.")
    param: str | None = None
    details: dict[str, Any] | None = Field(None, description="Data to act on: allowed values, limits.")


class ErrorBody(BaseModel):
    """Every error response, in OpenAI's shape so the official client shows ``message``."""

    error: ErrorInfo


def _documented(text: str) -> dict:
    return {"model": ErrorBody, "description": text}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("Malformed JSON or an unreadable body."),
    401: _documented("No API key, or an unknown one (when the server has keys)."),
    403: _documented("The API key lacks the scope this route needs."),
    404: _documented("Unknown model, session or route."),
    413: _documented("The body, the task or the conversation is over its limit."),
    422: _documented("A field is missing or out of range; the message names it."),
    429: _documented("Over the key's rate limit; see Retry-After."),
    503: _documented("Agents loading, saturated or restarting; see Retry-After where given."),
    504: _documented("The request ran past its timeout; the trace says what was done."),
}
"""The error responses every route documents in the OpenAPI schema."""


MIN_CHOICES = 2
MAX_CHOICES = 26  # the letters form names them A to Z
MAX_CHOICE_CHARS = 1000


def check_choices(choices: list[str] | None, min_confidence: float | None) -> list[str] | None:
    """The choices of a request as the agents will score them (stripped), or ``None``. Raises
    ``InvalidRequest`` naming the field and what to fix: fewer than 2, more than 26, an empty or
    too long one, the same one twice; a ``min_confidence`` outside 0..1 or without choices."""
    if min_confidence is not None:
        if choices is None:
            raise InvalidChoices(
                "min_confidence applies to a task with choices: send choices, or leave min_confidence out",
                details={"field": "min_confidence"},
            )
        if not 0.0 <= min_confidence <= 1.0:
            raise InvalidChoices(
                f"min_confidence is a probability: send a number from 0 to 1, got {min_confidence}",
                details={"field": "min_confidence"},
            )
    if choices is None:
        return None
    where = {"field": "choices"}
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise InvalidChoices(
            f"choices holds {len(choices)}; send {MIN_CHOICES} to {MAX_CHOICES} choices", details=where
        )
    out = [c.strip() for c in choices]
    for i, c in enumerate(out):
        if not c:
            raise InvalidChoices(f"choices[{i}] is empty: every choice needs text", details=where)
        if len(c) > MAX_CHOICE_CHARS:
            raise InvalidChoices(
                f"choices[{i}] is {len(c)} characters; the limit is {MAX_CHOICE_CHARS}: shorten it",
                details=where,
            )
    seen: dict[str, int] = {}
    for i, c in enumerate(out):
        key = " ".join(c.lower().split())
        if key in seen:
            raise InvalidChoices(
                f"choices[{i}] ({c!r}) repeats choices[{seen[key]}]: send each choice once", details=where
            )
        seen[key] = i
    return out


class TaskBody(BaseModel):
    """``POST /v1/tasks``."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., description="The question or instruction.")
    strategy: str | None = Field(None, description="Arbitration strategy; see GET /v1/models.")
    max_tokens: int | None = Field(None, description="Reply length in tokens.")
    cache: bool = Field(True, description="Look the task up in the result cache; false bypasses it.")
    use_rag: bool | None = Field(None, description="Retrieve documents for the task (default: rag.enabled).")
    collection: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="Qdrant collection (default: rag.collection).",
    )
    stream: bool = Field(
        False,
        description="Answer as server-sent events: candidate and trace events as the agents work, "
        "then result (this response's JSON), then done; a failure is an error event.",
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A JSON schema (draft 2020-12): every agent answers with JSON that matches it, "
        "and the answer is one of those. An invalid schema is a 400.",
    )
    vote_field: str | None = Field(
        None, description="With schema: vote on this required top-level field instead of the whole answer."
    )
    choices: list[str] | None = Field(
        None,
        description=f"The answer is one of these ({MIN_CHOICES} to {MAX_CHOICES} distinct strings of at most "
        f"{MAX_CHOICE_CHARS} characters): every agent's views score each one, the strategy decides, and the "
        "result's choice carries each one's probability and each view's pick.",
    )
    min_confidence: float | None = Field(
        None,
        description="With choices: when the decided choice's probability is below this (0 to 1), the answer "
        "is null and choice.abstained says why.",
    )
    fanout: Literal["all", "adaptive"] | None = Field(
        None,
        description="Which agents' views answer: 'all', or 'adaptive': in waves, stopping once the "
        "full panel's vote is settled (arbiter.adaptive_risk); default arbiter.fanout. Not for debate "
        "or decompose.",
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made.")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers.")
    name: str | None = None


# OpenAI chat fields accepted and ignored, since they change nothing in the answer. Any other
# field Legion does not declare is refused with a 400 that names it (``chat_request``).
CHAT_IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "stream_options", "prediction"})
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64


class ChatBody(BaseModel):
    """``POST /v1/chat/completions`` (OpenAI-compatible). Sampling fields apply to every agent for
    this request; fields Legion cannot honour are refused with a 400 that names them, never
    dropped (``CHAT_IGNORED_FIELDS`` lists the few that change nothing and are ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str = MODEL_PREFIX
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = Field(
        False,
        description="Answer as server-sent chunks. The answer exists only once the agents have voted, so "
        "it comes at the end, all at once; before it, each agent's candidate arrives as it is written "
        "(a chunk with an empty delta and the candidate under legion_candidate).",
    )
    n: int = 1
    user: str | None = None  # also the session id of the conversation history (or X-Session-Id)
    cache: bool = True
    use_rag: bool | None = None
    collection: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    response_format: dict[str, Any] | None = Field(
        None, description='OpenAI\'s: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}.'
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Every agent's temperature (0: greedy); default: its own."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Every agent's nucleus mass; default: own.")
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Every agent's sampling seed; default: its own."
    )
    stop: str | list[str] | None = Field(
        None,
        description=f"Up to {MAX_STOP_SEQUENCES} sequences that end every agent's answer, beside the "
        "agent's own stops and its template's end-of-turn markers.",
    )
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 (refused otherwise).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 (refused otherwise).")
    logprobs: bool | None = Field(None, description="Only false: an arbitrated answer has no one model's.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only 0, as logprobs.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty (refused otherwise).")
    tools: list[ToolDef] | None = Field(None, description="Functions the agents may call (docs/tools.md).")
    tool_choice: ToolChoice | None = Field(
        None, description='"auto" (the default with tools), "required", "none", or a named function.'
    )
    parallel_tool_calls: bool | None = Field(
        None, description="true: an answer may be several calls (a list); otherwise one call per turn."
    )
    choices: list[str] | None = Field(
        None,
        description="Legion's: the answer is one of these (as /v1/tasks' choices); the reply's content is "
        "the decided choice, legion.choice its probabilities and each view's pick.",
    )
    min_confidence: float | None = Field(
        None, description="Legion's, with choices: below this probability the content is null (0 to 1)."
    )
    fanout: Literal["all", "adaptive"] | None = Field(
        None,
        description="Legion's: which agents' views answer: 'all', or 'adaptive': in waves, stopping "
        "once the full panel's vote is settled (arbiter.adaptive_risk); default arbiter.fanout. Not "
        "for debate or decompose.",
    )


def refuse_field(field: str, why: str) -> UnsupportedField:
    """The 400 for a field Legion cannot honour: it names the field and says why."""
    return UnsupportedField(f"{field} is not supported: {why}", details={"field": field})


def chat_sampling(body: ChatBody) -> Sampling | None:
    """The request's sampling for every agent, or ``None`` when it sets none. Raises
    ``UnsupportedField`` (a 400 naming the field) for a field Legion would otherwise drop."""
    extra = sorted(set(body.model_extra or {}) - CHAT_IGNORED_FIELDS)
    if extra:
        raise refuse_field(
            extra[0],
            "Legion does not know this chat field; leave it out (ignored fields: "
            f"{', '.join(sorted(CHAT_IGNORED_FIELDS))})",
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise refuse_field(name, "Legion's agents apply no repetition penalties; send 0 or leave it out")
    if body.logprobs or body.top_logprobs:
        raise refuse_field(
            "logprobs" if body.logprobs else "top_logprobs",
            "the answer is arbitrated between agents, so no one model's log-probabilities are its own; "
            "ask one agent through /v1/completions (model agent:<name>) for them",
        )
    if body.logit_bias:
        raise refuse_field("logit_bias", "Legion's agents run different vocabularies; leave it out")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None:
        if len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"stop holds {len(stop)} sequences; send at most {MAX_STOP_SEQUENCES}")
        if any(not x or len(x) > MAX_STOP_CHARS for x in stop):
            raise InvalidRequest(f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters")
    fields = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": stop}
    if all(v is None for v in fields.values()):
        return None
    return Sampling(**fields)


def new_id(prefix: str = "task") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_task_text(task: str, cfg: LegionConfig) -> str:
    text = task.strip()
    if not text:
        raise InvalidRequest("task is empty: send the question or instruction in 'task'")
    if len(task) > cfg.serve.max_task_chars:
        raise PayloadTooLarge(
            f"task is {len(task)} characters; the limit is {cfg.serve.max_task_chars}: shorten it",
        )
    return text


def check_max_tokens(value: int | None, cfg: LegionConfig) -> int | None:
    if value is None:
        return None
    limit = cfg.serve.max_tokens_limit
    if not 1 <= value <= limit:
        raise InvalidRequest(
            f"max_tokens must be between 1 and {limit}, got {value}",
            details={"field": "max_tokens", "min": 1, "max": limit},
        )
    return value


def task_request(body: TaskBody, cfg: LegionConfig) -> TaskRequest:
    strategy = body.strategy or (
        cfg.arbiter.default_choice_strategy if body.choices is not None else cfg.arbiter.default_strategy
    )
    get_strategy(strategy)
    if body.vote_field is not None and body.json_schema is None:
        raise InvalidRequest("vote_field needs a schema: send 'schema' with the field as a required property")
    choices = check_choices(body.choices, body.min_confidence)
    if choices is not None:
        check_choice_strategy(strategy)
        if body.json_schema is not None:
            raise InvalidChoices(
                "choices and schema cannot both shape the answer: send one of them",
                details={"field": "choices"},
            )
    return TaskRequest(
        id=new_id(),
        task=check_task_text(body.task, cfg),
        strategy=strategy,
        max_tokens=check_max_tokens(body.max_tokens, cfg),
        output=None if body.json_schema is None else schema_spec(body.json_schema, body.vote_field),
        choices=choices,
        min_confidence=body.min_confidence,
        fanout=resolve_fanout(body.fanout, strategy, cfg),
    )


def resolve_fanout(requested: str | None, strategy: str, cfg: LegionConfig) -> str:
    """The fan-out a task runs with: the request's, else ``arbiter.fanout``. A strategy whose
    rounds ask every agent again (debate, decompose) runs with ``all`` when the config asked for
    adaptive, and is refused (400) when the request did."""
    fanout = requested or cfg.arbiter.fanout
    if fanout == "adaptive" and not getattr(get_strategy(strategy), "adaptive_fanout", False):
        if requested is None:
            return "all"
        able = [x for x in strategy_names() if getattr(get_strategy(x), "adaptive_fanout", False)]
        raise InvalidRequest(
            f"fanout 'adaptive' stops asking once the first round's vote is settled; strategy {strategy!r} "
            "asks every agent again in later rounds, so there is nothing to stop: send fanout 'all', or a "
            f"strategy that decides from the first round ({', '.join(able)})",
            details={"field": "fanout", "allowed_strategies": able},
        )
    return fanout


def check_choice_strategy(strategy: str) -> None:
    """Refuse, before any agent works, a strategy that cannot decide over scored choices."""
    if not getattr(get_strategy(strategy), "decides_choices", False):
        able = [s for s in strategy_names() if getattr(get_strategy(s), "decides_choices", False)]
        raise InvalidChoices(
            f"strategy {strategy!r} has the agents write and argue; a task with choices is decided over "
            f"their scores: use one of {', '.join(able)}",
            details={"field": "strategy", "allowed": able},
        )


def model_ids() -> list[str]:
    return [MODEL_PREFIX] + [f"{MODEL_PREFIX}:{s}" for s in strategy_names()]


def strategy_for_model(model: str, cfg: LegionConfig) -> str:
    """``legion`` → the default strategy; ``legion:<strategy>`` or ``<strategy>`` → that one."""
    if model == MODEL_PREFIX:
        return cfg.arbiter.default_strategy
    name = model.split(":", 1)[1] if model.startswith(MODEL_PREFIX + ":") else model
    if name in strategy_names():
        return name
    raise ModelNotFound(
        f"model {model!r} does not exist; use one of: {', '.join(model_ids())}",
        details={"allowed": model_ids()},
    )


TEXT_PARTS = ("text", "input_text", "output_text")  # chat's, and the Responses API's


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: the string, or its text parts joined; ``InvalidRequest`` for any
    other part (an image, audio)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise InvalidRequest(f"message content part of type {kind!r} is not supported; send text")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _stored_message(turn: tuple[str, str] | Turn) -> ChatMessage:
    if isinstance(turn, tuple):
        return ChatMessage(role="assistant" if turn[0] == "assistant" else "user", content=turn[1])
    role = turn.role if turn.role in ("assistant", "tool") else "user"
    calls = [ToolCall.model_validate(c) for c in turn.tool_calls] if turn.tool_calls else None
    return ChatMessage(role=role, content=turn.content, tool_calls=calls, tool_call_id=turn.tool_call_id)


def session_turns(body: ChatBody, answer_turn: Turn) -> list[Turn]:
    """What a chat request adds to its session: the question and the answer, or, when it
    carries a function's results after the question (the stored question and call came
    before), those results and the answer."""
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    last = users[-1] if users else len(body.messages)
    results = [
        Turn(role="tool", content=content_text(m.content), tool_call_id=m.tool_call_id)
        for m in body.messages[last + 1 :]
        if m.role == "tool"
    ]
    if results:
        return [*results, answer_turn]
    return [Turn(role="user", content=content_text(body.messages[last].content)), answer_turn]


def answer_turn(result: TaskResult, tools: list[ToolDef] | None) -> Turn:
    """The answer as a stored assistant turn, with its calls when it made some (the ids the
    client got)."""
    calls = tool_calls_of(result.answer, tools, seed=result.id)
    stored = [c.model_dump() for c in calls] or None
    return Turn(role="assistant", content=result.answer, task_id=result.id, tool_calls=stored)


def client_keeps_history(body: ChatBody) -> bool:
    """Whether the chat carries turns besides its last user message and the instructions:
    earlier user or assistant turns, or calls and tool results after it."""
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    last = users[-1] if users else len(body.messages)
    before = any(m.role in ("user", "assistant") for m in body.messages[:last])
    return before or any(m.role in ("assistant", "tool") for m in body.messages[last + 1 :])


def _turn(m: ChatMessage) -> str | None:
    """One message as a line of the quoted conversation (``None``: nothing to say)."""
    text = content_text(m.content).strip()
    if m.role == "tool":
        who = m.name or m.tool_call_id or "a tool"
        return f"Tool result ({who}): {text}"
    if m.role == "assistant" and m.tool_calls:
        calls = "; ".join(f"{c.function.name}({c.function.arguments}) [{c.id}]" for c in m.tool_calls)
        return f"Assistant called: {calls}" + (f"\nAssistant: {text}" if text else "")
    who = {"system": "Instructions", "developer": "Instructions", "assistant": "Assistant"}.get(
        m.role, "User"
    )
    return f"{who}: {text}" if text else None


def chat_request(
    body: ChatBody, cfg: LegionConfig, history: Sequence[tuple[str, str] | Turn] | None = None
) -> TaskRequest:
    """Turn a chat into a task: the last user message is the task; earlier turns are context.

    ``history`` holds the session's stored turns (``Turn``s, or ``(role, text)`` pairs), placed
    after the request's instructions; pass it only when ``client_keeps_history(body)`` is false.
    """
    if body.n != 1:
        raise UnsupportedField(
            "n must be 1: Legion returns one arbitrated answer per request", details={"field": "n"}
        )
    sampling = chat_sampling(body)
    plan = tool_plan(body.tools, body.tool_choice, parallel=body.parallel_tool_calls is True)
    output = response_format_spec(body.response_format)
    choices = check_choices(body.choices, body.min_confidence)
    if choices is not None and (plan is not None or output is not None):
        raise InvalidChoices(
            "choices cannot go with tools or response_format: the answer is one of the choices",
            details={"field": "choices"},
        )
    if plan is not None and plan.output is not None:
        if output is not None:
            raise InvalidTools(
                "response_format and a required tool call cannot both shape the answer: send one of them"
            )
        output = plan.output
    if not body.messages:
        raise InvalidRequest("messages is empty: send at least one user message")
    if len(body.messages) > cfg.serve.max_messages:
        raise PayloadTooLarge(f"{len(body.messages)} messages; the limit is {cfg.serve.max_messages}")
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise InvalidRequest("messages holds no user message: the last user message is the task")
    last = users[-1]
    task = check_task_text(content_text(body.messages[last].content), cfg)
    lines = [line for m in body.messages[:last] if (line := _turn(m)) is not None]
    if history:
        # After the instructions, as if the client had sent the stored turns itself.
        stored = [_stored_message(t) for t in history]
        lines += [line for m in stored if (line := _turn(m)) is not None]
    # What came after the question: the calls made for it and the tools' results (quoted as data,
    # and screened by the injection guard like the rest of the context).
    after = [line for m in body.messages[last + 1 :] if (line := _turn(m)) is not None]
    if after:
        lines += [f"User: {task}", *after]
    context = ("Conversation so far:\n" + "\n".join(lines)) if lines else ""
    if len(context) > cfg.serve.max_task_chars * 4:
        raise PayloadTooLarge(
            "the conversation is too long for the agents' context; send fewer or shorter messages",
        )
    strategy = strategy_for_model(body.model, cfg)
    if choices is not None:
        if body.model == MODEL_PREFIX:  # no strategy named: the one for choices
            strategy = cfg.arbiter.default_choice_strategy
        check_choice_strategy(strategy)
    return TaskRequest(
        id=new_id("chatcmpl"),
        task=task,
        strategy=strategy,
        choices=choices,
        min_confidence=body.min_confidence,
        max_tokens=check_max_tokens(body.max_completion_tokens or body.max_tokens, cfg),
        context=context,
        output=output,
        sampling=sampling,
        instruction=None if plan is None else plan.instruction,
        tools=None if plan is None else [t.model_dump(exclude_none=True) for t in body.tools or []],
        calls=None if plan is None else plan.calls,
        fanout=resolve_fanout(body.fanout, strategy, cfg),
    )


class _Response(BaseModel):
    """A response body; the fields named in ``_omit_if_none`` are left out while they are None."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for name in self._omit_if_none:
            if out.get(name) is None:
                out.pop(name, None)
        return out


class CandidateInfo(_Response):
    """One agent's answer as ``/v1/tasks`` shows it (also a ``candidate`` event of its stream)."""

    _omit_if_none = frozenset({"error", "group"})

    agent: str
    role: str
    text: str
    group: str | None = Field(
        None,
        description="The answer group this candidate votes in: the normalised key it shares with the "
        "answers found equivalent to it (absent when it gave no answer).",
    )
    score: float | None = Field(None, description="The agent's mean token log-likelihood of its answer.")
    latency_ms: float
    error: str | None = Field(None, description="Why the agent gave no answer (absent when it did).")


class TaskResponse(_Response):
    """``POST /v1/tasks``: the arbitrated answer, every candidate, the votes and the trace."""

    _omit_if_none = frozenset({"sources", "retrieval", "choice", "adaptive_risk"})

    id: str
    answer: str | None = Field(
        ...,
        description="The arbitrated answer; null only for a task with choices whose decided choice "
        "fell below min_confidence (choice.abstained says why).",
    )
    strategy: str
    candidates: list[CandidateInfo]
    votes: dict[str, float] = Field(..., description="Normalised answer -> votes (or ranking score).")
    latency_ms: float
    missing_agents: list[str] = Field(..., description="Agents that gave no first answer.")
    trace: list[TraceEvent] = Field(..., description="Every step the Arbiter took, in order.")
    cached: bool = Field(..., description="Served from the result cache without asking an agent.")
    sources: list[Source] | None = Field(None, description="Retrieved chunks (only when retrieval ran).")
    retrieval: RetrievalInfo | None = Field(None, description="Whether retrieval worked (only when asked).")
    choice: ChoiceResult | None = Field(
        None, description="A task with choices: each choice's probability, each view's pick, the confidence."
    )
    fanout: Literal["all", "adaptive"] = Field("all", description="How the first round asked the panel.")
    agents_asked: int | None = Field(
        None, description="Panel members (views of agents) the first round asked; null when cached."
    )
    skipped_agents: list[str] = Field(
        default_factory=list, description="fanout adaptive: the members never asked (the vote was settled)."
    )
    adaptive_risk: float | None = Field(
        None, description="fanout adaptive: P(the full panel would have decided otherwise) at the stop."
    )


def answer_of(result: TaskResult) -> str | None:
    """The answer a client gets: None when a task with choices abstained below min_confidence."""
    if result.choice is not None and result.choice.index is None:
        return None
    return result.answer


def candidate_response(c: Candidate) -> CandidateInfo:
    return CandidateInfo(
        agent=c.agent,
        role=c.role,
        text=c.text,
        group=c.normalized if c.ok and c.normalized else None,
        score=c.score,
        latency_ms=c.latency_ms,
        error=c.error,
    )


def task_response(result: TaskResult) -> TaskResponse:
    retrieved = result.retrieval is not None
    return TaskResponse(
        id=result.id,
        answer=answer_of(result),
        strategy=result.strategy,
        candidates=[candidate_response(c) for c in result.candidates],
        votes=result.votes,
        latency_ms=result.latency_ms,
        missing_agents=result.missing_agents,
        trace=result.trace,
        cached=result.cached,
        sources=result.sources if retrieved else None,
        retrieval=result.retrieval,
        choice=result.choice,
        fanout=result.fanout,
        agents_asked=None if result.cached else result.agents_asked,
        skipped_agents=result.skipped_agents,
        adaptive_risk=result.adaptive_risk,
    )


def sse_event(event: str, data: BaseModel | dict) -> str:
    """One server-sent event of the ``/v1/tasks`` stream."""
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"event: {event}\ndata: {body}\n\n"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Response):
    _omit_if_none = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "tool_calls"] = "stop"


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions`` (OpenAI's shape), with Legion's whole answer under ``legion``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(..., description="Every agent's tokens: the answer cost all the candidates.")
    legion: TaskResponse


class ToolCallDelta(_Response):
    """A piece of a streamed call: the first names it (``id``, ``function.name``), the next ones
    carry ``function.arguments`` piece by piece, as OpenAI's chunks do."""

    _omit_if_none = frozenset({"id", "type"})

    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]


class ChatDelta(_Response):
    _omit_if_none = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "tool_calls"] | None = None


class ChatCompletionChunk(_Response):
    """One event of a streamed chat completion. The answer exists only once the agents have
    voted: each agent's candidate comes first, as it arrives (empty ``delta``, the candidate
    under ``legion_candidate``), then the whole answer at the end, the last chunk carrying
    ``legion`` (the ``/v1/tasks`` response)."""

    _omit_if_none = frozenset({"legion", "legion_candidate"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    legion_candidate: CandidateInfo | None = None
    legion: TaskResponse | None = None


def usage_of(result: TaskResult) -> Usage:
    prompt = sum(c.prompt_tokens for c in result.candidates)
    completion = sum(c.completion_tokens for c in result.candidates)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_response(result: TaskResult, model: str, tools: list[ToolDef] | None = None) -> ChatCompletion:
    """The chat answer; an answer that calls ``tools`` comes back as ``tool_calls``."""
    calls = tool_calls_of(result.answer, tools, seed=result.id)
    message = (
        AssistantMessage(content=None, tool_calls=calls)
        if calls
        else AssistantMessage(content=answer_of(result))
    )
    return ChatCompletion(
        id=result.id,
        created=int(time.time()),
        model=model,
        choices=[ChatChoice(message=message, finish_reason="tool_calls" if calls else "stop")],
        usage=usage_of(result),
        legion=task_response(result),
    )


class ChatChunks:
    """The ``chat.completion.chunk`` events of one streamed answer."""

    def __init__(self, chat_id: str, model: str, tools: list[ToolDef] | None = None):
        self.id = chat_id
        self.model = model
        self.tools = tools
        self.created = int(time.time())

    def chunk(
        self, delta: ChatDelta, finish: Literal["stop", "tool_calls"] | None = None, **legion
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice], **legion
        )

    def start(self) -> ChatCompletionChunk:
        return self.chunk(ChatDelta(role="assistant", content=""))

    def candidate(self, c: Candidate) -> ChatCompletionChunk:
        return self.chunk(ChatDelta(), legion_candidate=candidate_response(c))

    def answer(self, result: TaskResult) -> list[ChatCompletionChunk]:
        """The answer in word-sized chunks (a call: its name, then its arguments in pieces),
        then the final chunk with the whole response."""
        calls = tool_calls_of(result.answer, self.tools, seed=result.id)
        if calls:
            out = []
            for n, call in enumerate(calls):  # each call: its id and name, then its arguments
                args, name = call.function.arguments, call.function.name
                first = ToolCallDelta(
                    index=n, id=call.id, type="function", function={"name": name, "arguments": ""}
                )
                out.append(self.chunk(ChatDelta(tool_calls=[first])))
                for i in range(0, len(args), 16):
                    piece = ToolCallDelta(index=n, function={"arguments": args[i : i + 16]})
                    out.append(self.chunk(ChatDelta(tool_calls=[piece])))
            out.append(self.chunk(ChatDelta(), "tool_calls", legion=task_response(result)))
            return out
        words = (answer_of(result) or "").split(" ")
        out = [self.chunk(ChatDelta(content=w if i == 0 else " " + w)) for i, w in enumerate(words)]
        out.append(self.chunk(ChatDelta(), "stop", legion=task_response(result)))
        return out


class ModelInfo(_Response):
    _omit_if_none = frozenset({"legion_agent", "legion_model"})

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "legion"
    legion_agent: str | None = Field(None, description="agent:<name> entries: the agent.")
    legion_model: ModelDescription | None = Field(
        None, description="agent:<name> entries: the GGUF it runs, as llama.cpp reports it (once loaded)."
    )


class ModelList(BaseModel):
    """``GET /v1/models``: ``legion`` (the default strategy), ``legion:<strategy>`` for each one
    (chat and tasks), ``agent:<name>`` for each agent with the model it runs (completions), and
    the embedding model (embeddings)."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]


def models_response(agents: list[dict] | None = None, embedding_model: str | None = None) -> ModelList:
    """The strategies; with ``agents`` (``GET /v1/agents``' entries) each agent's model, and the
    embedding model."""
    data = [ModelInfo(id=m) for m in model_ids()]
    for a in agents or []:
        model = (a.get("health") or {}).get("model")
        data.append(ModelInfo(id=f"{AGENT_PREFIX}{a['name']}", legion_agent=a["name"], legion_model=model))
    if embedding_model:
        data.append(ModelInfo(id=embedding_model))
    return ModelList(data=data)


class TrustInfo(BaseModel):
    weight: float
    updates: int
    agreements: int


class ReplicaInfo(BaseModel):
    name: str
    in_flight: int


class PoolInfo(BaseModel):
    model_file: str = Field("", description="The GGUF file its replicas load (model_path's name).")
    replicas: list[ReplicaInfo]
    min_replicas: int
    max_replicas: int
    scale_events: list[dict[str, Any]]


class ViewInfo(BaseModel):
    """One panel member an agent speaks as: its voice, its trust and its weight in the profile."""

    name: str = Field(..., description="<agent>/<view>, or the agent's name when it has no views.")
    role: str
    prompt_form: str
    scoring: str
    few_shot: int
    trust: TrustInfo | None = Field(None, description="None before its first vote.")
    profile_weight: float | None = Field(None, description="Its weight in the profile (None: not in one).")
    adaptation_factor: float | None = Field(
        None,
        description="arbiter.adapt: what its profile weight is multiplied by, learned from the panel's "
        "agreement on unlabelled tasks (None: adaptation off).",
    )


class AgentInfo(BaseModel):
    """One agent: its config, its replicas, its health and counters, its trust weight, its views."""

    name: str
    role: str
    config: dict[str, Any] = Field(..., description="The agent's configuration.")
    pool: PoolInfo
    trust: TrustInfo | None = Field(..., description="None before the agent's first vote.")
    views: list[ViewInfo] = Field(
        default_factory=list, description="The panel members it speaks as, through its one engine."
    )
    health: AgentHealth
    stats: dict[str, Any] | None = Field(..., description="Request and engine counters; None if unreachable.")


class AgentList(BaseModel):
    """``GET /v1/agents``."""

    agents: list[AgentInfo]
    profile: dict[str, Any] | None = Field(
        None, description="The Arbiter profile in use (arbiter.profile): weights and fit figures."
    )
    adaptation: dict[str, Any] | None = Field(
        None,
        description="arbiter.adapt: items recorded, refits, the window, the bound and each member's factor "
        "(None: adaptation off).",
    )


class SessionInfo(BaseModel):
    """``GET /v1/sessions/{id}``: the stored turns of one conversation."""

    id: str
    object: Literal["session"] = "session"
    turns: list[Turn]


class DocumentsBody(BaseModel):
    """``POST /v1/documents``: documents to chunk, embed and upsert into a collection."""

    model_config = ConfigDict(extra="forbid")

    documents: list[Document] = Field(..., min_length=1, description="Each with source, text, format.")
    collection: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="Qdrant collection (default: rag.collection).",
    )


def documents_request(body: DocumentsBody, cfg: LegionConfig) -> tuple[list[Document], str]:
    """The documents to ingest and their collection, within ``rag.max_upload_chars``."""
    size = sum(len(d.text) for d in body.documents)
    if size > cfg.rag.max_upload_chars:
        raise PayloadTooLarge(
            f"the documents hold {size} characters; the limit per request is {cfg.rag.max_upload_chars}: "
            "send them in several requests",
        )
    if not any(d.text.strip() for d in body.documents):
        raise InvalidRequest("every document is empty: send the text to ingest in 'text'")
    return body.documents, body.collection or cfg.rag.collection


# ---------------------------------------------------------------- /v1/completions, /v1/embeddings
class CompletionBody(BaseModel):
    """``POST /v1/completions`` (OpenAI-compatible; unknown OpenAI fields are ignored). One agent
    continues ``prompt`` as it is: ``model`` names it (``agent:<name>``; ``legion`` is the first)."""

    model: str = Field(
        MODEL_PREFIX, description="agent:<name> (see GET /v1/models), or legion: the first agent."
    )
    prompt: str | list[str] = Field(..., description="The text to continue (a list of exactly one text).")
    max_tokens: int = Field(16, description="Tokens to generate (OpenAI's default, 16).")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default: the agent's.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 texts that end the completion.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="Return each token's log-probability and, in top_logprobs, the N most likely "
        "tokens at that step (plus the chosen one).",
    )
    echo: bool = Field(False, description="Put the prompt before the completion in text.")
    stream: bool = Field(
        False,
        description="Server-sent chunks as the text is decoded, then [DONE] (with logprobs: one chunk).",
    )
    n: int = 1
    suffix: str | None = None
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """``POST /v1/completions`` (OpenAI's shape); ``object`` is the same in each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def agent_for_model(model: str, agents: list[str]) -> str:
    """The agent ``model`` names: ``agent:<name>``, a bare agent name, or ``legion`` (the first)."""
    if model == MODEL_PREFIX and agents:
        return agents[0]
    name = model[len(AGENT_PREFIX) :] if model.startswith(AGENT_PREFIX) else model
    if name in agents:
        return name
    allowed = [MODEL_PREFIX] + [AGENT_PREFIX + a for a in agents]
    raise ModelNotFound(
        f"model {model!r} is no agent; completions run on one agent: use one of {', '.join(allowed)}",
        details={"allowed": allowed},
    )


def completion_request(body: CompletionBody, cfg: LegionConfig) -> tuple[str, CompletionRequest]:
    """The agent and the request for a completion body; ``InvalidRequest`` says what to fix."""
    agent = agent_for_model(body.model, [a.name for a in cfg.agents])
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest(
                f"prompt holds {len(prompt)} texts; send one text (one request per prompt)",
                details={"field": "prompt"},
            )
        prompt = prompt[0]
    if not prompt:
        raise InvalidRequest("prompt is empty: send the text to continue", details={"field": "prompt"})
    if len(prompt) > cfg.serve.max_task_chars:
        raise PayloadTooLarge(f"prompt is {len(prompt)} characters; the limit is {cfg.serve.max_task_chars}")
    if body.n != 1:
        raise InvalidRequest("n must be 1: one completion per request", details={"field": "n"})
    if body.suffix:
        raise InvalidRequest(
            "suffix (fill-in-the-middle) is not supported: leave it out", details={"field": "suffix"}
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise InvalidRequest("stop takes up to 4 non-empty texts", details={"field": "stop"})
    req = CompletionRequest(
        prompt=prompt,
        max_tokens=check_max_tokens(body.max_tokens, cfg),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop,
        top_logprobs=body.logprobs or 0,
        echo_logprobs=body.echo and body.logprobs is not None,
        timeout_s=cfg.serve.request_timeout_s,
    )
    return agent, req


def completion_response(
    gen: Generation, body: CompletionBody, prompt: str, completion_id: str, model: str
) -> Completion:
    """The completion in OpenAI's shape: ``echo`` puts the prompt first (with ``logprobs``, its
    tokens and their log-probabilities too), ``logprobs`` each generated token's."""
    text = (prompt if body.echo else "") + gen.text
    logprobs = None
    if body.logprobs is not None:
        offset = len(prompt) if body.echo else 0
        offsets = []
        for t in gen.tokens:
            offsets.append(offset)
            offset += len(t)
        tokens, lps = list(gen.tokens), list(gen.token_logprobs)
        # The N most likely tokens at each step, and always the sampled one (as OpenAI does).
        alts = gen.top_logprobs or [{} for _ in tokens]
        top: list[dict[str, float] | None] = [
            {**a, t: lp} for t, lp, a in zip(tokens, lps, alts, strict=True)
        ]
        if body.echo:
            # The prompt's own tokens, each with its log-probability given those before it.
            p_tokens = gen.prompt_token_texts if gen.prompt_token_texts is not None else [prompt]
            p_lps = gen.prompt_token_logprobs if gen.prompt_token_logprobs is not None else [None]
            p_offsets = [sum(len(t) for t in p_tokens[:i]) for i in range(len(p_tokens))]
            p_top = [None if lp is None else {t: lp} for t, lp in zip(p_tokens, p_lps, strict=True)]
            tokens, lps = [*p_tokens, *tokens], [*p_lps, *lps]
            top, offsets = [*p_top, *top], [*p_offsets, *offsets]
        logprobs = CompletionLogprobs(
            tokens=tokens, token_logprobs=lps, top_logprobs=top, text_offset=offsets
        )
    finish = "length" if gen.finish_reason in ("length", "timeout") else "stop"
    return Completion(
        id=completion_id,
        created=int(time.time()),
        model=model,
        choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)],
        usage=Usage(
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            total_tokens=gen.prompt_tokens + gen.completion_tokens,
        ),
    )


class EmbeddingBody(BaseModel):
    """``POST /v1/embeddings`` (OpenAI-compatible): the retrieval embedding model's vectors."""

    model: str = Field(..., description="The embedding model's id (see GET /v1/models).")
    input: str | list[str] = Field(..., description="A text or a list of texts (not token arrays).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI sends them."
    )
    dimensions: int | None = Field(None, description="Must be the model's own dimension, if given.")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """``POST /v1/embeddings``: unit-length vectors, in the order of ``input``."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


MAX_EMBEDDING_INPUTS = 256


def embedding_texts(
    body: EmbeddingBody, cfg: LegionConfig, model: str, aliases: Sequence[str] = ()
) -> list[str]:
    """The texts to embed, when ``body.model`` is ``model`` or one of its ``aliases``;
    ``ModelNotFound`` or ``InvalidRequest`` say what to fix."""
    if body.model != model and body.model not in aliases:
        allowed = [model, *aliases]
        raise ModelNotFound(
            f"model {body.model!r} is not the embedding model; use {model!r}"
            + (f" (or {', '.join(repr(a) for a in aliases)})" if aliases else ""),
            details={"allowed": allowed},
        )
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise InvalidRequest("input is empty: send a text or a list of texts", details={"field": "input"})
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise PayloadTooLarge(
            f"input holds {len(texts)} texts; the limit is {MAX_EMBEDDING_INPUTS} per request"
        )
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise InvalidRequest(
            f"input[{empty[0]}] is empty: every text needs some content", details={"field": "input"}
        )
    size = sum(len(t) for t in texts)
    if size > cfg.rag.max_upload_chars:
        raise PayloadTooLarge(f"input holds {size} characters; the limit is {cfg.rag.max_upload_chars}")
    return texts


def embedding_response(
    vectors: list[list[float]], tokens: int, body: EmbeddingBody, model: str
) -> EmbeddingList:
    dim = len(vectors[0]) if vectors else 0
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidRequest(
            f"dimensions={body.dimensions}, but {model} makes {dim}-dimensional vectors: "
            f"leave it out or send {dim}",
            details={"field": "dimensions", "allowed": [dim]},
        )

    def encode(v: list[float]) -> list[float] | str:
        if body.encoding_format == "float":
            return v
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")

    return EmbeddingList(
        data=[Embedding(index=i, embedding=encode(v)) for i, v in enumerate(vectors)],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
