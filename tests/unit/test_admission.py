"""Deadline-aware admission: tasks are taken while those in flight leave them time, and shed
with a Retry-After past that; the Arbiter sheds before asking any agent. A manual clock stands
in for time (the subject is the arithmetic, not the waiting)."""

from __future__ import annotations

import asyncio

import pytest

from legion.arbitration.admission import TaskAdmission
from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.errors import Overloaded
from legion.messages import TaskRequest
from tests.unit.test_arbiter import ScriptedAgents


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def warmed(max_wait_s=10.0, service_s=2.0):
    """Admission that has seen three tasks, each alone, take ``service_s``."""
    clock = Clock()
    adm = TaskAdmission(max_wait_s, clock=clock)
    for _ in range(3):
        t = adm.admit(None)
        clock.t += service_s
        adm.done(t)
    return adm, clock


def test_every_task_is_taken_until_the_rate_is_known():
    adm = TaskAdmission(0.001, clock=Clock())
    for _ in range(50):
        adm.admit(1.0)
    assert adm.estimate() is None and adm.shed == 0


def test_tasks_are_taken_while_they_would_finish_in_time_and_shed_past_it():
    adm, _ = warmed(max_wait_s=10.0, service_s=2.0)  # one task alone: 2 s, so 0.5 tasks/s
    taken = 0
    with pytest.raises(Overloaded) as e:
        for _ in range(100):
            adm.admit(None)
            taken += 1
    # The k-th task finishes after k / 0.5 s; 2 s alone + 10 s of waiting allow k = 6.
    assert taken == 6 and adm.shed == 1
    assert 1 <= e.value.details["retry_after_s"] <= 60 and e.value.details["in_flight"] == 6


def test_the_task_timeout_bounds_the_wait_too():
    adm, _ = warmed(max_wait_s=1000.0, service_s=2.0)
    adm.admit(5.0)
    adm.admit(5.0)  # finishes at 4 s
    with pytest.raises(Overloaded):
        adm.admit(5.0)  # would finish at 6 s, past its 5 s timeout
    adm.admit(None)  # a task without a timeout waits up to max_wait_s


def test_as_tasks_finish_the_next_is_taken_again():
    adm, clock = warmed(max_wait_s=4.0, service_s=2.0)
    started = [adm.admit(None) for _ in range(3)]
    with pytest.raises(Overloaded):
        adm.admit(None)
    clock.t += 2.0
    for t in started[:2]:
        adm.done(t)
    adm.admit(None)


def test_the_arbiter_sheds_before_any_agent_is_asked(tmp_path):
    cfg = config_from_dict({"agents": [{"name": "a"}, {"name": "b"}], "data_dir": str(tmp_path)})
    adm, _ = warmed(max_wait_s=1.0, service_s=2.0)
    adm.admit(None)  # one task in flight: the next would finish at 4 s, past 2 + 1
    agents = ScriptedAgents(lambda agent, req: "4")
    arbiter = Arbiter(cfg, agents, admission=adm)
    with pytest.raises(Overloaded):
        asyncio.run(arbiter.run(TaskRequest(id="t", task="2+2?", strategy="plurality")))
    assert agents.asked == []
    # A task that was taken is counted done whatever happened: the count does not leak.
    free = Arbiter(cfg, agents, admission=TaskAdmission(1.0))
    asyncio.run(free.run(TaskRequest(id="t", task="2+2?", strategy="plurality")))
    assert free.admission.estimate() is None and free.admission._in_flight == 0
