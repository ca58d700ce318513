"""Constrained output in the engine (outside Ray): grammars from JSON schemas hold on the bundled
Gemma and on the tiny llama-architecture model, and constrained sequences share decode steps
with free ones without changing the free ones' text."""

from __future__ import annotations

from dataclasses import replace

import pytest

from legion.engine.constrained import AnswerMismatch, json_object_spec, parse_answer, schema_spec
from legion.engine.llama import LlamaEngine, SamplingParams
from legion.errors import InvalidSchema

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"enum": ["France", "Italy", "Spain", "Japan"]},
        "population_millions": {"type": "integer"},
    },
    "required": ["city", "country", "population_millions"],
}
# A finite language: every answer completes within a few dozen characters. (The grammar holds
# types, enums, lengths and required keys; numeric bounds only the validation after it checks.)
PICK = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "n": {"enum": [1, 2, 3]},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "n", "ok"],
}
PROMPT = "Question: What is the capital of France? Answer with JSON.\nAnswer:"


@pytest.fixture(scope="module")
def engine():
    e = LlamaEngine(n_threads=2, n_ctx=1024, n_parallel=4)
    yield e
    e.close()


def _complete(text: str, spec) -> dict:
    """The answer's JSON value; fails the test when it does not validate."""
    try:
        return parse_answer(text, spec)
    except AnswerMismatch as exc:
        pytest.fail(f"{exc}: {text!r}")


def test_constrained_and_free_sequences_decode_together(engine):
    spec = schema_spec(CITY)
    free = SamplingParams(max_tokens=24, stop=())
    constrained = SamplingParams(max_tokens=96, grammar=spec.grammar)
    alone = engine.generate(PROMPT, free).text
    before = engine.stats()
    # Submitted together, so the scheduler admits all three at once and decodes them in the
    # same steps (the newcomers' prefills apart).
    futures = [
        engine.submit_generate(PROMPT, constrained),
        engine.submit_generate(PROMPT, free),
        engine.submit_generate("The capital of Italy is", replace(constrained, temperature=0.8, seed=3)),
    ]
    gens = [f.result()[0] for f in futures]
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    assert (after["step_seqs"] - before["step_seqs"]) > steps  # several sequences per step
    assert gens[1].text == alone  # a constrained neighbour does not change a free text
    for g in (gens[0], gens[2]):
        assert g.finish_reason == "stop", g  # ended because its grammar was complete
        value = _complete(g.text, spec)
        assert value["country"] in CITY["properties"]["country"]["enum"]


def test_sampled_constrained_answers_all_validate(engine):
    spec = schema_spec(PICK)
    params = SamplingParams(max_tokens=64, temperature=1.0, top_p=0.95, top_k=40, grammar=spec.grammar)
    gens = engine.generate_n("Pick a colour and a digit, as JSON:", params, n=4)
    for g in gens:
        assert g.finish_reason == "stop"
        _complete(g.text, spec)
    # Seeds differ per sample, so the samples are not all one greedy answer.
    assert len({g.text for g in gens}) > 1


def test_json_object_mode_and_greedy_repeatability(engine):
    spec = json_object_spec()
    params = SamplingParams(max_tokens=48, grammar=spec.grammar)
    a = engine.generate(PROMPT, params)
    b = engine.generate(PROMPT, params)
    assert a.text == b.text
    if a.finish_reason == "stop":
        assert isinstance(_complete(a.text, spec), dict)
    else:  # a JSON object the model had not closed by max_tokens: cut, and says so
        assert a.finish_reason == "length" and a.text.startswith("{")


def test_an_answer_cut_by_max_tokens_says_length_and_does_not_validate(engine):
    spec = schema_spec(CITY)
    g = engine.generate(PROMPT, SamplingParams(max_tokens=3, grammar=spec.grammar))
    assert g.finish_reason == "length" and g.completion_tokens == 3 and g.text.startswith("{")
    with pytest.raises(AnswerMismatch, match="not complete JSON"):
        parse_answer(g.text, spec)


def test_a_grammar_llama_cpp_cannot_parse_is_refused_and_the_engine_goes_on(engine):
    with pytest.raises(InvalidSchema, match="could not parse the grammar"):
        engine.submit_generate(PROMPT, SamplingParams(grammar="root ::= [unclosed"))
    # A constrained request stopped by its deadline frees its grammar like any other ending.
    cut = engine.generate(PROMPT, SamplingParams(max_tokens=64, grammar=schema_spec(CITY).grammar), 0.0)
    assert cut.finish_reason == "timeout"
    assert engine.generate(PROMPT, SamplingParams(max_tokens=4, stop=())).completion_tokens == 4


def test_grammars_hold_on_the_tiny_llama_model(tiny_model):
    """The tiny model's text is noise; under a grammar it is noise that validates."""
    spec = schema_spec(PICK)
    e = LlamaEngine(str(tiny_model.path), n_threads=1, n_ctx=256, n_parallel=4, prefix_cache_slots=0)
    try:
        greedy = SamplingParams(max_tokens=64, grammar=spec.grammar)
        sampled = replace(greedy, temperature=1.5, top_k=0, top_p=1.0)
        gens = e.generate_batch(
            [("Hello", greedy), ("Hello", replace(sampled, seed=1)), ("Hi", replace(sampled, seed=2))]
        )
        gens += e.generate_n("Pick", sampled, n=3)
        free = e.generate("Hello", SamplingParams(max_tokens=16, stop=()))
    finally:
        e.close()
    for g in gens:
        assert g.finish_reason == "stop", g
        _complete(g.text, spec)
    with pytest.raises(AnswerMismatch):  # without the grammar, the same model writes noise
        parse_answer(free.text, spec)
