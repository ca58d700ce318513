"""Per-key rate limits: one token bucket per API key (refill rate and burst from the config).

Each ingress replica keeps its own buckets, so with N replicas a key may reach N times the
configured rate; the limit protects the agents from one key's flood, not a billing quota.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from legion.errors import RateLimited


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s``; a request takes one."""

    def __init__(self, capacity: float, rate_per_s: float, now: float):
        if capacity < 1 or rate_per_s <= 0:
            raise ValueError("a token bucket needs capacity >= 1 and a positive refill rate")
        self.capacity = float(capacity)
        self.rate_per_s = float(rate_per_s)
        self.tokens = float(capacity)
        self.updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """Token buckets by key, thread-safe; the least recently used beyond ``max_keys`` are forgotten."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ):
        self.per_minute = per_minute
        self.burst = burst
        self._rate_per_s = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Count one request for ``key``: 0.0 if allowed, else the seconds to wait."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = TokenBucket(self.burst, self._rate_per_s, now)
                self._buckets[key] = bucket
                if len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return bucket.take(now)

    def check(self, key: str) -> None:
        """Count one request for ``key``; ``RateLimited`` (with ``retry_after_s``) past the limit."""
        wait = self.wait_s(key)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise RateLimited(
                f"{key} is over its rate limit of {self.per_minute:g} requests a minute "
                f"(bursts of {self.burst}); retry in {retry} s",
                details={"retry_after_s": retry},
            )

    def __len__(self) -> int:
        return len(self._buckets)
