"""HTTP request bodies and their validation against the configured limits (no Ray here).

The ingress turns a body into a ``TaskRequest``; every rule a client can break raises a
``LegionError`` whose message says what to change.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from legion.config import LegionConfig
from legion.errors import InvalidRequest, ModelNotFound, PayloadTooLarge
from legion.messages import Candidate, Document, TaskRequest, TaskResult
from legion.strategies import get_strategy, strategy_names

MODEL_PREFIX = "legion"


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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(BaseModel):
    """``POST /v1/chat/completions`` (OpenAI-compatible; unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str = MODEL_PREFIX
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    n: int = 1
    user: str | None = None  # also the session id of the conversation history (or X-Session-Id)
    cache: bool = True
    use_rag: bool | None = None
    collection: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")


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
    strategy = body.strategy or cfg.arbiter.default_strategy
    get_strategy(strategy)
    return TaskRequest(
        id=new_id(),
        task=check_task_text(body.task, cfg),
        strategy=strategy,
        max_tokens=check_max_tokens(body.max_tokens, cfg),
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


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidRequest(
                f"message content part of type {part.get('type')!r} is not supported; send text"
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def client_keeps_history(body: ChatBody) -> bool:
    """Whether the chat carries earlier user or assistant turns before its last user message."""
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    last = users[-1] if users else len(body.messages)
    return any(m.role in ("user", "assistant") for m in body.messages[:last])


def chat_request(
    body: ChatBody, cfg: LegionConfig, history: list[tuple[str, str]] | None = None
) -> TaskRequest:
    """Turn a chat into a task: the last user message is the task; earlier turns are context.

    ``history`` holds the session's stored ``(role, text)`` turns, placed after the request's
    instructions; pass it only when ``client_keeps_history(body)`` is false.
    """
    if body.n != 1:
        raise InvalidRequest("n must be 1: Legion returns one arbitrated answer per request")
    if not body.messages:
        raise InvalidRequest("messages is empty: send at least one user message")
    if len(body.messages) > cfg.serve.max_messages:
        raise PayloadTooLarge(f"{len(body.messages)} messages; the limit is {cfg.serve.max_messages}")
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise InvalidRequest("messages holds no user message: the last user message is the task")
    last = users[-1]
    task = check_task_text(_text(body.messages[last].content), cfg)
    lines = []
    for m in body.messages[:last]:
        who = {"system": "Instructions", "developer": "Instructions", "assistant": "Assistant"}.get(
            m.role, "User"
        )
        text = _text(m.content).strip()
        if text:
            lines.append(f"{who}: {text}")
    if history:
        # After the instructions, as if the client had sent the stored turns itself.
        lines += [f"{'Assistant' if role == 'assistant' else 'User'}: {text}" for role, text in history]
    context = ("Conversation so far:\n" + "\n".join(lines)) if lines else ""
    if len(context) > cfg.serve.max_task_chars * 4:
        raise PayloadTooLarge(
            "the conversation is too long for the agents' context; send fewer or shorter messages",
        )
    return TaskRequest(
        id=new_id("chatcmpl"),
        task=task,
        strategy=strategy_for_model(body.model, cfg),
        max_tokens=check_max_tokens(body.max_completion_tokens or body.max_tokens, cfg),
        context=context,
    )


def candidate_response(c: Candidate) -> dict:
    """One agent's answer as ``/v1/tasks`` shows it (also a ``candidate`` event of its stream)."""
    return {
        "agent": c.agent,
        "role": c.role,
        "text": c.text,
        "score": c.score,
        "latency_ms": c.latency_ms,
        **({"error": c.error} if c.error else {}),
    }


def sse_event(event: str, data: dict) -> str:
    """One server-sent event of the ``/v1/tasks`` stream."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def task_response(result: TaskResult) -> dict:
    return {
        "id": result.id,
        "answer": result.answer,
        "strategy": result.strategy,
        "candidates": [candidate_response(c) for c in result.candidates],
        "votes": result.votes,
        "latency_ms": result.latency_ms,
        "missing_agents": result.missing_agents,
        "trace": [e.model_dump() for e in result.trace],
        "cached": result.cached,
        **({"sources": [s.model_dump() for s in result.sources]} if result.retrieval else {}),
        **({"retrieval": result.retrieval.model_dump()} if result.retrieval else {}),
    }


def _usage(result: TaskResult) -> dict:
    # Every agent's work counts: the answer cost all the candidates.
    prompt = sum(c.prompt_tokens for c in result.candidates)
    completion = sum(c.completion_tokens for c in result.candidates)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(result: TaskResult, model: str) -> dict:
    return {
        "id": result.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(result),
        "legion": task_response(result),
    }


def chat_chunks(result: TaskResult, model: str) -> list[dict]:
    """The ``chat.completion.chunk`` events of a streamed answer, in order."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {
            "id": result.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    out = [chunk({"role": "assistant", "content": ""})]
    words = result.answer.split(" ")
    for i, w in enumerate(words):
        out.append(chunk({"content": w if i == 0 else " " + w}))
    final = chunk({}, "stop")
    final["legion"] = task_response(result)
    out.append(final)
    return out


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
