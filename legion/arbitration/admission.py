"""Deadline-aware admission of the tasks that reach the agents (the Arbiter's).

The agents' engines refuse a call only when their queues are full, and a panel task is many
calls: under load a task used to wait a minute for its turn and still be answered, or run past
its timeout. ``TaskAdmission`` takes a task only when the tasks already in flight, finishing at
the rate the Arbiter has lately been finishing them, leave it time to finish within
``max_wait_s`` more than a task alone takes, and within its own timeout. Otherwise it is shed
at once: ``Overloaded`` (503) with a Retry-After of when it would be taken.

The rate comes from Little's law over the last completions: tasks in flight when each finished,
over the time each took (``rate = mean in flight / mean service time``), so idle gaps between
tasks do not read as a slow Arbiter. Until ``min_samples`` tasks have finished every task is
taken (the engines' own queue bounds still hold). Plain Python; no Ray.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from legion.errors import Overloaded

MAX_RETRY_AFTER_S = 60


@dataclass(frozen=True)
class Estimate:
    """What admission expects of one more task now."""

    in_flight: int
    finish_s: float  # when it would finish, from now
    alone_s: float  # what a task takes with little else running
    rate_per_s: float  # tasks the Arbiter finishes per second at this load


class TaskAdmission:
    """Admits or sheds tasks; ``admit`` before a task's work, ``done`` after it (success or not)."""

    def __init__(
        self,
        max_wait_s: float,
        window: int = 32,
        min_samples: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_wait_s = max_wait_s
        self.min_samples = min_samples
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        # (service seconds, tasks in flight when it finished) of the last completions.
        self._recent: deque[tuple[float, int]] = deque(maxlen=window)
        self.shed = 0

    def estimate(self) -> Estimate | None:
        """The expected finish of one more task now; None until enough tasks have finished."""
        with self._lock:
            return self._estimate()

    def _estimate(self) -> Estimate | None:
        if len(self._recent) < self.min_samples:
            return None
        service = [s for s, _ in self._recent]
        mean_s = sum(service) / len(service)
        if mean_s <= 0:
            return None
        rate = (sum(n for _, n in self._recent) / len(self._recent)) / mean_s
        lone = [s for s, n in self._recent if n <= 1]
        alone = min(lone) if lone else 1.0 / rate
        # Processor sharing: the new task finishes after those in flight and itself, at the rate.
        finish = (self._in_flight + 1) / rate
        return Estimate(self._in_flight, finish, alone, rate)

    def admit(self, timeout_s: float | None) -> float:
        """Take a task (returns its start time for ``done``) or raise ``Overloaded`` with when to
        retry: when the tasks ahead would leave it past ``alone + max_wait_s`` or its timeout."""
        with self._lock:
            est = self._estimate()
            if est is not None and self._in_flight > 0:
                allowed = est.alone_s + self.max_wait_s
                if timeout_s is not None:
                    allowed = min(allowed, timeout_s)
                if est.finish_s > allowed:
                    self.shed += 1
                    retry = min(MAX_RETRY_AFTER_S, max(1, math.ceil(est.finish_s - allowed)))
                    raise Overloaded(
                        f"the agents are busy: {est.in_flight} tasks are in flight and this one would finish "
                        f"in about {est.finish_s:.0f} s, past the {allowed:.0f} s it may wait and run; "
                        "retry after the Retry-After delay",
                        details={"retry_after_s": retry, "in_flight": est.in_flight},
                    )
            self._in_flight += 1
            return self._clock()

    def done(self, started: float) -> None:
        """A task taken at ``started`` finished (answered, failed or timed out)."""
        with self._lock:
            self._recent.append((max(0.0, self._clock() - started), self._in_flight))
            self._in_flight = max(0, self._in_flight - 1)
