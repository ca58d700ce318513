"""The llama.cpp engine on the bundled model, outside Ray."""

from __future__ import annotations

import time

import pytest

from legion.engine.llama import LlamaEngine, SamplingParams, bundled_model_path
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


def test_streamed_text_comes_piece_by_piece_and_joins_to_the_final_text(engine):
    prompt = "Question: Name three colors, one per line.\nAnswer:"
    for stop in (["\n\n", "\nQuestion:"], ["\n"], []):
        p = SamplingParams(max_tokens=32, stop=stop)
        pieces: list[str] = []
        (streamed,) = engine.submit_generate(prompt, p, on_text=pieces.append).result()
        assert "".join(pieces) == streamed.text == engine.generate(prompt, p).text
        assert not any(x in piece for piece in pieces for x in stop)  # nothing past a stop
        assert len(pieces) > 1 or streamed.completion_tokens <= 1
    with pytest.raises(InvalidRequest, match="n == 1"):
        engine.submit_generate(prompt, SamplingParams(max_tokens=4), n=2, on_text=pieces.append)


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


def _wait_idle(engine):
    for _ in range(1000):
        st = engine.stats()
        if st["active_seqs"] == 0 and st["queue_depth"] == 0 and st["free_seqs"] == engine.n_parallel:
            return st
        time.sleep(0.01)
    raise AssertionError(f"engine never went idle: {engine.stats()}")


def test_sequences_join_and_leave_mid_flight(engine):
    """A request that arrives while another is decoding joins the running batch, and every
    text equals the one the prompt gets alone (no token leaks between sequences)."""
    greedy = SamplingParams(max_tokens=40, stop=())
    short = SamplingParams(max_tokens=6, stop=())
    prompts = ["The history of Rome", "A recipe for bread:", "def fibonacci(n):"]
    alone_long = engine.generate(prompts[0], greedy).text
    alone_short = [engine.generate(p, short).text for p in prompts[1:]]
    steps_before = engine.stats()["steps"]
    long_job = engine.submit_generate(prompts[0], greedy)
    # Wait until the long sequence is decoding, then add the short ones.
    while engine.stats()["steps"] < steps_before + 3:
        time.sleep(0.005)
    joined = [engine.submit_generate(p, short) for p in prompts[1:]]
    assert [f.result()[0].text for f in joined] == alone_short
    assert not long_job.done() or long_job.result()[0].completion_tokens == 40
    assert long_job.result()[0].text == alone_long
    st = _wait_idle(engine)
    assert st["free_cells"] == engine.n_cells  # every KV cell given back
    assert st["mean_batch_occupancy"] > 1.0  # some steps decoded several sequences at once


def test_jobs_arriving_and_leaving_in_waves_do_not_change_a_greedy_text(engine):
    """Jobs arrive and leave in waves while a long sequence decodes (streams freed mid-flight,
    gaps in the ids filled, fan-outs copying a stream): every text, the long one included,
    equals the text its prompt gets alone.

    Equality is not guaranteed for every prompt: llama.cpp's CPU kernels can round a row
    differently in another batch shape, which flips a greedy token where two are nearly tied.
    A token leaking between sequences would change these texts wholesale."""
    long_p = SamplingParams(max_tokens=36, stop=())
    waves = [
        (2, [("A recipe for bread:", 5, 1), ("def fibonacci(n):", 3, 1)]),
        (6, [("The largest planet is", 8, 2)]),
        (11, [("Dear diary, today", 4, 1), ("1, 2, 3,", 6, 1), ("Paris is", 2, 1)]),
    ]
    long_alone = engine.generate("The history of Rome", long_p).text
    alone = {
        (p, m): engine.generate(p, SamplingParams(max_tokens=m, stop=())).text
        for _, jobs in waves
        for p, m, _ in jobs
    }
    start = engine.stats()["steps"]
    long_job = engine.submit_generate("The history of Rome", long_p)
    submitted = []
    for at, jobs in waves:
        while engine.stats()["steps"] < start + at:
            time.sleep(0.002)
        for p, m, n in jobs:
            submitted.append(((p, m), engine.submit_generate(p, SamplingParams(max_tokens=m, stop=()), n)))
    for key, fut in submitted:
        assert [g.text for g in fut.result()] == [alone[key]] * len(fut.result()), key
    assert long_job.result()[0].text == long_alone
    assert _wait_idle(engine)["free_cells"] == engine.n_cells


def test_long_context_greedy_text_does_not_depend_on_running_alone(engine):
    """Past 256 tokens in its stream, a sequence decoding alone would take llama.cpp's
    split-cells attention kernel, which with two threads rounds differently from the kernel a
    batch of streams takes: without the engine's guard (a throwaway row in an idle stream
    beside a lone long sequence), both these prompts' greedy texts differed between running
    alone and running as a fan-out of two, whose every step is batched. With one thread (the
    module's engine) the split is a single part, and the engine needs no guard."""
    facts = " ".join(
        f"Fact {i}: the {w} is stored in crate {i * 7 % 13}."
        for i, w in enumerate(["apple", "pear", "bolt", "cable", "drill", "lamp", "rope", "saw"] * 6)
    )
    greedy = SamplingParams(max_tokens=40, stop=())
    two = LlamaEngine(n_threads=2, n_ctx=1024, n_parallel=4)
    try:
        for e in (two, engine):
            for question in ("Q: How many facts are there?\nA:", "Translate to French:"):
                prompt = facts + "\n" + question
                assert len(e.tokenize(prompt)) > 600
                alone = e.generate(prompt, greedy).text
                assert [g.text for g in e.generate_n(prompt, greedy, 2)] == [alone, alone], (
                    e.n_threads,
                    question,
                )
    finally:
        two.close()


def test_a_failed_step_fails_its_jobs_and_gives_every_sequence_back_once(engine):
    """A llama.cpp failure in the step's decode fails the jobs still running, and a job that
    finished earlier in that same step keeps its answer and is not given back twice (a
    sequence id given back twice would be handed to two requests at once)."""
    greedy = SamplingParams(max_tokens=30, stop=())
    expected = engine.generate("The history of Rome", greedy).text
    short = engine.submit_generate("Paris is", SamplingParams(max_tokens=3, stop=()))
    long_job = engine.submit_generate("A recipe for bread:", greedy)
    real = engine._decode
    failed = []

    def decode(entries):
        if short.done() and not failed:  # the short job finished earlier in this step
            failed.append(len(entries))
            raise RuntimeError("injected llama_decode failure")
        real(entries)

    engine._decode = decode
    try:
        with pytest.raises(RuntimeError, match="injected"):
            long_job.result()
    finally:
        del engine._decode
    assert failed and len(short.result()[0].text) > 0
    st = _wait_idle(engine)
    assert st["free_seqs"] == engine.n_parallel and st["free_cells"] == engine.n_cells
    assert engine.generate("The history of Rome", greedy).text == expected


def test_seeded_fanout_repeats_when_threads_sample_in_parallel():
    # With two threads the engine samples the sequences of a step on a small pool; each
    # sequence keeps its own seeded generator, so a seeded fan-out is reproducible, its
    # samples differ from one another, and the log-probabilities are real ones.
    e = LlamaEngine(n_threads=2, n_ctx=512, n_parallel=4)
    try:
        p = SamplingParams(max_tokens=12, temperature=0.9, seed=3, stop=())
        first = e.generate_n("The weather today", p, 4)
        again = e.generate_n("The weather today", p, 4)
        assert [g.text for g in first] == [g.text for g in again]
        assert [g.mean_logprob for g in first] == [g.mean_logprob for g in again]
        assert len({g.text for g in first}) > 1
        assert all(g.mean_logprob < 0 and g.completion_tokens > 0 for g in first)
    finally:
        e.close()


def test_fanout_samples_share_the_prompt(engine):
    # Greedy: every copy of the shared prompt continues exactly like the prompt alone.
    greedy = SamplingParams(max_tokens=12, stop=())
    alone = engine.generate("My favourite animal is", greedy).text
    assert [g.text for g in engine.generate_n("My favourite animal is", greedy, 4)] == [alone] * 4
    # Sampled: each copy has its own seed, so the samples differ.
    p = SamplingParams(max_tokens=8, temperature=0.9, seed=5, stop=())
    assert len({g.text for g in engine.generate_n("My favourite animal is", p, 4)}) > 1


def test_timeout_stops_a_sequence_where_it_is(engine):
    g = engine.generate("Once upon a time", SamplingParams(max_tokens=400, stop=()), timeout_s=0.0)
    assert g.finish_reason == "timeout"
    assert g.completion_tokens < 400
    _wait_idle(engine)


def test_full_queue_is_overloaded():
    from legion.engine.llama import Overloaded

    e = LlamaEngine(n_threads=1, n_ctx=256, n_parallel=2, max_queue=1)
    try:
        p = SamplingParams(max_tokens=64, stop=())
        running = []
        for _ in range(2):  # occupy both sequences, one at a time so the queue never fills here
            running.append(e.submit_generate("Count: 1, 2, 3,", p))
            while e.stats()["queue_depth"]:
                time.sleep(0.005)
        # Both sequences are busy: one request may wait, the next is refused.
        with pytest.raises(Overloaded, match="queue is full"):
            for _ in range(4):
                running.append(e.submit_generate("Count: 1, 2, 3,", p))
        assert all(len(f.result()) == 1 for f in running)
    finally:
        e.close()


def test_request_larger_than_the_engine_is_refused(engine):
    with pytest.raises(InvalidRequest, match="n must be between"):
        engine.submit_generate("hi", SamplingParams(max_tokens=4), n=engine.n_parallel + 1)


# ------------------------------------------------------------------ automatic prefix cache
ROLE = (
    "You answer science questions for a school quiz.\n\n"
    "Question: Which gas do plants take in to make food?\nAnswer: carbon dioxide\n\n"
    "Question: What force pulls objects toward the ground?\nAnswer: gravity\n\n"
    "Question: Which state of matter has a fixed shape?\nAnswer: solid\n\n"
)
QUESTIONS = [
    ("Question: What do bees make?\nAnswer:", [" honey", " milk", " silk"]),
    ("Question: Which planet is closest to the Sun?\nAnswer:", [" Mercury", " Venus", " Mars", " Earth"]),
    ("Question: What is frozen water called?\nAnswer:", [" ice", " steam"]),
    ("Question: Which organ pumps blood?\nAnswer:", [" the heart", " the lungs", " the liver"]),
]


@pytest.fixture(scope="module")
def uncached():
    e = LlamaEngine(n_threads=1, n_ctx=1024, prefix_cache_slots=0)
    yield e
    e.close()


def test_a_cached_prefix_scores_exactly_as_without_the_cache(engine, uncached):
    """The role prompt and exemplars are evaluated once and reused by every later request, and
    every score is bitwise the one an engine without the cache computes: prefill chunks end at
    boundaries the prompt's own tokens fix, so a cached prefix's cells are the ones the prompt
    would have computed itself."""
    before = engine.stats()["prefix_cache"]
    for q, choices in QUESTIONS:
        cached = engine.score(ROLE + q, choices)
        plain = uncached.score(ROLE + q, choices)
        assert [(c.logprob, c.n_tokens, c.is_greedy) for c in cached] == [
            (c.logprob, c.n_tokens, c.is_greedy) for c in plain
        ]
    after = engine.stats()["prefix_cache"]
    role_tokens = len(engine.tokenize(ROLE))
    assert after["hits"] - before["hits"] >= len(QUESTIONS) - 1
    assert after["tokens_reused"] - before["tokens_reused"] >= (len(QUESTIONS) - 1) * (role_tokens - 1)
    assert uncached.stats()["prefix_cache"]["entries"] == 0


def test_a_cached_prefix_gives_the_same_greedy_text(engine, uncached):
    """The cache changes no greedy text, alone or in a batch (a batch may differ from a lone
    run at a near-tie whether or not the cache is on: see the wave test above)."""
    greedy = SamplingParams(max_tokens=24, stop=())
    prompts = [ROLE + q for q, _ in QUESTIONS]
    first = [engine.generate(p, greedy).text for p in prompts]  # stores and then reuses the prefix
    plain = [uncached.generate(p, greedy).text for p in prompts]
    assert first == plain
    batch = [(p, greedy) for p in prompts]
    assert [g.text for g in engine.generate_batch(batch)] == [g.text for g in uncached.generate_batch(batch)]
    # A fan-out copies the cached prefix into one stream, then that stream to the others.
    assert [g.text for g in engine.generate_n(prompts[0], greedy, 3)] == [plain[0]] * 3


def test_eviction_keeps_the_memory_bound_and_the_results():
    """One cache stream, two alternating role prompts: the stream is reused (the least
    recently used prefix evicted) and never more entries than slots; every score still equals
    the uncached one, and every request stream and cell is given back."""
    e = LlamaEngine(n_threads=1, n_ctx=512, n_parallel=4, prefix_cache_slots=1)
    plain = LlamaEngine(n_threads=1, n_ctx=512, n_parallel=4, prefix_cache_slots=0)
    other = ROLE.replace("science", "history").replace("school quiz", "pub quiz")
    try:
        for round_ in range(3):
            for role in (ROLE, other):
                q, choices = QUESTIONS[round_]
                got = [c.logprob for c in e.score(role + q, choices)]
                assert got == [c.logprob for c in plain.score(role + q, choices)]
                assert e.stats()["prefix_cache"]["entries"] <= 1
        pc = e.stats()["prefix_cache"]
        assert pc["evictions"] >= 2 and pc["stores"] == pc["evictions"] + 1
        st = _wait_idle(e)
        assert st["free_seqs"] == e.n_parallel and st["free_cells"] == e.n_cells
    finally:
        e.close()
        plain.close()


def test_a_failed_step_empties_the_prefix_cache():
    """A failed decode wipes every KV stream, so the cache forgets its entries (a cached
    prefix would otherwise point at wiped cells), and the engine still answers correctly."""
    e = LlamaEngine(n_threads=1, n_ctx=512, n_parallel=4, prefix_cache_slots=1)
    try:
        q, choices = QUESTIONS[0]
        want = [c.logprob for c in e.score(ROLE + q, choices)]
        assert e.stats()["prefix_cache"]["entries"] == 1
        real = e._decode

        def decode(entries):
            raise RuntimeError("injected llama_decode failure")

        greedy = SamplingParams(max_tokens=8, stop=())
        e._decode = decode
        try:
            with pytest.raises(RuntimeError, match="injected"):
                e.generate("The history of Rome", greedy)
        finally:
            e._decode = real
        assert e.stats()["prefix_cache"]["entries"] == 0
        assert [c.logprob for c in e.score(ROLE + q, choices)] == want
        st = _wait_idle(e)
        assert st["free_seqs"] == e.n_parallel and st["free_cells"] == e.n_cells
    finally:
        e.close()


# ------------------------------------------------------------------ cancellation
def test_a_cancelled_generation_stops_and_gives_its_sequences_back(engine):
    """A running generation, cancelled, stops before its next token: it ends "cancelled" with
    fewer tokens than asked, and every sequence and KV cell is free again."""
    p = SamplingParams(max_tokens=400, stop=())
    steps_before = engine.stats()["steps"]
    cancelled_before = engine.stats()["cancelled"]
    job = engine.submit_generate("Once upon a time", p)
    while engine.stats()["steps"] < steps_before + 3:  # it is decoding
        time.sleep(0.005)
    assert engine.cancel(job) is True
    (g,) = job.result()
    assert g.finish_reason == "cancelled" and 0 < g.completion_tokens < 400
    assert engine.cancel(job) is False  # finished: nothing left to stop
    st = _wait_idle(engine)
    assert st["free_cells"] == engine.n_cells and st["free_seqs"] == engine.n_parallel
    assert st["cancelled"] == cancelled_before + 1


def test_a_queued_job_cancelled_never_runs():
    from legion.errors import Cancelled

    e = LlamaEngine(n_threads=1, n_ctx=256, n_parallel=2, max_queue=4)
    try:
        p = SamplingParams(max_tokens=48, stop=())
        busy = e.submit_generate("Count: 1, 2, 3,", p, n=2)  # both sequences
        while e.stats()["queue_depth"]:
            time.sleep(0.005)
        waiting = e.submit_generate("The history of Rome", p)
        scoring = e.submit_score("The capital of France is", [" Paris", " Rome"])
        assert e.stats()["queue_depth"] == 2
        assert e.cancel(waiting) and e.cancel(scoring)
        with pytest.raises(Cancelled, match="cancelled before the engine started it"):
            waiting.result()
        with pytest.raises(Cancelled):
            scoring.result()
        assert e.stats()["queue_depth"] == 0
        assert [g.completion_tokens for g in busy.result()] == [48, 48]  # the running job is untouched
        tokens = e.stats()["tokens"]
        assert tokens == 96  # the cancelled generation decoded nothing
    finally:
        e.close()


def test_an_agent_call_its_caller_cancels_stops_unless_another_call_shares_the_decode():
    """``Agent.generate_n`` asks ``cancelled`` while it waits: a decode only the cancelled call
    waits on stops; one that another member's identical call shares runs on for that one."""
    import threading

    from legion.agent import Agent
    from legion.config import AgentConfig
    from legion.errors import Cancelled
    from legion.messages import GenerateRequest

    agent = Agent(AgentConfig(name="solo", n_ctx=1024, n_threads=1), load_in_background=False)
    try:
        engine = agent.engine()
        req = GenerateRequest(task="Tell a long story about a dragon.", max_tokens=300)
        stop = threading.Event()
        errors: list[BaseException] = []

        def call(flag):
            try:
                agent.generate_n(req, cancelled=flag.is_set)
            except BaseException as exc:  # collected for the asserts below
                errors.append(exc)

        t = threading.Thread(target=call, args=(stop,))
        t.start()
        while engine.stats()["steps"] < 3:
            time.sleep(0.005)
        stop.set()
        t.join(60)
        assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], Cancelled)
        st = _wait_idle(engine)
        assert st["cancelled"] == 1 and st["free_seqs"] == engine.n_parallel
        assert agent.stats()["errors"] == 0  # the caller's choice, not the agent's failure
        # Two calls share one decode; the first cancels, the second still gets the whole text.
        first, second = threading.Event(), threading.Event()
        results: list = []
        t1 = threading.Thread(target=call, args=(first,))
        t1.start()
        while engine.stats()["active_seqs"] < 1:
            time.sleep(0.005)
        t2 = threading.Thread(target=lambda: results.append(agent.generate_n(req, cancelled=second.is_set)))
        t2.start()
        while agent.stats()["in_flight"] < 2:
            time.sleep(0.005)
        first.set()
        t1.join(60)
        t2.join(120)
        assert isinstance(errors[-1], Cancelled) and len(errors) == 2
        (g,) = results[0]
        assert g.finish_reason != "cancelled" and engine.stats()["cancelled"] == 1
    finally:
        engine.close()


def test_a_streamed_completion_stops_when_its_reader_goes_away_or_its_caller_cancels():
    """``Agent.complete_stream`` decodes in a thread of its own: a reader that stops reading,
    or a ``cancelled`` that says yes (asked on the reader's thread), stops that decode too."""
    import threading

    from legion.agent import Agent
    from legion.config import AgentConfig
    from legion.errors import Cancelled
    from legion.messages import CompletionRequest

    agent = Agent(AgentConfig(name="streamer", n_ctx=1024, n_threads=1), load_in_background=False)
    engine = agent.engine()
    try:
        req = CompletionRequest(prompt="Once upon a time, in a land far away,", max_tokens=300)
        stream = agent.complete_stream(req)
        pieces = [next(stream) for _ in range(3)]
        assert all(isinstance(p, str) for p in pieces)
        stream.close()  # the reader went away
        st = _wait_idle(engine)
        assert st["cancelled"] == 1 and st["tokens"] < 300
        flag = threading.Event()
        got = []
        with pytest.raises(Cancelled):
            for item in agent.complete_stream(req, cancelled=flag.is_set):
                got.append(item)
                if len(got) == 3:
                    flag.set()  # the caller cancels between pieces
        st = _wait_idle(engine)
        assert st["cancelled"] == 2 and st["free_seqs"] == engine.n_parallel
    finally:
        engine.close()
