"""The error vocabulary: each class carries its code and HTTP status, and survives the pickling
Ray applies to an exception raised inside an actor."""

from __future__ import annotations

import pickle

import pytest

from legion import errors
from legion.errors import ErrorCode, LegionError, Overloaded, StoreUnavailable, TaskTimeout


def test_every_error_class_maps_to_a_status():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LegionError)]
    assert len(classes) > 10
    for cls in classes:
        assert 400 <= cls("x").http_status <= 599, cls


@pytest.mark.parametrize(
    "exc",
    [
        Overloaded("every agent is saturated", details={"retry_after_s": 2}),
        StoreUnavailable("the retriever actor failed"),
        TaskTimeout("ran past 1 s", trace=[{"step": "fanout", "at_ms": 0.1, "data": {}}]),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert (back.code, back.message, back.details) == (exc.code, exc.message, exc.details)


def test_the_timeout_carries_its_trace():
    exc = TaskTimeout("ran past 1 s", trace=[{"step": "fanout"}])
    assert exc.code is ErrorCode.TIMEOUT and exc.http_status == 504
    assert exc.trace == [{"step": "fanout"}] and exc.to_dict()["details"]["trace"] == exc.trace
    assert StoreUnavailable("x").code is ErrorCode.NOT_READY  # a 503 that comes back by itself
