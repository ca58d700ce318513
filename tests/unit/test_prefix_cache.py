"""The prefix cache's bookkeeping: lookup, what to store, LRU eviction (no model; the engine
tests in tests/integration check that cached prefixes give the same results)."""

from __future__ import annotations

from legion.engine.llama import PrefixCache

ROLE = list(range(100, 140))  # a 40-token fixed prefix ending at a boundary
BOUNDS = [40]


def prompt(question: int, prefix=ROLE) -> list[int]:
    return [*prefix, 1000 + question, 2000 + question, 7]


def bounds(tokens, extra=()):
    return sorted({*extra, *[b for b in BOUNDS if b < len(tokens)], len(tokens)})


def test_first_prompt_stores_its_prefix_in_a_free_stream_and_later_ones_reuse_it():
    c = PrefixCache([8, 9], min_tokens=32)
    p = prompt(1)
    assert c.lookup(p, bounds(p)) is None
    assert c.plan(p, bounds(p), 0) == 40
    sid, evicted = c.take(p[:40])
    assert (sid, evicted) == (8, None)
    q = prompt(2)
    assert c.lookup(q, bounds(q)) == (8, 40)
    assert c.plan(q, bounds(q), 40) is None  # nothing longer to store
    assert c.counters == {"hits": 1, "misses": 1, "tokens_reused": 40, "stores": 1, "evictions": 0}


def test_a_reused_prefix_ends_at_a_boundary_of_the_new_prompt_and_leaves_a_token():
    c = PrefixCache([8], min_tokens=4)
    c.take(ROLE)
    # Shares 41 tokens (the prefix and one more) but only 40 ends at a boundary.
    p = [*ROLE, 5, 6, 7]
    assert c.lookup(p, bounds(p)) == (8, 40)
    # A prompt that is exactly the cached prefix still needs its last token decoded.
    assert c.lookup(ROLE, [20, 40]) == (8, 20)
    # Too short a shared part is not worth a stream copy.
    assert c.lookup([*ROLE[:3], 9, 9], [3, 5]) is None


def test_one_off_prompts_do_not_evict_but_recurring_prefixes_do():
    c = PrefixCache([8], min_tokens=32)
    a = prompt(1)
    c.plan(a, bounds(a), 0)
    c.take(a[:40])
    other = list(range(500, 540))
    b = prompt(2, other)
    assert c.lookup(b, bounds(b)) is None
    assert c.plan(b, bounds(b), 0) is None  # first sight, no free stream: no eviction
    b2 = prompt(3, other)
    assert c.plan(b2, bounds(b2), 0) == 40  # seen before: it may evict
    sid, evicted = c.take(b2[:40])
    assert sid == evicted == 8
    assert c.entries() == {8: 40}
    assert c.lookup(prompt(4, other), bounds(prompt(4, other))) == (8, 40)
    assert c.lookup(prompt(5), bounds(prompt(5))) is None  # the role prefix is gone
    assert c.counters["evictions"] == 1


def test_least_recently_used_entry_goes_first():
    c = PrefixCache([8, 9], min_tokens=32)
    x, y, z = ([k] * 40 for k in (1, 2, 3))
    c.take(x)
    c.take(y)
    assert c.lookup([*x, 5], [40, 41]) == (8, 40)  # x is now the most recently used
    assert c.take(z) == (9, 9)  # y goes
    assert set(c.entries()) == {8, 9} and c.lookup([*y, 5], [40, 41]) is None


def test_longest_cached_prefix_wins_and_clear_frees_every_stream():
    c = PrefixCache([8, 9], min_tokens=8)
    short, long_ = ROLE[:20], ROLE
    c.take(short)
    c.take(long_)
    p = prompt(1)
    assert c.lookup(p, [20, 40, len(p)]) == (9, 40)
    c.clear()
    assert c.entries() == {} and c.lookup(p, [20, 40, len(p)]) is None
    assert c.plan(p, [20, 40, len(p)], 0) == 40  # streams are free again


def test_disabled_cache_does_nothing():
    c = PrefixCache([], min_tokens=1)
    p = prompt(1)
    assert c.capacity == 0 and c.lookup(p, bounds(p)) is None and c.plan(p, bounds(p), 0) is None
