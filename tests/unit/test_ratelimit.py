"""Token buckets per key, driven by a fake clock (the clock is not the subject; the arithmetic is)."""

from __future__ import annotations

import threading

import pytest

from legion.errors import ErrorCode, RateLimited
from legion.service.ratelimit import RateLimiter, TokenBucket


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admitted(limiter: RateLimiter, key: str, n: int) -> int:
    ok = 0
    for _ in range(n):
        try:
            limiter.check(key)
            ok += 1
        except RateLimited:
            pass
    return ok


def test_burst_then_refill_at_the_configured_rate():
    clock = _Clock()
    limiter = RateLimiter(per_minute=60, burst=5, clock=clock)
    assert _admitted(limiter, "k", 8) == 5
    with pytest.raises(RateLimited) as err:
        limiter.check("k")
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.http_status == 429
    assert err.value.details["retry_after_s"] == 1  # one token a second at 60 a minute
    assert "60 requests a minute" in err.value.message
    clock.now += 3.0
    assert _admitted(limiter, "k", 10) == 3
    clock.now += 3600.0  # a long pause refills up to the burst, not beyond
    assert _admitted(limiter, "k", 100) == 5


def test_keys_have_separate_buckets():
    clock = _Clock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)
    assert _admitted(limiter, "a", 5) == 2
    assert _admitted(limiter, "b", 5) == 2
    with pytest.raises(RateLimited) as err:
        limiter.check("a")
    assert err.value.details["retry_after_s"] == 10  # 6 a minute: one token every 10 s


def test_retry_after_is_honest():
    """Waiting exactly Retry-After seconds is enough to be admitted again."""
    clock = _Clock()
    limiter = RateLimiter(per_minute=7, burst=1, clock=clock)
    limiter.check("k")
    with pytest.raises(RateLimited) as err:
        limiter.check("k")
    clock.now += err.value.details["retry_after_s"]
    limiter.check("k")


def test_forgets_least_recently_used_keys_beyond_the_bound():
    limiter = RateLimiter(per_minute=60, burst=1, clock=_Clock(), max_keys=3)
    for k in "abcd":
        limiter.check(k)
    assert len(limiter) == 3
    limiter.check("a")  # "a" was forgotten, so it starts with a full bucket again
    with pytest.raises(RateLimited):
        limiter.check("d")


def test_concurrent_requests_never_exceed_the_burst():
    limiter = RateLimiter(per_minute=1, burst=50, clock=_Clock())
    admitted = []

    def worker():
        admitted.append(_admitted(limiter, "k", 40))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 50


def test_bucket_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        TokenBucket(0, 1.0, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(5, 0.0, now=0.0)
