"""Sampling fields on ``/v1/chat/completions``: applied to every agent for the request, or refused
with a 400 that names the field; never dropped. From the HTTP body to the ``GenerateRequest``
each agent gets and the ``SamplingParams`` it decodes with (no Ray, no model)."""

from __future__ import annotations

import asyncio

import pytest

from legion.agent import Agent
from legion.config import AgentConfig, config_from_dict
from legion.messages import GenerateRequest, Sampling, TaskRequest
from legion.service.api import CHAT_IGNORED_FIELDS, ChatBody, chat_request
from legion.state.cache import ResultCache
from tests.unit.test_arbiter import ScriptedAgents, make
from tests.unit.test_routes import AgentsArbiter, client

ASK = [{"role": "user", "content": "Name a colour."}]


def _cfg(tmp_path):
    return config_from_dict({"agents": [{"name": "solver"}], "data_dir": str(tmp_path)})


def test_the_requests_sampling_is_in_the_task(tmp_path):
    cfg = _cfg(tmp_path)
    req = chat_request(ChatBody(messages=ASK, temperature=0.7, top_p=0.5, seed=11, stop="\n\n"), cfg)
    assert req.sampling == Sampling(temperature=0.7, top_p=0.5, seed=11, stop=["\n\n"])
    assert chat_request(ChatBody(messages=ASK, stop=["x", "y"]), cfg).sampling == Sampling(stop=["x", "y"])
    # Nothing set: the agents' own sampling, and the same cache key as before the field existed.
    plain = chat_request(ChatBody(messages=ASK), cfg)
    assert plain.sampling is None
    # The zero values of the refused fields change nothing, so they pass.
    zeros = ChatBody(
        messages=ASK,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        top_logprobs=0,
        logit_bias={},
        tools=[],
        parallel_tool_calls=True,
    )
    assert chat_request(zeros, cfg).sampling is None


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty", "no repetition penalties"),
        ({"frequency_penalty": -1}, "frequency_penalty", "no repetition penalties"),
        ({"logprobs": True}, "logprobs", "/v1/completions"),
        ({"top_logprobs": 3}, "top_logprobs", "arbitrated"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "vocabularies"),
        ({"functions": [{"name": "f"}]}, "functions", "does not know this chat field"),
        ({"web_search_options": {}}, "web_search_options", "does not know this chat field"),
    ],
)
def test_a_field_legion_cannot_honour_is_a_400_naming_it(tmp_path, extra, field, says):
    c = client(tmp_path)
    for stream in (False, True):
        r = c.post("/v1/chat/completions", json={"messages": ASK, "stream": stream, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_field" and err["details"] == {"field": field}
        assert err["message"].startswith(f"{field} is not supported: ") and says in err["message"]


def test_the_pipeline_hands_the_arbiter_the_sampling_and_ignored_fields_pass(tmp_path):
    arbiter = AgentsArbiter()
    c = client(tmp_path, arbiter)
    body = {"messages": ASK, "temperature": 1.2, "top_p": 0.9, "seed": 5, "stop": "!", "cache": False}
    ignored = {"metadata": {"k": "v"}, "store": False, "service_tier": "auto", "stream_options": None}
    assert set(ignored) <= CHAT_IGNORED_FIELDS
    r = c.post("/v1/chat/completions", json=body | ignored)
    assert r.status_code == 200, r.text
    assert arbiter.seen[-1].sampling == Sampling(temperature=1.2, top_p=0.9, seed=5, stop=["!"])
    assert c.post("/v1/chat/completions", json={"messages": ASK, "cache": False}).status_code == 200
    assert arbiter.seen[-1].sampling is None


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "1 to 64 characters"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
    ],
)
def test_out_of_range_sampling_says_what_to_fix(tmp_path, extra, says):
    r = client(tmp_path).post("/v1/chat/completions", json={"messages": ASK, **extra})
    assert r.status_code == 422, r.text
    assert says in r.json()["error"]["message"]


def test_every_agent_call_of_the_task_samples_as_the_request_asks(tmp_path):
    # Debate asks the dissenters again: the second round samples as the first.
    agents = ScriptedAgents(lambda agent, req: {"solver": "Paris", "reasoner": "Paris"}.get(agent, "Lyon"))
    arbiter = make(tmp_path, agents, debate_rounds=2)
    sampling = Sampling(temperature=0.8, top_p=0.7, seed=9, stop=["\n"])
    req = TaskRequest(id="t", task="Capital of France?", strategy="debate", sampling=sampling)
    asyncio.run(arbiter.run(req))
    assert len(agents.asked) > 3  # the fan-out and a debate round
    for _, gen in agents.asked:
        assert (gen.temperature, gen.top_p, gen.seed, gen.stop) == (0.8, 0.7, 9, ["\n"])
    # Without it, every field falls back to each agent's own config.
    agents.asked.clear()
    asyncio.run(arbiter.run(TaskRequest(id="t2", task="Capital of France?", strategy="plurality")))
    assert {(g.temperature, g.top_p, g.seed, g.stop) for _, g in agents.asked} == {(None, None, None, None)}


def _agent(**cfg) -> Agent:
    agent = object.__new__(Agent)  # its __init__ loads the model; sampling() needs only the config
    agent.cfg, agent._chat = AgentConfig(name="a", **cfg), None
    agent.members = agent._writers = {"a": agent.cfg}
    return agent


def test_the_agent_samples_with_the_requests_values_over_its_own():
    agent = _agent(sampling={"temperature": 0.3, "top_p": 0.8, "seed": 4, "stop": ["###"]})
    own = agent.sampling(GenerateRequest(task="x"))
    assert (own.temperature, own.top_p, own.seed) == (0.3, 0.8, 4)
    assert "###" in own.stop and "\nAnswer:" in own.stop  # its own stops and its prompt's markers
    asked = agent.sampling(GenerateRequest(task="x", temperature=0.0, top_p=0.5, seed=8, stop=["!"]))
    assert (asked.temperature, asked.top_p, asked.seed) == (0.0, 0.5, 8)
    # The request's stops add to the agent's own and to its prompt's markers.
    assert set(asked.stop) == {*own.stop, "!"}
    assert agent.sampling(GenerateRequest(task="x", stop=[])).stop == own.stop


def test_the_sampling_is_in_the_cache_key(tmp_path):
    cfg = _cfg(tmp_path)

    def key(**kw):
        return ResultCache.key(TaskRequest(id="t", task="Name a colour.", strategy="plurality", **kw), cfg)

    keys = {
        key(),
        key(sampling=Sampling(temperature=0.9)),
        key(sampling=Sampling(temperature=0.9, seed=1)),
        key(sampling=Sampling(stop=["."])),
    }
    assert len(keys) == 4
