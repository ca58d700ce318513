"""Deadline-aware admission of the tasks that reach the agents (the Arbiter's).

The agents' engines refuse a call only when their queues are full, and a panel task is many
calls: under load a task used to wait a minute for its turn and still be answered, or run past
its timeout. ``TaskAdmission`` takes a task only when the work already in flight leaves it
waiting at most ``max_wait_s`` and finishing within its own timeout; otherwise it is shed at
once: ``Overloaded`` (503) with a Retry-After of when it would be taken.

A task's *size* is measured as it runs: the integral of 1/L over its life while L tasks share
the agents, the seconds of the agents' time it took at the load it met (batching gains at high
load make it smaller). Sizes are learned per kind of task (choices or free text, strategy,
fan-out, max_tokens), so a debate does not make a short multiple-choice question look long, from
the last 16 of a kind, so they follow the load. A new task waits for the sizes of the tasks in
flight (each counted whole: at a steady load a task past its size is late, not nearly done):
measured on this project's 2-core host, a burst of free-text tasks on the default line-up
finished within a few seconds of that once the sizes were measured at that load.
Until a task has finished, tasks are taken while fewer than ``cold_limit`` are in flight: a
burst at start-up must not queue a minute of work before the first measurement. Plain Python.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from legion.errors import Overloaded

MAX_RETRY_AFTER_S = 60
MAX_KINDS = 256  # kinds of task whose work is remembered


@dataclass(frozen=True)
class Estimate:
    """What admission expects of one more task of some kind now."""

    in_flight: int
    size_s: float  # the agents' seconds a task of its kind has lately taken
    wait_s: float  # the sizes of the tasks in flight ahead of it
    finish_s: float  # when it would finish, from now


@dataclass
class _Running:
    kind: Hashable
    shared: float  # the 1/L integral at admission


class TaskAdmission:
    """Admits or sheds tasks: ``admit`` before a task's work, ``done`` after it (success or not)."""

    def __init__(
        self,
        max_wait_s: float,
        window: int = 16,
        cold_limit: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_wait_s = max_wait_s
        self.cold_limit = max(1, cold_limit)
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[int, _Running] = {}
        self._next = 0
        self._size: dict[Hashable, deque[float]] = {}  # kind -> its last measured sizes
        self._shared = 0.0  # integral of 1/L over time while L > 0
        self._at = clock()
        self.shed = 0

    def _advance(self) -> None:
        now = self._clock()
        if self._running:
            self._shared += (now - self._at) / len(self._running)
        self._at = now

    def _size_of(self, kind: Hashable) -> float | None:
        got = self._size.get(kind)
        if not got:
            got = deque(x for xs in self._size.values() for x in xs)
        return sorted(got)[len(got) // 2] if got else None  # the median: one slow spell is not the rule

    def estimate(self, kind: Hashable) -> Estimate | None:
        """When one more task of ``kind`` would finish now; None until a task has finished."""
        with self._lock:
            self._advance()
            return self._estimate(kind)

    def _estimate(self, kind: Hashable) -> Estimate | None:
        size = self._size_of(kind)
        if size is None:
            return None
        # Each task in flight counts its whole size: at a steady load the sizes measured lately
        # are what tasks take at this load, and a task past its size is late, not nearly done.
        wait = sum(self._size_of(r.kind) or size for r in self._running.values())
        return Estimate(len(self._running), size, wait, wait + size)

    def admit(self, kind: Hashable, timeout_s: float | None) -> int:
        """Take a task of ``kind`` (returns its ticket for ``done``) or raise ``Overloaded``
        with when to retry: when the work ahead would hold it more than ``max_wait_s``, or its
        finish would come past its timeout."""
        with self._lock:
            self._advance()
            est = self._estimate(kind)
            if est is None and len(self._running) >= self.cold_limit:
                self.shed += 1
                raise Overloaded(
                    f"the agents are busy: {len(self._running)} tasks are in flight while Legion learns "
                    "how fast they finish; retry after the Retry-After delay",
                    details={"retry_after_s": 2, "in_flight": len(self._running)},
                )
            if est is not None and self._running:
                over = est.wait_s - self.max_wait_s
                if timeout_s is not None:
                    over = max(over, est.finish_s - timeout_s)
                if over > 0:
                    self.shed += 1
                    retry = min(MAX_RETRY_AFTER_S, max(1, math.ceil(over)))
                    raise Overloaded(
                        f"the agents are busy: {est.in_flight} tasks are in flight and this one would wait "
                        f"about {est.wait_s:.0f} s and finish in about {est.finish_s:.0f} s (it may wait "
                        f"{self.max_wait_s:g} s{'' if timeout_s is None else f' and take {timeout_s:g} s'}); "
                        "retry after the Retry-After delay",
                        details={"retry_after_s": retry, "in_flight": est.in_flight},
                    )
            ticket = self._next
            self._next += 1
            self._running[ticket] = _Running(kind, self._shared)
            return ticket

    def done(self, ticket: int, answered: bool = True) -> None:
        """The task of ``ticket`` finished; the size of an answered one is learned (a failure
        says little about how long an answer takes)."""
        with self._lock:
            self._advance()
            r = self._running.pop(ticket, None)
            if r is None or not answered:
                return
            size = self._shared - r.shared
            if r.kind not in self._size and len(self._size) >= MAX_KINDS:
                self._size.pop(next(iter(self._size)))  # the kind learned first goes
            self._size.setdefault(r.kind, deque(maxlen=self._window)).append(size)
