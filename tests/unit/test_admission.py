"""Deadline-aware admission: tasks are taken while the work in flight leaves them time, and shed
with a Retry-After past that; sizes are learned per kind of task; the Arbiter sheds before asking
any agent. A manual clock stands in for time (the subject is the arithmetic, not the waiting)."""

from __future__ import annotations

import asyncio

import pytest

from legion.arbitration.admission import TaskAdmission
from legion.arbitration.arbiter import Arbiter
from legion.config import config_from_dict
from legion.errors import Overloaded
from legion.messages import TaskRequest
from tests.unit.test_arbiter import ScriptedAgents

QUICK, SLOW = "quick", "slow"


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def warmed(max_wait_s=10.0, work=None):
    """Admission that has seen tasks of each kind run alone, one after another (kind -> seconds;
    default two quick ones of 2 s)."""
    clock = Clock()
    adm = TaskAdmission(max_wait_s, cold_limit=1, clock=clock)
    for kind, seconds in (work or {QUICK: 2.0, "again": 2.0}).items():
        t = adm.admit(kind if kind != "again" else QUICK, None)
        clock.t += seconds
        adm.done(t)
    return adm, clock


def test_until_a_task_has_finished_only_cold_limit_tasks_are_in_flight():
    adm = TaskAdmission(0.001, cold_limit=3, clock=Clock())
    started = [adm.admit(QUICK, 1.0) for _ in range(3)]
    with pytest.raises(Overloaded) as e:
        adm.admit(QUICK, 1.0)
    assert adm.estimate(QUICK) is None and adm.shed == 1 and e.value.details["retry_after_s"] >= 1
    adm.done(started[0], answered=False)  # a failure: room again, but nothing learned
    adm.admit(QUICK, 1.0)
    assert adm.estimate(QUICK) is None


def test_tasks_are_taken_while_they_would_finish_in_time_and_shed_past_it():
    adm, _ = warmed(max_wait_s=10.0)  # a task: 2 s alone
    taken = 0
    with pytest.raises(Overloaded) as e:
        for _ in range(100):
            adm.admit(QUICK, None)
            taken += 1
    # The n-th task waits behind 2(n - 1) s of work: 10 s of waiting allow 6.
    assert taken == 6 and adm.shed == 1
    assert 1 <= e.value.details["retry_after_s"] <= 60 and e.value.details["in_flight"] == 6


def test_the_task_timeout_bounds_the_wait_too():
    adm, _ = warmed(max_wait_s=1000.0)
    adm.admit(QUICK, 5.0)
    adm.admit(QUICK, 5.0)  # waits 2 s, finishes at 4 s
    with pytest.raises(Overloaded):
        adm.admit(QUICK, 5.0)  # would finish at 6 s, past its 5 s timeout
    adm.admit(QUICK, None)  # a task without a timeout waits up to max_wait_s


def test_sizes_are_learned_per_kind_so_slow_tasks_do_not_shed_quick_ones():
    adm, _ = warmed(max_wait_s=12.0, work={SLOW: 60.0, QUICK: 1.0})
    # Quick tasks are 1 s each (a median over every kind would say 60): ten fit in 12 s of waiting.
    for _ in range(10):
        adm.admit(QUICK, None)
    adm.admit(SLOW, None)  # behind 10 s of quick work
    with pytest.raises(Overloaded):
        adm.admit(QUICK, None)  # behind the slow one too: 70 s


def test_room_comes_back_as_tasks_finish():
    adm, clock = warmed(max_wait_s=4.0)
    tickets = [adm.admit(QUICK, None) for _ in range(3)]  # the third waits 4 s
    with pytest.raises(Overloaded):
        adm.admit(QUICK, None)
    clock.t += 9.0  # three shared the agents for 9 s: at this load each takes 3 s of them
    adm.done(tickets[0])
    est = adm.estimate(QUICK)
    assert (
        est is not None and est.in_flight == 2 and est.size_s == pytest.approx(2.0)
    )  # the median of 2, 2, 3
    adm.done(tickets[1])
    assert adm.estimate(QUICK).size_s == pytest.approx(3.0)  # 2, 2, 3, 3: the load shows
    adm.admit(QUICK, None)


def test_the_arbiter_sheds_before_any_agent_is_asked(tmp_path):
    cfg = config_from_dict({"agents": [{"name": "a"}, {"name": "b"}], "data_dir": str(tmp_path)})
    agents = ScriptedAgents(lambda agent, req: "4")
    req = TaskRequest(id="t", task="2+2?", strategy="plurality")
    adm = TaskAdmission(1.0, cold_limit=1)
    arbiter = Arbiter(cfg, agents, admission=adm)
    for _ in range(2):
        asyncio.run(arbiter.run(req))  # taken, answered, their sizes learned
    kind = (False, "plurality", None, None)
    assert adm.estimate(kind) is not None and adm.estimate(kind).in_flight == 0
    adm.admit(kind, None)  # one in flight that never ends ...
    adm._size[kind] = type(adm._size[kind])([30.0])  # ... of a kind that takes 30 s alone
    asked = len(agents.asked)
    with pytest.raises(Overloaded):
        asyncio.run(arbiter.run(req))
    assert len(agents.asked) == asked  # shed before any agent was asked
