"""Locust load test of Legion's public HTTP API.

The mix is a realistic one: repeated tasks that the result cache answers, novel tasks the
agents must work on, chat with history, the OpenAI route, and streaming. Weights and think
time come from environment variables so the same file drives a smoke run and a soak:

    LEGION_MIX="repeated=6,novel=1,chat=1,openai=1,stream=1"   task weights
    LEGION_THINK_S="0.5,2.0"                                   wait between requests (min,max)
    LEGION_API_KEY=...                                         sent as a Bearer token if set
    LEGION_MAX_TOKENS=16                                       reply length of uncached work

A 503 with ``Retry-After`` under overload is Legion shedding load on purpose: it is counted
apart (``name`` suffixed ``[shed]``) and not as a failure; every other non-2xx is a failure.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid

from locust import HttpUser, between

_REPEATED = [
    "What is the capital of France?",
    "Name a primary color.",
    "How many legs does a spider have?",
    "What gas do plants absorb from the air?",
    "What is the boiling point of water in Celsius?",
]
_SUBJECTS = ["volcanoes", "bread", "the moon", "bicycles", "rivers", "glass", "honey bees", "tides"]
_counter = itertools.count()


def _mix() -> dict[str, int]:
    weights = {"repeated": 6, "novel": 1, "chat": 1, "openai": 1, "stream": 1}
    for part in filter(None, os.environ.get("LEGION_MIX", "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in weights:
            raise ValueError(f"LEGION_MIX: unknown task {name!r}; use {', '.join(weights)}")
        weights[name.strip()] = int(value)
    return weights


def _think() -> tuple[float, float]:
    lo, _, hi = os.environ.get("LEGION_THINK_S", "0.5,2.0").partition(",")
    return float(lo), float(hi or lo)


_WEIGHTS = _mix()
_MAX_TOKENS = int(os.environ.get("LEGION_MAX_TOKENS", "16"))


class LegionUser(HttpUser):
    wait_time = between(*_think())

    def on_start(self) -> None:
        key = os.environ.get("LEGION_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.session = uuid.uuid4().hex[:16]

    def _post(self, path: str, body: dict, name: str, stream: bool = False) -> None:
        with self.client.post(path, json=body, name=name, catch_response=True, stream=stream) as r:
            if r.status_code == 503 and r.headers.get("Retry-After"):
                r.request_meta["name"] = f"{name} [shed]"
                r.success()
            elif r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif stream:
                body_text = r.content.decode("utf-8", errors="replace")
                if "data: [DONE]" not in body_text:
                    r.failure("stream ended without [DONE]")
                else:
                    r.success()
            else:
                r.success()

    def repeated_task(self) -> None:
        body = {"task": random.choice(_REPEATED), "max_tokens": _MAX_TOKENS}
        self._post("/v1/tasks", body, "/v1/tasks (repeated)")

    def novel_task(self) -> None:
        n = next(_counter)
        body = {"task": f"Tell one fact about {random.choice(_SUBJECTS)} (#{n}).", "max_tokens": _MAX_TOKENS}
        self._post("/v1/tasks", body, "/v1/tasks (novel)")

    def chat_with_history(self) -> None:
        body = {
            "model": "legion",
            "messages": [{"role": "user", "content": f"Tell me about {random.choice(_SUBJECTS)}."}],
            "max_tokens": _MAX_TOKENS,
            "user": self.session,
        }
        self._post("/v1/chat/completions", body, "/v1/chat/completions (session)")

    def openai_route(self) -> None:
        body = {
            "model": "legion",
            "messages": [{"role": "user", "content": random.choice(_REPEATED)}],
            "max_tokens": _MAX_TOKENS,
        }
        self._post("/v1/chat/completions", body, "/v1/chat/completions")

    def streaming(self) -> None:
        body = {
            "model": "legion",
            "messages": [{"role": "user", "content": random.choice(_REPEATED)}],
            "max_tokens": _MAX_TOKENS,
            "stream": True,
        }
        self._post("/v1/chat/completions", body, "/v1/chat/completions (stream)", stream=True)


# Weights from LEGION_MIX; a weight of 0 leaves that kind of request out.
LegionUser.tasks = {
    fn: _WEIGHTS[key]
    for key, fn in {
        "repeated": LegionUser.repeated_task,
        "novel": LegionUser.novel_task,
        "chat": LegionUser.chat_with_history,
        "openai": LegionUser.openai_route,
        "stream": LegionUser.streaming,
    }.items()
    if _WEIGHTS[key] > 0
}
