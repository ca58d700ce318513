"""The service's health from its agents' states: what ``/healthz`` answers.

Each agent is ``loading`` (its model is loading, or its actor is restarting), ``ready`` (it
loaded its model and decoded a token) or ``failed`` (it cannot serve; its ``error`` says why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, Field

from legion.messages import AgentHealth


class HealthReport(BaseModel):
    """``GET /healthz``: the service's state and each agent's."""

    status: Literal["ok", "degraded", "loading", "failed"] = Field(
        ...,
        description="ok: every agent is ready; degraded: some failed for good, the rest answer; "
        "loading: some agent is still loading (503); failed: no agent can answer (503).",
    )
    agents: dict[str, AgentHealth] = Field(..., description="Each agent's state, by name.")
    error: str | None = Field(None, description="Only when failed: each agent's error.")


def service_health(agents: Sequence[Mapping]) -> tuple[int, HealthReport]:
    """The HTTP status and body of ``/healthz`` for the Arbiter's agent entries.

    200 ``ok``: every agent is ready. 200 ``degraded``: some failed for good, the others are
    ready, so answers come from fewer agents. 503 ``loading``: some agent is still loading.
    503 ``failed``: no agent can answer. The body carries each agent's state and error.
    """
    health = {a["name"]: dict(a["health"]) for a in agents}
    for h in health.values():  # entries from before states existed only say "loaded"
        h.setdefault("state", "ready" if h.get("loaded") else "loading")
    states = [h["state"] for h in health.values()]
    ready = states.count("ready")
    if states and ready == len(states):
        status = "ok"
    elif "loading" in states:
        status = "loading"
    elif ready:
        status = "degraded"
    else:
        status = "failed"
    error = None
    if status == "failed":
        errors = {name: h.get("error") for name, h in health.items() if h.get("error")}
        error = "no agent can answer: " + "; ".join(f"{n}: {e}" for n, e in errors.items())
    report = HealthReport(status=status, agents=health, error=error)
    return (200 if status in ("ok", "degraded") else 503), report
