"""The bodies of /v1/completions, /v1/embeddings and /v1/models: validation and response shapes
(no Ray, no model)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from legion.config import config_from_dict
from legion.errors import InvalidRequest, ModelNotFound, PayloadTooLarge
from legion.messages import Generation
from legion.service.api import (
    CompletionBody,
    EmbeddingBody,
    agent_for_model,
    completion_request,
    completion_response,
    embedding_response,
    embedding_texts,
    models_response,
)

CFG = config_from_dict({"agents": [{"name": "a"}, {"name": "b"}], "serve": {"max_tokens_limit": 64}})


def _gen(**kw) -> Generation:
    base = dict(
        text=" Paris.",
        prompt_tokens=5,
        completion_tokens=3,
        finish_reason="stop",
        mean_logprob=-0.5,
        seconds=0.1,
        tokens=[" Paris", "."],
        token_logprobs=[-0.25, -0.75],
    )
    return Generation(**(base | kw))


def test_the_model_names_an_agent():
    assert agent_for_model("legion", ["a", "b"]) == "a"
    assert agent_for_model("agent:b", ["a", "b"]) == "b"
    assert agent_for_model("b", ["a", "b"]) == "b"
    with pytest.raises(ModelNotFound, match="agent:a, agent:b"):
        agent_for_model("gpt-4", ["a", "b"])


@pytest.mark.parametrize(
    "fields, error, match",
    [
        ({"prompt": ["x", "y"]}, InvalidRequest, "one text"),
        ({"prompt": ""}, InvalidRequest, "empty"),
        ({"prompt": "x" * 100_000}, PayloadTooLarge, "characters"),
        ({"max_tokens": 65}, InvalidRequest, "max_tokens"),
        ({"n": 2}, InvalidRequest, "n must be 1"),
        ({"stop": ["a", ""]}, InvalidRequest, "stop"),
        ({"suffix": "end"}, InvalidRequest, "suffix"),
    ],
)
def test_bad_completion_bodies_say_what_to_fix(fields, error, match):
    with pytest.raises(error, match=match):
        completion_request(CompletionBody(**({"prompt": "Hi"} | fields)), CFG)


def test_a_completion_request_carries_the_clients_settings():
    agent, req = completion_request(
        CompletionBody(model="agent:b", prompt=["Hi"], max_tokens=8, temperature=0.5, stop="\n"), CFG
    )
    assert agent == "b"
    assert (req.prompt, req.max_tokens, req.temperature, req.stop) == ("Hi", 8, 0.5, ["\n"])


def test_echo_and_logprobs_in_the_completion():
    body = CompletionBody(prompt="Capital:", logprobs=1, echo=True)
    r = completion_response(_gen(), body, "Capital:", "cmpl-1", "legion")
    c = r.choices[0]
    assert c.text == "Capital: Paris." and c.finish_reason == "stop"
    assert c.logprobs.tokens == ["Capital:", " Paris", "."]
    assert c.logprobs.token_logprobs == [None, -0.25, -0.75]
    assert c.logprobs.text_offset == [0, 8, 14]
    assert c.logprobs.top_logprobs == [None, {" Paris": -0.25}, {".": -0.75}]
    plain = completion_response(_gen(finish_reason="timeout"), CompletionBody(prompt="x"), "x", "c", "m")
    assert plain.choices[0].logprobs is None and plain.choices[0].finish_reason == "length"
    assert plain.usage.total_tokens == 8


def test_embedding_bodies_are_checked():
    assert embedding_texts(EmbeddingBody(model="m", input="hi"), CFG, "m") == ["hi"]
    with pytest.raises(ModelNotFound, match="'m'"):
        embedding_texts(EmbeddingBody(model="other", input="hi"), CFG, "m")
    with pytest.raises(InvalidRequest, match=r"input\[1\]"):
        embedding_texts(EmbeddingBody(model="m", input=["hi", ""]), CFG, "m")
    with pytest.raises(InvalidRequest, match="input is empty"):
        embedding_texts(EmbeddingBody(model="m", input=[]), CFG, "m")


def test_the_embedding_model_answers_to_its_id_and_its_hub_name():
    from legion.service.completions import embedding_model_name

    model = embedding_model_name()
    assert model == "all-MiniLM-L6-v2"  # not "model", its package's folder
    hub = "sentence-transformers/all-MiniLM-L6-v2"
    assert embedding_texts(EmbeddingBody(model=hub, input="hi"), CFG, model, (hub,)) == ["hi"]
    with pytest.raises(ModelNotFound, match=r"use 'all-MiniLM-L6-v2' \(or 'sentence-transformers/") as err:
        embedding_texts(EmbeddingBody(model="text-embedding-3-small", input="hi"), CFG, model, (hub,))
    assert err.value.details == {"allowed": [model, hub]}


def test_base64_embeddings_are_little_endian_float32():
    vec = [0.5, -0.25, 0.125]
    r = embedding_response([vec], 3, EmbeddingBody(model="m", input="x", encoding_format="base64"), "m")
    raw = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype="<f4")
    assert raw.tolist() == vec
    with pytest.raises(InvalidRequest, match="3-dimensional"):
        embedding_response([vec], 3, EmbeddingBody(model="m", input="x", dimensions=4), "m")


def test_models_list_strategies_agents_and_the_embedder():
    model = {"file": "x.gguf", "path": "/x.gguf", "architecture": "llama", "description": "llama 1M F32",
             "size_bytes": 10, "n_params": 5, "n_ctx_train": 64}  # fmt: skip
    agents = [{"name": "a", "health": {"model": model}}, {"name": "b", "health": {"model": None}}]
    out = models_response(agents, "all-MiniLM-L6-v2").model_dump()
    ids = [m["id"] for m in out["data"]]
    assert ids[0] == "legion" and "agent:a" in ids and "agent:b" in ids and ids[-1] == "all-MiniLM-L6-v2"
    a = next(m for m in out["data"] if m["id"] == "agent:a")
    assert a["legion_model"]["file"] == "x.gguf" and a["legion_agent"] == "a"
    assert "legion_model" not in out["data"][0]


class _Agents:
    """The Arbiter's side of a completion, standing in for Ray (the routes are under test)."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.asked: list[tuple[str, str]] = []

    async def complete(self, agent, req):
        self.asked.append((agent, req.prompt))
        if self.fail:
            raise self.fail
        return _gen()

    async def complete_stream(self, agent, req):
        self.asked.append((agent, req.prompt))
        if self.fail:
            raise self.fail
        gen = _gen()
        for word in gen.text.split(" "):  # the pieces as an engine hands them over
            if word:
                yield " " + word
        yield gen

    async def agents(self):
        raise RuntimeError("the Arbiter is restarting")


def _routes(agents: _Agents):
    from legion.service.completions import OpenAIRoutes

    routes = OpenAIRoutes(CFG, agents, embedder=None)
    routes._embedding_model = "all-MiniLM-L6-v2"
    return routes


async def _read(stream) -> list[str]:
    return [event async for event in stream]


def test_a_streamed_completion_comes_piece_by_piece_then_finishes_then_done():
    import asyncio
    import json

    agents = _Agents()
    events = asyncio.run(_read(_routes(agents).stream(CompletionBody(model="agent:b", prompt="Capital:"))))
    assert agents.asked == [("b", "Capital:")]
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == " Paris."
    assert [c["choices"][0].get("finish_reason") for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == _gen().completion_tokens
    # With logprobs the completion comes whole, in one chunk.
    whole = asyncio.run(
        _read(_routes(agents).stream(CompletionBody(model="agent:b", prompt="C:", logprobs=0)))
    )
    assert len(whole) == 2 and json.loads(whole[0].removeprefix("data: "))["choices"][0]["text"] == " Paris."


def test_a_bad_stream_body_fails_before_the_stream_and_a_late_error_is_an_error_chunk():
    import asyncio
    import json

    with pytest.raises(ModelNotFound):
        _routes(_Agents()).stream(CompletionBody(model="agent:zz", prompt="x"))
    failing = _Agents(fail=InvalidRequest("the prompt is 9000 tokens; shorten it"))
    events = asyncio.run(_read(_routes(failing).stream(CompletionBody(prompt="x"))))
    err = json.loads(events[0].removeprefix("data: "))["error"]
    assert "shorten it" in err["message"] and err["code"] == "invalid_request"
    assert events[-1] == "data: [DONE]\n\n"


def test_models_still_list_the_strategies_while_the_arbiter_is_away():
    import asyncio

    ids = [m.id for m in asyncio.run(_routes(_Agents()).models()).data]
    assert "legion" in ids and ids[-1] == "all-MiniLM-L6-v2" and not any(i.startswith("agent:") for i in ids)
