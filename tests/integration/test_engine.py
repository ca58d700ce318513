"""The llama.cpp engine on the bundled model, outside Ray."""

from __future__ import annotations

import pytest

from legion.engine import LlamaEngine, SamplingParams, bundled_model_path
from legion.errors import InvalidRequest, ModelLoadError


@pytest.fixture(scope="module")
def engine():
    e = LlamaEngine(n_threads=1, n_ctx=1024)
    yield e
    e.close()


def test_greedy_generation_is_deterministic_and_stops(engine):
    p = SamplingParams(max_tokens=24, stop=["\n"])
    a = engine.generate("Question: What is the capital of France?\nAnswer:", p)
    b = engine.generate("Question: What is the capital of France?\nAnswer:", p)
    assert a.text == b.text
    assert "\n" not in a.text
    assert 0 < a.completion_tokens <= 24
    assert a.mean_logprob < 0


def test_max_tokens_is_respected(engine):
    g = engine.generate("Once upon a time", SamplingParams(max_tokens=5, stop=()))
    assert g.completion_tokens == 5
    assert g.finish_reason == "length"


def test_seeded_sampling_repeats(engine):
    p = SamplingParams(max_tokens=12, temperature=0.9, seed=11, stop=())
    assert engine.generate("The weather today", p).text == engine.generate("The weather today", p).text


def test_batch_equals_one_at_a_time_at_temperature_zero(engine):
    prompts = ["The capital of Italy is", "Water is made of", "The capital of Italy is", "1, 2, 3,"]
    p = SamplingParams(max_tokens=10, stop=())
    alone = [engine.generate(x, p).text for x in prompts]
    batched = [g.text for g in engine.generate_batch([(x, p) for x in prompts])]
    assert batched == alone


def test_score_prefers_the_right_continuation(engine):
    r = engine.score("The capital of France is", [" Paris", " a banana sandwich"])
    assert r[0].logprob > r[1].logprob
    assert r[0].n_tokens >= 1 and r[1].n_tokens >= 2
    assert r[0].n_bytes == len(b" Paris")


def test_shared_prefix_scoring_equals_separate_scoring(engine):
    ctx = "Question: Which gas do plants absorb from the air?\nAnswer:"
    choices = [
        " carbon dioxide",
        " oxygen",
        " nitrogen",
        " helium",
        " water vapour",
        " argon",
        " neon",
        " methane",
        " hydrogen",
    ]  # more than one group of sequences
    together = engine.score(ctx, choices)
    for c, t in zip(choices, together, strict=True):
        alone = engine.score(ctx, [c])[0]
        assert t.n_tokens == alone.n_tokens
        assert t.logprob == pytest.approx(alone.logprob, abs=1e-3)


def test_too_long_prompt_is_a_clear_error(engine):
    with pytest.raises(InvalidRequest, match="n_ctx"):
        engine.generate("word " * 2000, SamplingParams(max_tokens=8))


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LlamaEngine(str(tmp_path / "none.gguf"))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model" * 100)
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaEngine(str(bad))


def test_bundled_model_is_offline():
    assert bundled_model_path().endswith(".gguf")
