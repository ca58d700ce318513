"""OpenAI function calling on ``/v1/chat/completions``: the request's tools checked, rendered into
the agents' prompts, turned into the output spec every agent's answer is held to, and the
arbitrated answer turned back into ``tool_calls``.

A call is the JSON object ``{"name": <function>, "arguments": {...}}``. With ``tool_choice``
``required`` (or a named function) every agent decodes under a grammar built from the functions'
parameter schemas, each answer is validated with ``jsonschema``, and the Arbiter votes on the
canonical JSON of the call, so the (name, arguments) pair is what wins: the same path as
JSON-schema answers (``legion.engine.constrained``). With ``auto`` the agents see the tools and
answer freely; an arbitrated answer that is a valid call of one of them comes back as the call,
any other as text. ``none`` sends no tools to the agents. With ``parallel_tool_calls: true`` an
answer may be a list of calls.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from legion.engine.constrained import canonical_json, schema_error, schema_spec, unwrap_json
from legion.errors import InvalidSchema, InvalidTools
from legion.messages import OutputSpec

MAX_TOOLS = 32
MAX_CALLS = 8  # calls in one answer with parallel_tool_calls
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionDef(BaseModel):
    """One function a model may call (OpenAI's ``tools[].function``)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Letters, digits, _ and -.")
    description: str | None = Field(None, max_length=4000)
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Arguments always follow the schema here (a grammar).")


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class _ChoiceName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: call exactly this function."""

    type: Literal["function"] = "function"
    function: _ChoiceName


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(..., description="The arguments object as a JSON string.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolPlan(BaseModel):
    """What a request's tools mean for the agents: ``instruction`` goes after the task in every
    agent's prompt, ``output`` (required or named) holds every answer to a call."""

    mode: Literal["auto", "required", "named"]
    instruction: str
    output: OutputSpec | None = None
    calls: OutputSpec | None = None  # auto: the answers that are calls, voted on as calls


def _parameters(f: FunctionDef) -> dict[str, Any]:
    return f.parameters if f.parameters is not None else _EMPTY_PARAMETERS


def _call_schema(f: FunctionDef) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": f.name}, "arguments": _parameters(f)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _render(tools: list[ToolDef], mode: str, named: str | None, parallel: bool) -> str:
    lines = ["You can call these functions:"]
    for t in tools:
        f = t.function
        about = f" {f.description.strip()}" if f.description and f.description.strip() else ""
        lines.append(f"- {f.name}:{about} Arguments (JSON schema): {canonical_json(_parameters(f))}")
    shape = '{"name": "<function name>", "arguments": {<its arguments>}}'
    if mode == "named":
        shape = f'{{"name": "{named}", "arguments": {{...}}}}'
        lines.append(f"Call {named} now: answer with only a JSON object {shape}.")
    elif mode == "required":
        lines.append(f"Call one of them now: answer with only a JSON object {shape}.")
    else:
        lines.append(f"To call one, answer with only a JSON object {shape}; otherwise answer in plain text.")
    if parallel:
        lines.append(
            f"To make several calls at once, answer with a JSON array of such objects (at most {MAX_CALLS})."
        )
    return "\n".join(lines)


def _calls_spec(functions: list[FunctionDef], parallel: bool) -> OutputSpec:
    """Answers that are one call of ``functions`` (or, ``parallel``, a list of such calls)."""
    one = [_call_schema(f) for f in functions]
    single = one[0] if len(one) == 1 else {"anyOf": one}
    if not parallel:
        return schema_spec(single)
    several = {"type": "array", "items": single, "minItems": 1, "maxItems": MAX_CALLS}
    return schema_spec({"anyOf": [single, several]})


def tool_plan(
    tools: list[ToolDef] | None, choice: ToolChoice | None, parallel: bool = False
) -> ToolPlan | None:
    """The plan for a request's ``tools`` and ``tool_choice``, or ``None`` when the agents get no
    tools (none given, or ``tool_choice: "none"``); ``parallel`` (``parallel_tool_calls: true``)
    lets an answer be a list of calls. Raises ``InvalidTools`` (a 400) naming the tool and the
    fault: a bad parameters schema, a duplicate name, a named choice that is not among the
    tools, a choice without tools."""
    tools = tools or []
    if not tools:
        if choice not in (None, "none"):
            raise InvalidTools(
                "tool_choice needs tools: send the functions in 'tools', or leave tool_choice out"
            )
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidTools(f"tools holds {len(tools)} functions; send at most {MAX_TOOLS}")
    names = [t.function.name for t in tools]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidTools(f"tool {dup[0]!r} is listed twice: give every function its own name")
    for t in tools:
        try:
            schema_spec(_call_schema(t.function))
        except InvalidSchema as exc:
            raise InvalidTools(
                f"tool {t.function.name!r}: its parameters are not a schema Legion can hold calls to: "
                f"{exc.message.replace('schema is not', 'not')}",
                details={"tool": t.function.name},
            ) from None
    if choice == "none":
        return None
    functions = [t.function for t in tools]
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise InvalidTools(
                f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                details={"allowed": names},
            )
        output = _calls_spec([f for f in functions if f.name == name], parallel)
        return ToolPlan(mode="named", instruction=_render(tools, "named", name, parallel), output=output)
    any_call = _calls_spec(functions, parallel)
    if choice == "required":
        instruction = _render(tools, "required", None, parallel)
        return ToolPlan(mode="required", instruction=instruction, output=any_call)
    instruction = _render(tools, "auto", None, parallel)
    return ToolPlan(mode="auto", instruction=instruction, calls=any_call)


def tool_calls_of(answer: str, tools: list[ToolDef] | None, seed: str | None = None) -> list[ToolCall]:
    """The calls an arbitrated ``answer`` makes: a JSON object naming one of ``tools`` whose
    arguments validate against its schema, or a list of such objects; ``[]`` for a text answer
    (or a list with any call that does not validate). ``seed`` (the task's id) makes the call ids
    the same each time the answer is read: in the response, its stream and the stored session."""
    base = hashlib.sha256(seed.encode()).hexdigest()[:20] if seed else uuid.uuid4().hex[:20]
    text = unwrap_json(answer)
    if not tools or not text.startswith(("{", "[")):
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    by_name = {t.function.name: t.function for t in tools}
    calls = []
    for item in items:
        f = by_name.get(item.get("name")) if isinstance(item, dict) else None
        if f is None:
            return []
        if schema_error(item, _call_schema(f)) is not None:
            return []
        arguments = json.dumps(item["arguments"], ensure_ascii=False)
        call_id = f"call_{base}{len(calls)}"
        calls.append(ToolCall(id=call_id, function=ToolCallFunction(name=f.name, arguments=arguments)))
    return calls
