"""The whole path: HTTP → Serve ingress → ArbiterActor → AgentActors on the bundled model."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import ray

from tests.integration.conftest import TEST_APP


def test_health_models_and_agents(client, legion_config):
    h = client.get("/healthz")
    assert h.status_code == 200
    assert set(h.json()["agents"]) == {a.name for a in legion_config.agents}

    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "legion" in ids and "legion:plurality" in ids

    agents = client.get("/v1/agents").json()["agents"]
    assert [a["name"] for a in agents] == [a.name for a in legion_config.agents]
    for a in agents:
        assert a["health"]["loaded"] is True
        assert a["config"]["num_cpus"] == 0.6
        assert set(a["stats"]) >= {"requests", "completion_tokens", "tokens_per_s"}


def test_named_actors_are_visible(legion_url, legion_config):
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    for a in legion_config.agents:
        assert f"{TEST_APP}-agent-{a.name}" in names
    assert f"{TEST_APP}-arbiter" in names


def test_task_is_answered_with_trace(client, legion_config):
    r = client.post("/v1/tasks", json={"task": "What is the capital of France?", "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strategy"] == "plurality"
    assert body["answer"].strip()
    assert {c["agent"] for c in body["candidates"]} == {a.name for a in legion_config.agents}
    ok = [c for c in body["candidates"] if "error" not in c]
    assert ok and all(isinstance(c["score"], float) for c in ok)
    # The votes count every answering agent once, and the answer is the top-voted group.
    assert sum(body["votes"].values()) == len(ok)
    winner = next(e for e in body["trace"] if e["step"] == "decision")["data"]["winner"]
    assert body["votes"][winner] == max(body["votes"].values())
    assert body["latency_ms"] > 0
    steps = [e["step"] for e in body["trace"]]
    assert steps[0] == "fanout" and steps[-1] == "decision"


def test_agents_count_their_work(client):
    before = {a["name"]: a["stats"]["completion_tokens"] for a in client.get("/v1/agents").json()["agents"]}
    client.post("/v1/tasks", json={"task": "Name a primary color.", "max_tokens": 8}).raise_for_status()
    after = client.get("/v1/agents").json()["agents"]
    assert any(a["stats"]["completion_tokens"] > before[a["name"]] for a in after)
    assert all(a["stats"]["requests"] >= 1 for a in after)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"task": ""}, 422, "task is empty"),
        ({"task": "   "}, 422, "task is empty"),
        ({"task": "x" * 9000}, 413, "limit is 8000"),
        ({"task": "hi", "strategy": "dictator"}, 422, "plurality"),
        ({"task": "hi", "max_tokens": 0}, 422, "between 1 and 64"),
        ({"task": "hi", "max_tokens": 65}, 422, "between 1 and 64"),
        ({"task": "hi", "max_tokens": "many"}, 422, "max_tokens"),
        ({}, 422, "task"),
        ({"task": "hi", "temprature": 1}, 422, "temprature"),
        ({"task": 42}, 422, "task"),
    ],
)
def test_bad_task_input_is_a_clear_4xx(client, body, status, fragment):
    r = client.post("/v1/tasks", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_malformed_json_is_400(client):
    r = client.post("/v1/tasks", content=b'{"task": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


def test_openai_client_non_streaming(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused")
    resp = oa.chat.completions.create(
        model="legion",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What color is the sky on a clear day?"},
        ],
        max_tokens=12,
    )
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.strip()
    assert resp.usage.completion_tokens > 0
    assert next(m.id for m in oa.models.list().data) == "legion"


def test_openai_client_streaming(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused")
    stream = oa.chat.completions.create(
        model="legion:plurality",
        messages=[{"role": "user", "content": "Name a large animal."}],
        max_tokens=12,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_client_errors(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oa.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.UnprocessableEntityError, match="no user message"):
        oa.chat.completions.create(model="legion", messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        oa.chat.completions.create(model="legion", n=2, messages=[{"role": "user", "content": "hi"}])


def test_chat_sampling_fields_reach_every_agent_or_are_refused(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused", timeout=300, max_retries=0)
    ask = [{"role": "user", "content": "Describe the weather in spring."}]

    def texts(**kw) -> dict[str, str]:
        r = oa.chat.completions.create(
            model="legion", messages=ask, max_tokens=16, extra_body={"cache": False}, **kw
        )
        return {c["agent"]: c["text"] for c in r.model_dump()["legion"]["candidates"]}

    # temperature=0 makes every agent greedy, whatever its own temperature (the default critic
    # samples at 0.6) and whatever the seed: the same texts under two seeds.
    greedy = texts(temperature=0, seed=1)
    assert len(greedy) == 3 and texts(temperature=0, seed=2) == greedy
    # A stop sequence ends every agent's answer before it.
    assert any("e" in t for t in greedy.values())
    stopped = texts(temperature=0, stop=["e"])
    assert all("e" not in t for t in stopped.values())
    assert all(greedy[a].strip().startswith(t.strip()) for a, t in stopped.items())
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        oa.chat.completions.create(model="legion", messages=ask, logprobs=True)


WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": WEATHER_ARGS,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {}}},
]


def test_function_calling_with_the_openai_client(legion_url):
    import jsonschema

    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused", timeout=300, max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    opts = {"model": "legion", "tools": TOOLS, "max_tokens": 48, "extra_body": {"cache": False}}
    # required: every agent must call one of the tools; the vote picks the call.
    r = oa.chat.completions.create(messages=ask, tool_choice="required", **opts)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(args, WEATHER_ARGS)
    # A named function: that one is called.
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = oa.chat.completions.create(messages=ask, tool_choice=named, **opts)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    # Streamed: the call's id and name first, then its arguments in pieces, as OpenAI sends them.
    pieces = [c for c in oa.chat.completions.create(messages=ask, tool_choice=named, stream=True, **opts)]
    deltas = [d for c in pieces for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    streamed = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(streamed), WEATHER_ARGS)
    assert pieces[-1].choices[0].finish_reason == "tool_calls"
    # The second turn carries the call and the tool's result; the agents answer in text.
    turn = [
        *ask,
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    final = oa.chat.completions.create(messages=turn, tool_choice="none", **opts)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content.strip()
    with pytest.raises(openai.BadRequestError, match="listed twice"):
        oa.chat.completions.create(messages=ask, **{**opts, "tools": [TOOLS[0], TOOLS[0]]})
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        oa.chat.completions.create(
            messages=ask, tool_choice={"type": "function", "function": {"name": "nope"}}, **opts
        )


def test_the_responses_api_with_the_openai_client(legion_url):
    import jsonschema

    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused", timeout=300, max_retries=0)
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    opts = {"model": "legion", "max_output_tokens": 48, "extra_body": {"cache": False}}
    r = oa.responses.create(input="Name a large animal.", instructions="Answer briefly.", **opts)
    assert r.status == "completed" and r.output[0].type == "message" and r.output_text.strip()
    assert r.usage.output_tokens > 0
    ask = "What is the weather in Paris?"
    named = {"type": "function", "name": "get_weather"}
    r = oa.responses.create(input=ask, tools=tools, tool_choice=named, **opts)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    # Streamed: the typed events, the call's arguments in deltas.
    events = list(oa.responses.create(input=ask, tools=tools, tool_choice=named, stream=True, **opts))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(args), WEATHER_ARGS)
    # The next turn: the call and its output as input items; the answer in text.
    turn = [
        {"role": "user", "content": ask},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "22 degrees and sunny"},
    ]
    final = oa.responses.create(input=turn, tools=tools, tool_choice="none", **opts)
    assert final.output[0].type == "message" and final.output_text.strip()
    with pytest.raises(openai.BadRequestError, match="previous_response_id is not supported"):
        oa.responses.create(input="hi", previous_response_id=r.id, **opts)


def test_concurrent_tasks_all_answer(client, legion_url):
    results = []

    def ask(i):
        with httpx.Client(base_url=legion_url, timeout=300) as c:
            results.append(c.post("/v1/tasks", json={"task": f"What is {i} plus {i}?", "max_tokens": 8}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 6
    assert len({r.json()["id"] for r in results}) == 6


def test_identical_concurrent_tasks_share_one_run(client, legion_url):
    """Identical cache misses that arrive while the first runs wait for its answer instead of
    each reaching the agents (and a late one is a cache hit)."""
    body = {"task": "Which planet is known as the red planet?", "max_tokens": 8}
    before = {a["name"]: a["stats"]["requests"] for a in client.get("/v1/agents").json()["agents"]}
    results = []
    start = threading.Barrier(4)

    def ask():
        with httpx.Client(base_url=legion_url, timeout=300) as c:
            start.wait()
            results.append(c.post("/v1/tasks", json=body))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    answers = [r.json() for r in results]
    assert len({a["id"] for a in answers}) == 4 and len({a["answer"] for a in answers}) == 1
    leaders = [a for a in answers if not a["cached"] and a["trace"][0]["step"] != "coalesced"]
    followers = [a for a in answers if a["trace"][0]["step"] == "coalesced"]
    assert len(leaders) == 1, [a["trace"][0] for a in answers]
    assert followers and all(f["trace"][0]["data"]["with"] == leaders[0]["id"] for f in followers)
    assert all(f["trace"][1:] == leaders[0]["trace"] for f in followers)
    after = {a["name"]: a["stats"]["requests"] for a in client.get("/v1/agents").json()["agents"]}
    assert all(after[name] == before[name] + 1 for name in before), (before, after)


def test_killed_agent_does_not_block_the_answer(client, legion_url, legion_config):
    victim_name = "critic"
    victim = ray.get_actor(f"{TEST_APP}-agent-{victim_name}", namespace=legion_config.ray_namespace)
    out = {}

    def ask():
        with httpx.Client(base_url=legion_url, timeout=300) as c:
            out["r"] = c.post("/v1/tasks", json={"task": "Describe the water cycle.", "max_tokens": 64})

    t = threading.Thread(target=ask)
    t.start()
    # Kill the agent while it is generating for this task (not before, not after).
    deadline = time.monotonic() + 120
    while ray.get(victim.stats.remote())["in_flight"] == 0:
        assert time.monotonic() < deadline and t.is_alive(), "the task never reached the agent"
        time.sleep(0.02)
    ray.kill(victim, no_restart=False)
    t.join()
    body = out["r"].json()
    assert out["r"].status_code == 200, body
    assert victim_name in body["missing_agents"]
    assert body["answer"].strip()
    survivors = [c for c in body["candidates"] if "error" not in c]
    assert {c["agent"] for c in survivors} == {"solver", "reasoner"}
    assert any(e["step"] == "agent_failed" and e["data"]["agent"] == victim_name for e in body["trace"])

    # The agent restarts, reloads its model and rejoins.
    deadline = time.monotonic() + 300
    while client.get("/healthz").status_code != 200:
        assert time.monotonic() < deadline, "the killed agent never came back"
        time.sleep(0.5)
    r = client.post("/v1/tasks", json={"task": "Name a fruit.", "max_tokens": 8})
    assert r.status_code == 200
    assert r.json()["missing_agents"] == []
