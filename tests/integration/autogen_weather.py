"""AutoGen's ``AssistantAgent`` calls a tool through Legion and answers (docs/frameworks.md).

Run by tests/integration/test_frameworks.py with the interpreter of its own virtualenv
(``.venv-autogen``): autogen-core pins protobuf 5, which breaks Ray Serve in Legion's. Usage:
``autogen_weather.py BASE_URL``; prints one JSON object: the tool's parameter schema, the calls
the tool received, the run's message types, what went back to the model and the final answer.
"""

import asyncio
import json
import sys

from autogen_agentchat.agents import AssistantAgent
from autogen_core.models import FunctionExecutionResultMessage
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient

calls: list[dict] = []


async def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append({"city": city})
    return f"22 degrees and sunny in {city}"


class FirstCallForced(OpenAIChatCompletionClient):
    """``AssistantAgent`` asks with ``tool_choice="auto"`` and has no setting to change it: force a
    call until a tool's result is in the conversation (its reflection call sends no tools)."""

    async def create(self, messages, *, tools=(), tool_choice="auto", **kwargs):
        if tools and not any(isinstance(m, FunctionExecutionResultMessage) for m in messages):
            tool_choice = "required"
        return await super().create(messages, tools=tools, tool_choice=tool_choice, **kwargs)


async def main(base_url: str) -> None:
    client = FirstCallForced(
        model="legion",
        base_url=f"{base_url}/v1",
        api_key="unused",
        max_tokens=48,
        temperature=0,
        timeout=300,
        max_retries=0,
        model_info={
            "vision": False,
            "function_calling": True,
            "json_output": True,
            "structured_output": True,
            "family": "unknown",
        },
    )
    tool = FunctionTool(get_weather, description="The weather in a city.")
    agent = AssistantAgent("weather", model_client=client, tools=[tool], reflect_on_tool_use=True)
    result = await agent.run(task="What is the weather in Paris?")
    await client.close()
    context = await agent.model_context.get_messages()
    sent_back = [
        r.content for m in context if isinstance(m, FunctionExecutionResultMessage) for r in m.content
    ]
    out = {
        "schema": tool.schema["parameters"],
        "calls": calls,
        "messages": [type(m).__name__ for m in result.messages],
        "sent_back": sent_back,
        "answer": result.messages[-1].content,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
