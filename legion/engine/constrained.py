"""Constrained output: JSON schemas checked and turned into llama.cpp grammars (GBNF), answers
checked against them, and the canonical form of an answer the Arbiter votes on. No Ray here.

The schema-to-GBNF converter and the JSON grammar are llama-cpp-python's own
(``llama_cpp.llama_grammar``); the engine applies the grammar while it decodes
(``legion.engine.llama``), and every answer is validated again here, with ``jsonschema``, because a
grammar cannot express every keyword (formats, ``uniqueItems``, numeric bounds on floats) and an
answer cut by ``max_tokens`` is incomplete JSON.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from legion.errors import InvalidSchema
from legion.messages import OutputSpec

MAX_SCHEMA_CHARS = 20_000  # a schema is sent with every agent's request and hashed into cache keys


# --------------------------------------------------------------------- building a spec
def schema_spec(schema: Any, vote_field: str | None = None) -> OutputSpec:
    """The spec for answers that match the JSON schema ``schema`` (draft 2020-12).

    Raises ``InvalidSchema`` when ``schema`` is not a valid JSON schema, when the converter
    cannot turn it into a grammar, or when ``vote_field`` is not a required top-level property.
    """
    if not isinstance(schema, dict):
        raise InvalidSchema(f"schema must be a JSON object (a JSON schema), got {type(schema).__name__}")
    text = canonical_json(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidSchema(f"the schema is {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}")
    _check_schema(schema)
    grammar = _grammar_for(text)
    if vote_field is not None:
        _check_vote_field(schema, vote_field)
    return OutputSpec(kind="json_schema", json_schema=schema, grammar=grammar, vote_field=vote_field)


def json_object_spec() -> OutputSpec:
    """The spec for any JSON object (OpenAI's ``{"type": "json_object"}``), under llama.cpp's JSON grammar."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return OutputSpec(kind="json_object", json_schema={"type": "object"}, grammar=JSON_GBNF)


def response_format_spec(response_format: Any) -> OutputSpec | None:
    """The spec for an OpenAI ``response_format``: ``{"type": "text"}`` (or none) is free text,
    ``{"type": "json_object"}`` any JSON object, ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}}`` JSON that matches ``schema``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidSchema('response_format must be an object such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_spec()
    if kind != "json_schema":
        raise InvalidSchema(
            f"response_format.type {kind!r} is not supported; use text, json_object or json_schema",
            details={"allowed": ["text", "json_object", "json_schema"]},
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidSchema(
            "response_format.json_schema must be an object with a 'name' and a 'schema': "
            '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {...}}}'
        )
    if "schema" not in spec:  # OpenAI allows a schema-less json_schema: any JSON object
        return json_object_spec()
    return schema_spec(spec["schema"])


def _check_schema(schema: dict) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise InvalidSchema(
            f"schema is not a valid JSON schema at {where}: {exc.message}",
            details={"path": list(exc.absolute_path)},
        ) from None


@lru_cache(maxsize=256)
def _grammar_for(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(schema_json)
    except RecursionError:
        raise InvalidSchema("the schema nests too deeply to turn into a grammar; flatten it") from None
    except Exception as exc:  # the converter raises ValueError, KeyError, AssertionError, ...
        reason = str(exc) or type(exc).__name__
        raise InvalidSchema(
            f"Legion cannot turn this schema into a grammar ({reason}); use plain types, "
            "properties, required, enum, const, items, anyOf and local $refs"
        ) from None
    if "root ::=" not in grammar:
        raise InvalidSchema("the schema does not describe any JSON value; give it a type")
    # The converter's string characters admit raw control characters (a newline, say), which
    # JSON forbids inside a string: exclude them, as llama.cpp's own JSON grammar does.
    return grammar.replace(_CONVERTER_CHAR, _JSON_CHAR)


_CONVERTER_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _check_vote_field(schema: dict, field: str) -> None:
    props = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(props, dict) or field not in props:
        raise InvalidSchema(
            f"vote_field {field!r} is not a property of the schema's top-level object; "
            "name one of its properties",
            details={"allowed": sorted(props) if isinstance(props, dict) else []},
        )
    if field not in schema.get("required", []):
        raise InvalidSchema(
            f"vote_field {field!r} must be in the schema's 'required' list, so that every answer has it"
        )


# --------------------------------------------------------------------- checking answers
class AnswerMismatch(ValueError):
    """An answer that does not parse as JSON or does not validate against its schema."""


def parse_answer(text: str, spec: OutputSpec) -> Any:
    """The JSON value of ``text``, validated against ``spec``'s schema; ``AnswerMismatch`` says
    why not (the first validation error, with its place in the answer)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnswerMismatch(f"the answer is not complete JSON ({exc.msg} at character {exc.pos})") from None
    error = schema_error(value, spec.json_schema)
    if error is not None:
        raise AnswerMismatch(error)
    return value


def schema_error(value: Any, schema: dict) -> str | None:
    """Why ``value`` does not validate against ``schema`` (its first error, with its place), or
    ``None``; the validator is built once per schema."""
    return _validator(canonical_json(schema)).best_match_error(value)


class _Validator:
    def __init__(self, schema: dict):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import best_match

        self._validator = Draft202012Validator(schema)
        self._best_match = best_match

    def best_match_error(self, value: Any) -> str | None:
        err = self._best_match(self._validator.iter_errors(value))
        if err is None:
            return None
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        return f"the answer does not match the schema at {where}: {err.message}"


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> _Validator:
    return _Validator(json.loads(schema_json))


def unwrap_json(text: str) -> str:
    """``text`` without the wrapping a chat template's call format or a code fence puts around
    JSON (``<tool_call>{...}</tool_call>``, as Qwen's and Hermes' templates ask for)."""
    text = text.strip()
    for opening, closing in (("<tool_call>", "</tool_call>"), ("```json", "```"), ("```", "```")):
        if text.startswith(opening) and text.endswith(closing) and len(text) > len(opening) + len(closing):
            return text[len(opening) : -len(closing)].strip()
    return text


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON with sorted keys: equal values, equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def vote_key(value: Any, spec: OutputSpec) -> str:
    """What the Arbiter compares: the canonical JSON of the answer, or of its ``vote_field``."""
    if spec.vote_field is not None and isinstance(value, dict):
        return canonical_json(value.get(spec.vote_field))
    return canonical_json(value)


def instruction(spec: OutputSpec) -> str:
    """The line added to an agent's task so the model knows what the grammar will hold it to."""
    if spec.kind == "json_object":
        return "Answer with one JSON object."
    return f"Answer with one JSON object that matches this JSON schema: {canonical_json(spec.json_schema)}"
