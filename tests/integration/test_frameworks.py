"""Real agent frameworks, unmodified, run their own tool-calling loops against Legion over HTTP.

Each is asked a question, gets a call to its tool (forced on the first step: the bundled model
cannot be relied on to choose a tool by itself), runs the tool, sends the result back and gets a
final answer. docs/frameworks.md holds the same code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the weather in Paris?"
# AutoGen gets a virtualenv of its own: autogen-core 0.7.5 pins protobuf 5, which breaks Ray Serve.
AUTOGEN = ["autogen-agentchat==0.7.5", "autogen-ext[openai]==0.7.5"]
AUTOGEN_VENV = ROOT / ".venv-autogen"


def _weather(city: str) -> str:
    return f"22 degrees and sunny in {city}"


class _Wire:
    """The JSON bodies a framework's HTTP client sends (an httpx event hook: nothing is altered)."""

    def __init__(self):
        self.sent: list[tuple[str, dict]] = []

    def _record(self, request: httpx.Request) -> None:
        self.sent.append((request.url.path, json.loads(request.content)))

    async def _record_async(self, request: httpx.Request) -> None:
        self._record(request)

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=300, event_hooks={"request": [self._record]})

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=300, event_hooks={"request": [self._record_async]})


def _check_chat_loop(wire: _Wire, calls: list[dict]) -> None:
    """The first request forced a call to the tool, the tool received arguments valid for the
    schema that request sent, and a later request carried the tool's result back."""
    path, first = wire.sent[0]
    assert path == "/v1/chat/completions" and first["tool_choice"] == "required"
    assert calls, "the tool never ran"
    for args in calls:
        jsonschema.validate(args, first["tools"][0]["function"]["parameters"])
    _, last = wire.sent[-1]
    calls_made = [c for m in last["messages"] if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    results = [m for m in last["messages"] if m["role"] == "tool"]
    assert calls_made and [m["tool_call_id"] for m in results] == [c["id"] for c in calls_made]
    assert _weather(calls[0]["city"]) in results[0]["content"]


def test_langchain_openai(legion_url):
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    calls = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append({"city": city})
        return _weather(city)

    wire = _Wire()
    llm = ChatOpenAI(
        model="legion",
        base_url=f"{legion_url}/v1",
        api_key="unused",
        max_tokens=48,
        temperature=0,
        max_retries=0,
        extra_body={"cache": False},
        http_client=wire.client(),
    )
    messages = [HumanMessage(QUESTION)]
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert ai.tool_calls
    messages.append(ai)
    messages += [get_weather.invoke(call) for call in ai.tool_calls]  # ToolMessages
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    assert not final.tool_calls and final.content.strip()
    _check_chat_loop(wire, calls)
    assert len(wire.sent) == 2


def test_langchain_structured_output(legion_url):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Landmark(BaseModel):
        city: str
        country: str

    wire = _Wire()
    llm = ChatOpenAI(
        model="legion",
        base_url=f"{legion_url}/v1",
        api_key="unused",
        max_tokens=48,
        temperature=0,
        max_retries=0,
        http_client=wire.client(),
    )
    answer = llm.with_structured_output(Landmark, method="json_schema").invoke("Where is the Eiffel Tower?")
    assert isinstance(answer, Landmark)
    ((_, sent),) = wire.sent
    assert sent["response_format"]["type"] == "json_schema"
    jsonschema.validate(answer.model_dump(), sent["response_format"]["json_schema"]["schema"])


def test_pydantic_ai(legion_url):
    from openai import AsyncOpenAI
    from pydantic_ai import Agent, RunContext
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    wire = _Wire()
    client = AsyncOpenAI(
        base_url=f"{legion_url}/v1", api_key="unused", max_retries=0, http_client=wire.async_client()
    )

    def settings(ctx: RunContext) -> dict:
        # A static tool_choice="required" raises (it would force a call on every step); settings
        # from a callable are resolved per step: a call on the first, text after the tool ran.
        return {
            "max_tokens": 48,
            "temperature": 0,
            "tool_choice": "required" if ctx.run_step == 1 else "none",
        }

    agent = Agent(
        OpenAIChatModel("legion", provider=OpenAIProvider(openai_client=client)), model_settings=settings
    )
    calls = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append({"city": city})
        return _weather(city)

    result = agent.run_sync(QUESTION)
    assert isinstance(result.output, str) and result.output.strip()
    _check_chat_loop(wire, calls)
    assert wire.sent[-1][1]["tool_choice"] == "none"


def _openai_agent(model):
    from agents import Agent, ModelSettings, function_tool

    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append({"city": city})
        return _weather(city)

    # tool_choice="required" forces the first call; the SDK's reset_tool_choice (on by default)
    # sets it back to auto once the tool has run, so the agent can answer.
    agent = Agent(
        name="weather",
        instructions="Answer the question with the tool's result.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", max_tokens=48, temperature=0),
    )
    return agent, calls


def test_openai_agents_chat_completions(legion_url):
    from agents import OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    wire = _Wire()
    client = AsyncOpenAI(
        base_url=f"{legion_url}/v1", api_key="unused", max_retries=0, http_client=wire.async_client()
    )
    agent, calls = _openai_agent(OpenAIChatCompletionsModel(model="legion", openai_client=client))
    result = Runner.run_sync(agent, QUESTION, max_turns=3)
    assert isinstance(result.final_output, str) and result.final_output.strip()
    _check_chat_loop(wire, calls)


def _check_responses_loop(wire: _Wire, calls: list[dict]) -> None:
    """As ``_check_chat_loop``, over the Responses API's items."""
    assert {path for path, _ in wire.sent} == {"/v1/responses"}
    first, last = wire.sent[0][1], wire.sent[-1][1]
    assert first["tool_choice"] == "required"
    assert calls, "the tool never ran"
    for args in calls:
        jsonschema.validate(args, first["tools"][0]["parameters"])
    made = [i for i in last["input"] if i.get("type") == "function_call"]
    outputs = [i for i in last["input"] if i.get("type") == "function_call_output"]
    assert made and [o["call_id"] for o in outputs] == [c["call_id"] for c in made]
    assert _weather(calls[0]["city"]) in outputs[0]["output"]


def _default_openai_client(legion_url: str) -> _Wire:
    """Point the Agents SDK's default model path (the Responses API) at Legion."""
    from agents import set_default_openai_api, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    wire = _Wire()
    client = AsyncOpenAI(
        base_url=f"{legion_url}/v1", api_key="unused", max_retries=0, http_client=wire.async_client()
    )
    set_default_openai_client(client, use_for_tracing=False)
    set_default_openai_api("responses")
    return wire


def test_openai_agents_responses_api(legion_url):
    """The SDK's default path: the Responses API (``POST /v1/responses``) on the default client."""
    from agents import Runner

    wire = _default_openai_client(legion_url)
    agent, calls = _openai_agent("legion")
    result = Runner.run_sync(agent, QUESTION, max_turns=3)
    assert isinstance(result.final_output, str) and result.final_output.strip()
    _check_responses_loop(wire, calls)


def test_openai_agents_responses_api_streamed(legion_url):
    """The same loop streamed: the SDK reads Legion's typed Responses events."""
    import asyncio

    from agents import Runner

    wire = _default_openai_client(legion_url)
    agent, calls = _openai_agent("legion")

    async def run():
        result = Runner.run_streamed(agent, QUESTION, max_turns=3)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(run())
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert all(body.get("stream") is True for _, body in wire.sent)
    assert isinstance(result.final_output, str) and result.final_output.strip()
    _check_responses_loop(wire, calls)


@pytest.fixture(scope="session")
def autogen_python() -> Path:
    """The interpreter of ``.venv-autogen``, made (pinned AutoGen from PyPI) if it is missing."""
    python = AUTOGEN_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AUTOGEN_VENV)], check=True)
    want = {spec.split("[")[0].split("==")[0]: spec.split("==")[1] for spec in AUTOGEN}
    have = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print([m.version(n) for n in {list(want)!r}])"],
        capture_output=True,
        text=True,
    )
    if have.stdout.strip() != repr(list(want.values())):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AUTOGEN], check=True)
    return python


def test_autogen_assistant_agent(legion_url, autogen_python):
    script = Path(__file__).with_name("autogen_weather.py")
    run = subprocess.run([str(autogen_python), str(script), legion_url], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["calls"], "the tool never ran"
    for args in out["calls"]:
        jsonschema.validate(args, out["schema"])
    assert out["messages"] == ["TextMessage", "ToolCallRequestEvent", "ToolCallExecutionEvent", "TextMessage"]
    assert out["sent_back"] == [_weather(out["calls"][0]["city"])]
    assert out["answer"].strip()
