"""OpenAI's Responses API (``POST /v1/responses``) over the same arbitration as chat.

A request becomes a chat request: ``instructions`` the system message, ``input`` (a text, or
items: messages, ``function_call`` and ``function_call_output``) the conversation, ``tools``
(function tools, flat as the Responses API writes them) and ``tool_choice`` the chat's, and
``text.format`` its ``response_format``. The answer comes back as output items, a ``message``
with ``output_text`` or a ``function_call``, with usage; streamed, as the API's typed events.

No server-side state: ``store: true`` and ``previous_response_id`` are refused with a 400
(nothing is kept to continue from); send the whole conversation as ``input`` items instead.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from legion.errors import LegionError
from legion.messages import Candidate, TaskResult
from legion.service.api import MODEL_PREFIX, ChatBody, content_text, refuse_field, task_response, usage_of
from legion.service.tools import tool_calls_of

# Fields accepted and ignored: they change nothing in the answer.
RESPONSES_IGNORED_FIELDS = frozenset(
    {"metadata", "service_tier", "truncation", "include", "user", "prompt_cache_key"}
)


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: dict[str, Any] | None = None


class ResponseObject(BaseModel):
    """OpenAI's Response object (the fields Legion fills), with Legion's whole answer under
    ``legion`` once completed."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ResponsesBody(BaseModel):
    """``POST /v1/responses``: see the module docstring for what maps to what."""

    model_config = ConfigDict(extra="allow")

    model: str = MODEL_PREFIX
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: _TextFormat | None = None
    stream: bool = False
    store: bool | None = Field(None, description="Only false: Legion keeps no responses to continue from.")
    previous_response_id: str | None = Field(None, description="Refused: send the conversation as input.")
    cache: bool = True


def _messages(body: ResponsesBody) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for item in body.input:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise refuse_field(f"input message role {role!r}", "use user, system, developer or assistant")
            out.append({"role": role, "content": content_text(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id") or "call",
                "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")},
            }
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            continue  # a reasoning model's notes: nothing for these agents to read
        else:
            raise refuse_field(
                f"input item type {kind!r}", "send message, function_call or function_call_output"
            )
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise refuse_field("tool_choice", 'name a function: {"type": "function", "name": ...}')
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: _TextFormat | None) -> dict[str, Any] | None:
    fmt = None if text is None else text.format
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise refuse_field(f"text.format type {fmt.get('type')!r}", "use text, json_object or json_schema")


def chat_body(body: ResponsesBody) -> ChatBody:
    """The chat request a Responses request is; raises ``UnsupportedField`` for what Legion
    cannot honour (a 400 naming it)."""
    extra = sorted(set(body.model_extra or {}) - RESPONSES_IGNORED_FIELDS)
    if extra:
        raise refuse_field(extra[0], "Legion does not know this field of the Responses API; leave it out")
    if body.store:
        raise refuse_field("store", "Legion keeps no responses; send store: false and the whole conversation")
    if body.previous_response_id:
        raise refuse_field(
            "previous_response_id", "Legion keeps no responses; send the conversation as input"
        )
    tools = None
    if body.tools:
        tools = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
            for t in body.tools
        ]
    return ChatBody(
        model=body.model,
        messages=_messages(body),
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tools,
        tool_choice=_tool_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body.text),
        stream=body.stream,
        cache=body.cache,
        user=(body.model_extra or {}).get("user"),
    )


def _new(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _output(result: TaskResult, chat: ChatBody) -> list[dict[str, Any]]:
    """The answer's output items: a ``function_call`` per call, or one ``message``."""
    calls = tool_calls_of(result.answer, chat.tools, seed=result.id)
    if calls:
        return [
            {
                "type": "function_call",
                "id": _new("fc"),
                "call_id": call.id,
                "name": call.function.name,
                "arguments": call.function.arguments,
                "status": "completed",
            }
            for call in calls
        ]
    message = {
        "type": "message",
        "id": _new("msg"),
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": result.answer, "annotations": []}],
    }
    return [message]


def response_object(
    body: ResponsesBody,
    rid: str,
    created: int,
    *,
    result: TaskResult | None = None,
    output: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The Response object: in progress (no result yet) or completed with its output and usage."""
    usage = None
    if result is not None:
        u = usage_of(result)
        usage = {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens,
        }
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    out: dict[str, Any] = {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "in_progress" if result is None else "completed",
        "model": body.model,
        "output": output or [],
        "instructions": body.instructions,
        "tools": tools,
        "tool_choice": body.tool_choice or ("auto" if tools else "none"),
        "parallel_tool_calls": bool(body.parallel_tool_calls),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "previous_response_id": None,
        "text": {"format": (body.text.format if body.text and body.text.format else {"type": "text"})},
        "error": None,
        "incomplete_details": None,
        "metadata": (body.model_extra or {}).get("metadata") or {},
        "store": False,
        "usage": usage,
    }
    if result is not None:
        out["legion"] = task_response(result).model_dump(mode="json")
    return out


def completed(body: ResponsesBody, chat: ChatBody, result: TaskResult) -> dict[str, Any]:
    """The whole response to a request that does not stream."""
    output = _output(result, chat)
    return response_object(body, _new("resp"), int(time.time()), result=result, output=output)


class ResponsesEvents:
    """The Responses API's typed server-sent events: ``response.created`` and
    ``response.in_progress`` first, each agent's candidate as ``response.legion_candidate``, then
    the answer's item (``response.output_item.added``, its text or its call's arguments in
    deltas, ``.done``), then ``response.completed``; a failure is ``response.failed``."""

    def __init__(self, body: ResponsesBody, chat: ChatBody):
        self.body, self.chat = body, chat
        self.id, self.created = _new("resp"), int(time.time())
        self._seq = 0

    def _event(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        r = response_object(self.body, self.id, self.created)
        return [self._event("response.created", response=r), self._event("response.in_progress", response=r)]

    def event(self, item: Any) -> str | None:
        if isinstance(item, Candidate):
            c = {"agent": item.agent, "role": item.role, "text": item.text, "error": item.error}
            return self._event("response.legion_candidate", candidate=c)
        return None

    def result(self, result: TaskResult) -> list[str]:
        output = _output(result, self.chat)
        out = []
        for n, item in enumerate(output):
            if item["type"] == "message":
                out += self._message_events(n, item, result.answer)
            else:
                args = item["arguments"]
                where = {"item_id": item["id"], "output_index": n}
                pending = {**item, "status": "in_progress", "arguments": ""}
                out.append(self._event("response.output_item.added", output_index=n, item=pending))
                for i in range(0, len(args), 16):
                    delta = args[i : i + 16]
                    out.append(self._event("response.function_call_arguments.delta", delta=delta, **where))
                out.append(self._event("response.function_call_arguments.done", arguments=args, **where))
            out.append(self._event("response.output_item.done", output_index=n, item=item))
        done = response_object(self.body, self.id, self.created, result=result, output=output)
        out.append(self._event("response.completed", response=done))
        return out

    def _message_events(self, n: int, item: dict[str, Any], text: str) -> list[str]:
        pending = {**item, "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": item["id"], "output_index": n, "content_index": 0}
        out = [
            self._event("response.output_item.added", output_index=n, item=pending),
            self._event("response.content_part.added", part=part, **where),
        ]
        for i, w in enumerate(text.split(" ")):
            out.append(self._event("response.output_text.delta", delta=w if i == 0 else " " + w, **where))
        out.append(self._event("response.output_text.done", text=text, **where))
        out.append(self._event("response.content_part.done", part={**part, "text": text}, **where))
        return out

    def error(self, exc: LegionError) -> str:
        r = response_object(self.body, self.id, self.created)
        r |= {"status": "failed", "error": {"code": exc.code.value, "message": exc.message}}
        return self._event("response.failed", response=r)

    def done(self) -> str:
        return ""
