"""Constrained output without a model: schemas checked and turned into grammars
(``legion.engine.constrained``), request bodies that carry them (``legion.service.api``), cache keys that tell
them apart, and the Arbiter voting on canonical JSON (its agents are scripted stand-ins)."""

from __future__ import annotations

import asyncio
import json

import pytest

from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.engine.constrained import (
    AnswerMismatch,
    canonical_json,
    json_object_spec,
    parse_answer,
    response_format_spec,
    schema_spec,
    vote_key,
)
from legion.errors import ErrorCode, InvalidRequest, InvalidSchema, NoCandidates
from legion.messages import GenerateRequest, Generation, TaskRequest
from legion.service.api import ChatBody, TaskBody, chat_request, task_request
from legion.state.cache import ResultCache

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


# ------------------------------------------------------------------ schemas and grammars
def test_a_schema_becomes_a_grammar_with_a_root_rule():
    spec = schema_spec(PERSON)
    assert spec.kind == "json_schema" and spec.json_schema == PERSON
    assert "root ::=" in spec.grammar and '\\"name\\"' in spec.grammar
    # JSON strings hold no raw control characters; the converter's own rule would allow them.
    assert '[^"\\\\\\x7F\\x00-\\x1F]' in spec.grammar
    assert schema_spec(PERSON).grammar == spec.grammar  # converted once, then cached


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "strng"}, "'strng' is not valid"),
        ({"type": "object", "properties": {"a": {"minLength": -1}}}, "properties/a/minLength"),
        ({"type": "object", "required": "name"}, "required"),
        (["not", "a", "schema"], "must be a JSON object"),
        ({"type": "string", "pattern": "a{2"}, "cannot turn this schema into a grammar"),
        ({"$ref": "https://example.com/schema.json"}, "cannot turn this schema into a grammar"),
    ],
    ids=["bad-type", "negative-minLength", "required-list", "not-an-object", "bad-pattern", "remote-ref"],
)
def test_an_invalid_schema_is_a_400_that_says_what_is_wrong(schema, says):
    with pytest.raises(InvalidSchema) as err:
        schema_spec(schema)
    assert says in err.value.message
    assert err.value.code is ErrorCode.INVALID_SCHEMA and err.value.http_status == 400


def test_vote_field_must_be_a_required_top_level_property():
    assert schema_spec(PERSON, vote_field="name").vote_field == "name"
    with pytest.raises(InvalidSchema, match="not a property") as err:
        schema_spec(PERSON, vote_field="height")
    assert err.value.details["allowed"] == ["age", "name"]
    optional = {**PERSON, "required": ["name"]}
    with pytest.raises(InvalidSchema, match="'required'"):
        schema_spec(optional, vote_field="age")


def test_response_format_as_openai_defines_it():
    assert response_format_spec(None) is None
    assert response_format_spec({"type": "text"}) is None
    obj = response_format_spec({"type": "json_object"})
    assert obj.kind == "json_object" and obj.json_schema == {"type": "object"} and "root" in obj.grammar
    spec = response_format_spec(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    )
    assert spec.json_schema == PERSON and spec.grammar == schema_spec(PERSON).grammar
    with pytest.raises(InvalidSchema, match="json_object or json_schema"):
        response_format_spec({"type": "xml"})
    with pytest.raises(InvalidSchema, match="'name'"):
        response_format_spec({"type": "json_schema", "json_schema": {"schema": PERSON}})
    with pytest.raises(InvalidSchema, match="not a valid JSON schema"):
        response_format_spec({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}})


# ------------------------------------------------------------------ answers
def test_answers_parse_and_validate_or_say_why_not():
    spec = schema_spec(PERSON)
    assert parse_answer('{"age": 3, "name": "Ada"}', spec) == {"name": "Ada", "age": 3}
    with pytest.raises(AnswerMismatch, match="not complete JSON"):
        parse_answer('{"name": "Ada", "ag', spec)
    with pytest.raises(AnswerMismatch, match="at age: -1 is less than the minimum of 0"):
        parse_answer('{"name": "Ada", "age": -1}', spec)
    with pytest.raises(AnswerMismatch, match="'age' is a required property"):
        parse_answer('{"name": "Ada"}', spec)
    with pytest.raises(AnswerMismatch, match="is not of type 'object'"):
        parse_answer("[1, 2]", json_object_spec())


def test_votes_compare_canonical_json_or_one_field():
    spec = schema_spec(PERSON)
    a = parse_answer('{"name": "Ada", "age": 36}', spec)
    b = parse_answer('{\n  "age": 36,\n  "name": "Ada"\n}', spec)
    assert vote_key(a, spec) == vote_key(b, spec) == '{"age":36,"name":"Ada"}'
    assert vote_key({"name": "Ada", "age": 37}, spec) != vote_key(a, spec)
    by_name = schema_spec(PERSON, vote_field="name")
    assert vote_key({"name": "Ada", "age": 37}, by_name) == vote_key(a, by_name) == '"Ada"'
    assert canonical_json({"b": [1, {"d": 1, "c": 2}], "a": "é"}) == '{"a":"é","b":[1,{"c":2,"d":1}]}'


# ------------------------------------------------------------------ request bodies and cache keys
@pytest.fixture
def cfg(tmp_path):
    return config_from_dict(
        {"agents": [{"name": n, "role": n} for n in ("solver", "critic")], "data_dir": str(tmp_path)}
    )


def test_task_body_takes_schema_and_vote_field(cfg):
    body = TaskBody.model_validate({"task": "Who?", "schema": PERSON, "vote_field": "name"})
    req = task_request(body, cfg)
    assert req.output.json_schema == PERSON and req.output.vote_field == "name"
    assert task_request(TaskBody(task="Who?"), cfg).output is None
    with pytest.raises(InvalidSchema):
        task_request(TaskBody.model_validate({"task": "Who?", "schema": {"type": "strng"}}), cfg)
    with pytest.raises(InvalidRequest, match="vote_field needs a schema"):
        task_request(TaskBody(task="Who?", vote_field="name"), cfg)


def test_chat_body_takes_response_format(cfg):
    msgs = [{"role": "user", "content": "Who?"}]
    body = ChatBody.model_validate({"messages": msgs, "response_format": {"type": "json_object"}})
    assert chat_request(body, cfg).output.kind == "json_object"
    assert chat_request(ChatBody.model_validate({"messages": msgs}), cfg).output is None


def test_constrained_and_free_requests_never_share_a_cache_entry(cfg):
    def key(output):
        return ResultCache.key(TaskRequest(id="t", task="Who?", strategy="plurality", output=output), cfg)

    free, person, by_name = key(None), key(schema_spec(PERSON)), key(schema_spec(PERSON, "name"))
    assert len({free, person, by_name, key(json_object_spec())}) == 4
    assert key(schema_spec(dict(reversed(PERSON.items())))) == person  # the same schema, keys reordered


# ------------------------------------------------------------------ the Arbiter
class JsonAgents:
    """Each agent answers ``replies[agent]``: ``(text, finish_reason)``."""

    def __init__(self, replies):
        self.replies = replies
        self.asked: list[GenerateRequest] = []

    def saturated(self) -> bool:
        return False

    async def generate(self, agent: str, req: GenerateRequest) -> Generation:
        self.asked.append(req)
        await asyncio.sleep(0)
        text, finish = self.replies[agent]
        return Generation(
            text=text,
            prompt_tokens=5,
            completion_tokens=9,
            finish_reason=finish,
            mean_logprob=-0.5,
            seconds=0.0,
        )

    async def score(self, agent, task, context, continuations, view=None):  # pragma: no cover - never scores
        raise AssertionError("not used")


def _arbiter(tmp_path, replies):
    names = list(replies)
    cfg = config_from_dict({"agents": [{"name": n, "role": n} for n in names], "data_dir": str(tmp_path)})
    agents = JsonAgents(replies)
    return Arbiter(cfg, agents), agents


def _run(arbiter, output):
    req = TaskRequest(id="t", task="Who wrote the first program?", strategy="plurality", output=output)
    return asyncio.run(arbiter.run(req))


def test_the_arbiter_votes_on_canonical_json_and_answers_with_a_whole_valid_answer(tmp_path):
    arbiter, agents = _arbiter(
        tmp_path,
        {
            "a": ('{"name": "Ada", "age": 36}', "stop"),
            "b": ('{\n  "age": 36,\n  "name": "Ada"\n}', "stop"),
            "c": ('{"name": "Alan", "age": 41}', "stop"),
            "d": ('{"name": "Ada", "age": 3', "length"),
        },
    )
    spec = schema_spec(PERSON)
    result = _run(arbiter, spec)
    assert all(r.output == spec for r in agents.asked)
    assert result.votes == {'{"age":36,"name":"Ada"}': 2.0, '{"age":41,"name":"Alan"}': 1.0}
    assert parse_answer(result.answer, spec) == {"name": "Ada", "age": 36}  # not just its first line
    cut = next(c for c in result.candidates if c.agent == "d")
    assert not cut.ok and cut.finish_reason == "length" and "raise max_tokens" in cut.error
    assert "d" in result.missing_agents
    assert any(e.step == "agent_failed" and e.data["agent"] == "d" for e in result.trace)


def test_vote_field_groups_answers_that_agree_on_the_field(tmp_path):
    arbiter, _ = _arbiter(
        tmp_path,
        {
            "a": ('{"name": "Ada", "age": 36}', "stop"),
            "b": ('{"name": "Ada", "age": 37}', "stop"),
            "c": ('{"name": "Alan", "age": 41}', "stop"),
        },
    )
    result = _run(arbiter, schema_spec(PERSON, vote_field="name"))
    assert result.votes == {'"Ada"': 2.0, '"Alan"': 1.0}
    assert json.loads(result.answer)["name"] == "Ada"


def test_json_answers_are_not_merged_by_free_text_equivalence(tmp_path):
    # As free text, "{"x": 1}" is contained in "{"x": 1, "y": 2}" and would count as one answer.
    replies = {
        "a": ('{"x": 1}', "stop"),
        "b": ('{"x": 1, "y": 2}', "stop"),
        "c": ('{"y": 2, "x": 1}', "stop"),
    }
    arbiter, _ = _arbiter(tmp_path, replies)
    result = _run(arbiter, json_object_spec())
    assert result.votes == {'{"x":1}': 1.0, '{"x":1,"y":2}': 2.0}
    assert json.loads(result.answer) == {"x": 1, "y": 2}


def test_when_no_answer_validates_the_error_names_each_reason(tmp_path):
    arbiter, _ = _arbiter(tmp_path, {"a": ('{"name": "Ada"', "length"), "b": ('{"name": "Ada"}', "stop")})
    with pytest.raises(NoCandidates) as err:
        _run(arbiter, schema_spec(PERSON))
    assert "raise max_tokens" in err.value.message and "'age' is a required property" in err.value.message
