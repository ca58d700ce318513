"""``/v1/completions``, ``/v1/embeddings`` and ``/v1/models`` through the real Serve app, driven by
the official ``openai`` client; and a heterogeneous pool (the bundled Gemma and the tiny test
model, each a chat agent with its own template) answering through Ray Serve.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.conftest import wait_healthy

MIX_APP = "legionmix"


@pytest.fixture(scope="module")
def oai(legion_url):
    return OpenAI(base_url=f"{legion_url}/v1", api_key="unused", timeout=300, max_retries=0)


def _models(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/models", timeout=60)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


# ------------------------------------------------------------------ completions
def test_a_completion_continues_the_prompt_on_one_agent(oai):
    prompt = "The capital of France is"
    r = oai.completions.create(model="agent:solver", prompt=prompt, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == "agent:solver"
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    # Greedy: the same text again, and streamed: piece by piece as it is decoded.
    again = oai.completions.create(model="legion", prompt=prompt, max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text  # "legion" is the first agent, the solver
    streamed = oai.completions.create(
        model="agent:solver", prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len([c for c in chunks if c.choices[0].text]) > 2  # not the whole text at once
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_logprobs_echo_and_stop(oai):
    prompt = "One, two, three, four,"
    r = oai.completions.create(
        model="agent:solver", prompt=prompt, max_tokens=12, temperature=0, logprobs=1, echo=True
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n_prompt = len(lp.tokens) - r.usage.completion_tokens
    echoed, generated = lp.tokens[:n_prompt], lp.tokens[n_prompt:]
    assert "".join(echoed) == prompt and "".join(generated) == choice.text[len(prompt) :]
    assert n_prompt > 4 and lp.text_offset[:n_prompt] == [len("".join(echoed[:i])) for i in range(n_prompt)]
    assert all(x <= 0 and math.isfinite(x) for x in lp.token_logprobs if x is not None)
    assert lp.token_logprobs[1:n_prompt].count(None) == 0  # after the first, every prompt token has one
    assert [list(t) for t in lp.top_logprobs[n_prompt:]] == [[t] for t in generated]
    assert lp.text_offset[n_prompt] == len(prompt)
    # The echoed log-probability of the prompt's last token is the one the model gives it as
    # the next token after the rest of the prompt (up to batched-kernel rounding).
    head = "".join(echoed[:-1])
    nxt = oai.completions.create(
        model="agent:solver", prompt=head, max_tokens=1, temperature=0, logprobs=5
    ).choices[0]
    assert abs(nxt.logprobs.top_logprobs[0][echoed[-1]] - lp.token_logprobs[n_prompt - 1]) < 0.1
    # A stop text taken from that completion ends the next one just before it.
    completion = choice.text[len(prompt) :]
    cut = completion.index(",", 2) if "," in completion[2:] else len(completion) // 2
    stop = completion[cut : cut + 2]
    s = oai.completions.create(model="agent:solver", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].text == completion[: completion.index(stop)]
    assert s.choices[0].finish_reason == "stop"


def test_top_logprobs_are_the_most_likely_tokens_and_hold_the_sampled_one(oai):
    prompt = "The capital of France is"
    greedy = oai.completions.create(
        model="agent:solver", prompt=prompt, max_tokens=6, temperature=0, logprobs=3
    ).choices[0]
    lp = greedy.logprobs
    # (Two tokens may spell the same text, e.g. partial UTF-8 pieces: then a step lists fewer.)
    assert any(len(top) == 3 for top in lp.top_logprobs)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        values = list(top.values())
        assert len(top) <= 3 and values == sorted(values, reverse=True)
        assert top[token] == max(values) and abs(top[token] - chosen) < 1e-4  # greedy takes the best
        assert all(v <= 0 for v in values) and sum(math.exp(v) for v in values) <= 1 + 1e-6
    # Sampled tokens are reported even when they are not among the three most likely.
    sampled = oai.completions.create(
        model="agent:solver", prompt=prompt, max_tokens=12, temperature=1.5, seed=7, logprobs=3
    ).choices[0]
    slp = sampled.logprobs
    assert all(t in top and len(top) <= 4 for t, top in zip(slp.tokens, slp.top_logprobs, strict=True))


def test_bad_completion_requests_say_what_to_fix(oai):
    with pytest.raises(openai.NotFoundError, match="agent:solver"):
        oai.completions.create(model="agent:nobody", prompt="Hi", max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="one text"):
        oai.completions.create(model="agent:solver", prompt=["a", "b"], max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        oai.completions.create(model="agent:solver", prompt="Hi", max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError, match="stop"):
        oai.completions.create(
            model="agent:solver", prompt="Hi", max_tokens=4, stop=["a", "b", "c", "d", "e"]
        )
    with pytest.raises(openai.UnprocessableEntityError, match="prompt is empty"):
        oai.completions.create(model="agent:solver", prompt="", max_tokens=4)


# ------------------------------------------------------------------ embeddings
def test_embeddings_come_from_the_retrieval_model(oai, legion_url):
    models = _models(legion_url)
    (model,) = [m for m in models if not m.startswith(("legion", "agent:"))]
    texts = ["a cat sat on the mat", "a kitten sat on the rug", "the tax code of 1986"]
    r = oai.embeddings.create(model=model, input=texts)  # the client asks for base64 and decodes it
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == model and r.usage.prompt_tokens > 0
    assert len({len(v) for v in vecs}) == 1
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vecs)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    floats = httpx.post(
        f"{legion_url}/v1/embeddings", json={"model": model, "input": texts[0], "encoding_format": "float"}
    ).json()["data"][0]["embedding"]
    assert max(abs(x - y) for x, y in zip(floats, vecs[0], strict=True)) < 1e-6
    # Its real id, not its package's folder name; the hub name is accepted too.
    assert model == "all-MiniLM-L6-v2"
    hub = oai.embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", input=texts[0])
    assert hub.model == model
    assert max(abs(x - y) for x, y in zip(hub.data[0].embedding, vecs[0], strict=True)) < 1e-5
    with pytest.raises(openai.NotFoundError, match=model):
        oai.embeddings.create(model="text-embedding-3-small", input="hi")
    with pytest.raises(openai.UnprocessableEntityError, match=r"input\[1\] is empty"):
        oai.embeddings.create(model=model, input=["hi", " "])
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        oai.embeddings.create(model=model, input="hi", dimensions=len(vecs[0]) + 1)


# ------------------------------------------------------------------ models
def test_models_list_the_agents_models(legion_url, legion_config):
    models = _models(legion_url)
    assert "legion" in models and "legion:plurality" in models
    for a in legion_config.agents:
        entry = models[f"agent:{a.name}"]
        assert entry["legion_agent"] == a.name
        assert entry["legion_model"]["file"].endswith(".gguf")
        assert entry["legion_model"]["architecture"] == "gemma3"
        assert entry["legion_model"]["n_params"] > 0 and entry["legion_model"]["size_bytes"] > 0
    spec = httpx.get(f"{legion_url}/openapi.json", timeout=60).json()
    for path in ("/v1/completions", "/v1/embeddings"):
        assert "requestBody" in spec["paths"][path]["post"]
    assert {"CompletionBody", "Completion", "EmbeddingBody", "EmbeddingList"} <= set(
        spec["components"]["schemas"]
    )


# ------------------------------------------------------------------ a pool of two models
@pytest.fixture(scope="module")
def mix_app(legion_url, legion_config, tiny_model):
    """One more small app: a Gemma chat agent and a tiny-model chat agent."""
    from ray import serve

    from actors import stop_actors
    from legion.config import config_from_dict
    from serve_app import build_app

    cfg = config_from_dict(
        {
            "agents": [
                {
                    "name": "gemma",
                    "prompt_format": "chat",
                    "chat_template": "gemma",
                    "num_cpus": 0.3,
                    "n_parallel": 2,
                    "n_ctx": 1024,
                    "sampling": {"max_tokens": 48},
                },
                {
                    "name": "tiny",
                    "model_path": str(tiny_model.path),
                    "prompt_format": "chat",
                    "num_cpus": 0.3,
                    "n_parallel": 2,
                    "n_ctx": 512,
                    "sampling": {"max_tokens": 48},
                },
            ],
            "arbiter": {"agent_timeout_s": 300},
            "serve": {"app_name": MIX_APP, "max_replicas": 1, "ingress_num_cpus": 0},
            "cache": {"enabled": False},
            "data_dir": legion_config.data_dir,
        }
    )
    serve.run(build_app(cfg), name=MIX_APP, route_prefix=f"/{MIX_APP}")
    url = f"{legion_url}/{MIX_APP}"
    wait_healthy(url, 300)
    yield url
    serve.delete(MIX_APP)
    stop_actors(cfg)


def test_a_pool_of_two_different_models_answers(mix_app, tiny_model):
    r = httpx.post(f"{mix_app}/v1/tasks", json={"task": "What is the capital of France?"}, timeout=300)
    assert r.status_code == 200, r.text
    by_agent = {c["agent"]: c for c in r.json()["candidates"]}
    assert set(by_agent) == {"gemma", "tiny"} and not r.json()["missing_agents"]
    # The tiny model says its scripted reply only after its own template's generation prompt,
    # and says nothing more only because generation stopped at its end-of-turn token.
    assert by_agent["tiny"]["text"].strip() == tiny_model.reply.strip()
    assert by_agent["gemma"]["text"].strip()


def test_scoring_strategies_score_each_answer_after_each_agents_own_template(mix_app):
    # Borda asks every agent for its log-likelihood of every distinct answer: each agent scores
    # after its own chat prompt (the Arbiter used to build completion prompts for this, which a
    # chat agent refused, so its scores were missing).
    r = httpx.post(
        f"{mix_app}/v1/tasks", json={"task": "Name a primary color.", "strategy": "borda"}, timeout=300
    )
    assert r.status_code == 200, r.text
    trace = r.json()["trace"]
    assert [e for e in trace if e["step"] == "agent_failed"] == []
    # The tiny model always says its scripted reply, so the two answers differ and get scored.
    (s,) = [e["data"] for e in trace if e["step"] == "scores"]
    assert set(s["loglik"]) == {"gemma", "tiny"} and set(s["prior"]) == {"gemma", "tiny"}
    assert all(len(v) == len(s["options"]) == 2 for v in s["loglik"].values())


def test_a_raw_completion_on_the_tiny_agent_stops_at_its_end_of_turn_token(mix_app, tiny_model):
    oai = OpenAI(base_url=f"{mix_app}/v1", api_key="unused", timeout=300, max_retries=0)
    # After a newline the tiny model says its reply, then <|tiny_end|>, which ends generation.
    r = oai.completions.create(model="agent:tiny", prompt="Hi there\n", max_tokens=40, temperature=0)
    assert r.choices[0].text == tiny_model.reply
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40
    # Without the newline it never ends: noise until max_tokens.
    r = oai.completions.create(model="agent:tiny", prompt="Hi there", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12


def test_the_chat_route_asks_both_models(mix_app, tiny_model):
    oai = OpenAI(base_url=f"{mix_app}/v1", api_key="unused", timeout=300, max_retries=0)
    chat = oai.chat.completions.create(
        model="legion", messages=[{"role": "user", "content": "Say hello."}], max_tokens=48
    )
    cands = {c["agent"]: c for c in chat.model_extra["legion"]["candidates"]}
    assert set(cands) == {"gemma", "tiny"}
    assert cands["tiny"]["text"].strip() == tiny_model.reply.strip()
    assert cands["gemma"]["text"].strip() and chat.choices[0].message.content


def test_agents_and_models_show_both_models(mix_app, tiny_model):
    agents = {a["name"]: a for a in httpx.get(f"{mix_app}/v1/agents", timeout=60).json()["agents"]}
    gemma, tiny = agents["gemma"], agents["tiny"]
    assert tiny["health"]["model"]["file"] == tiny_model.path.name
    assert tiny["health"]["model"]["architecture"] == "llama"
    assert gemma["health"]["model"]["architecture"] == "gemma3"
    assert tiny["pool"]["model_file"] == tiny_model.path.name
    assert tiny["health"]["model"]["n_params"] < gemma["health"]["model"]["n_params"]
    models = _models(mix_app)
    assert models["agent:tiny"]["legion_model"]["file"] == tiny_model.path.name
    assert models["agent:gemma"]["legion_model"]["architecture"] == "gemma3"
