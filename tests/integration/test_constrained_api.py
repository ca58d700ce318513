"""Constrained output over HTTP: ``schema`` on /v1/tasks and ``response_format`` on chat (with the
official ``openai`` client) through the real Serve app, agents and Arbiter; a 400 for a bad schema."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

ANSWER = {
    "type": "object",
    "properties": {
        "capital": {"enum": ["Paris", "Rome", "Madrid", "Berlin"]},
        "confidence": {"enum": ["low", "medium", "high"]},
    },
    "required": ["capital", "confidence"],
}


def test_task_with_a_schema_answers_json_that_validates(client):
    body = {
        "task": "What is the capital of France?",
        "schema": ANSWER,
        "vote_field": "capital",
        "max_tokens": 48,
        "cache": False,
    }
    r = client.post("/v1/tasks", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    answer = json.loads(out["answer"])
    jsonschema.validate(answer, ANSWER)
    ok = [c for c in out["candidates"] if "error" not in c]
    assert ok, out["candidates"]
    for c in ok:  # every candidate that votes is valid JSON for the schema
        jsonschema.validate(json.loads(c["text"]), ANSWER)
    # The votes are on the vote_field's canonical JSON, and the answer carries the winner.
    assert all(json.loads(k) in ANSWER["properties"]["capital"]["enum"] for k in out["votes"])
    assert json.dumps(answer["capital"]) == max(out["votes"], key=out["votes"].get)


def test_a_constrained_and_a_free_task_do_not_share_a_cache_entry(client):
    task = {"task": "Name the capital of Italy.", "max_tokens": 32}
    free = client.post("/v1/tasks", json=task)
    assert free.status_code == 200, free.text
    constrained = client.post("/v1/tasks", json={**task, "schema": ANSWER})
    assert constrained.status_code == 200, constrained.text
    assert constrained.headers["x-legion-cache"] == "miss"
    jsonschema.validate(json.loads(constrained.json()["answer"]), ANSWER)
    again = client.post("/v1/tasks", json={**task, "schema": ANSWER})
    assert again.headers["x-legion-cache"] == "hit" and again.json()["answer"] == constrained.json()["answer"]


def test_chat_response_format_with_the_openai_client(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused", max_retries=0, timeout=300)
    done = oa.chat.completions.create(
        model="legion",
        messages=[{"role": "user", "content": "What is the capital of Spain?"}],
        max_tokens=48,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": ANSWER, "strict": True},
        },
    )
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].message.content), ANSWER)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"schema": {"type": "strng"}}, "not a valid JSON schema"),
        ({"schema": {"type": "string", "pattern": "a{2"}}, "cannot turn this schema into a grammar"),
        ({"schema": ANSWER, "vote_field": "city"}, "vote_field 'city'"),
    ],
    ids=["bad-type", "bad-pattern", "unknown-vote-field"],
)
def test_an_invalid_schema_is_a_400_that_says_what_is_wrong(client, extra, fragment):
    r = client.post("/v1/tasks", json={"task": "hi", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_schema" and fragment in err["message"]


def test_chat_with_a_bad_response_format_is_a_400_through_the_openai_client(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(
            model="legion",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}},
        )
    assert "not a valid JSON schema" in str(err.value)
