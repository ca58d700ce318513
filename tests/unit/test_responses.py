"""``POST /v1/responses`` through the real routes and pipeline, with a stand-in Arbiter: the
request as the chat it is, the answer as output items (text or a function call), the typed
stream, and what is refused (no server-side state)."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_routes import client
from tests.unit.test_tools import CALL, WEATHER, CallingArbiter

FLAT_WEATHER = {"type": "function", **WEATHER["function"]}


def events(text: str) -> list[dict]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append(data)
    return out


def test_a_text_answer_is_one_message_item_with_usage(tmp_path):
    arbiter = CallingArbiter("Blue.")
    r = client(tmp_path, arbiter).post(
        "/v1/responses",
        json={
            "input": "Name a colour.",
            "instructions": "Be brief.",
            "max_output_tokens": 12,
            "cache": False,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["status"] == "completed" and body["id"].startswith("resp_")
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": "Blue.", "annotations": []}]
    assert set(body["usage"]) >= {"input_tokens", "output_tokens", "total_tokens"}
    req = arbiter.seen[-1]
    assert req.task == "Name a colour." and req.max_tokens == 12 and "Instructions: Be brief." in req.context


def test_a_call_is_a_function_call_item_and_its_output_comes_back_as_input(tmp_path):
    arbiter = CallingArbiter(CALL)
    c = client(tmp_path, arbiter)
    body = {"input": "Weather in Paris?", "tools": [FLAT_WEATHER], "tool_choice": "required", "cache": False}
    r = c.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    (item,) = r.json()["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather"
    assert json.loads(item["arguments"]) == {"city": "Paris"} and item["call_id"].startswith("call_")
    assert arbiter.seen[-1].output is not None and "get_weather" in arbiter.seen[-1].instruction
    # The next request carries the call and its output as input items.
    arbiter.answer = "It is sunny."
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {k: item[k] for k in ("type", "call_id", "name", "arguments")},
        {"type": "function_call_output", "call_id": item["call_id"], "output": "sunny, 22 degrees"},
    ]
    r = c.post("/v1/responses", json={"input": items, "tools": [FLAT_WEATHER], "cache": False})
    assert r.json()["output"][0]["content"][0]["text"] == "It is sunny."
    req = arbiter.seen[-1]
    assert (
        req.task == "Weather in Paris?"
        and f"Tool result ({item['call_id']}): sunny, 22 degrees" in req.context
    )
    assert f"Assistant called: get_weather({item['arguments']})" in req.context


def test_the_stream_sends_the_typed_events_in_order(tmp_path):
    c = client(tmp_path, CallingArbiter("It is sunny in Paris."))
    got = events(c.post("/v1/responses", json={"input": "Weather?", "stream": True, "cache": False}).text)
    kinds = [e["type"] for e in got]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    text = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    assert text == "It is sunny in Paris." == got[-1]["response"]["output"][0]["content"][0]["text"]
    c = client(tmp_path, CallingArbiter(CALL))
    body = {"input": "Weather?", "tools": [FLAT_WEATHER], "tool_choice": "required", "stream": True}
    got = events(c.post("/v1/responses", json=body).text)
    args = "".join(e["delta"] for e in got if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    assert got[-1]["type"] == "response.completed" and got[-1]["response"]["output"][0]["arguments"] == args


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": [{"type": "web_search_call"}]}, "input item type 'web_search_call'"),
    ],
)
def test_what_legion_cannot_keep_or_do_is_a_400_naming_it(tmp_path, extra, field):
    r = client(tmp_path).post("/v1/responses", json={"input": "hi", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"{field} is not supported")


def test_ignored_fields_pass_and_store_false_is_fine(tmp_path):
    body = {
        "input": "hi",
        "store": False,
        "metadata": {"k": "v"},
        "parallel_tool_calls": True,
        "cache": False,
    }
    assert client(tmp_path).post("/v1/responses", json=body).status_code == 200


def test_parallel_calls_are_one_function_call_item_each(tmp_path):
    from tests.unit.test_tools import TIME, TWO_CALLS

    c = client(tmp_path, CallingArbiter(TWO_CALLS))
    tools = [FLAT_WEATHER, {"type": "function", **TIME["function"]}]
    body = {
        "input": "Weather and time?",
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": True,
    }
    out = c.post("/v1/responses", json=body).json()["output"]
    assert [(i["type"], i["name"]) for i in out] == [
        ("function_call", "get_weather"),
        ("function_call", "get_time"),
    ]
    got = events(c.post("/v1/responses", json=body | {"stream": True}).text)
    done = [e["item"]["name"] for e in got if e["type"] == "response.output_item.done"]
    assert done == ["get_weather", "get_time"] and got[-1]["response"]["parallel_tool_calls"] is True


@pytest.mark.parametrize(
    ("extra", "status", "says"),
    [
        ({"temperature": 3}, 422, "temperature"),
        ({"top_p": 0}, 422, "top_p"),
        ({"max_output_tokens": 0}, 422, "max_output_tokens"),
        ({"tool_choice": {"type": "function"}}, 400, "tool_choice is not supported: name a function"),
        ({"text": {"format": {"type": "xml"}}}, 400, "text.format type 'xml'"),
        ({"input": [{"role": "robot", "content": "hi"}]}, 400, "input message role 'robot'"),
    ],
)
def test_bad_values_say_what_to_fix(tmp_path, extra, status, says):
    r = client(tmp_path).post("/v1/responses", json={"input": "hi", **extra})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
