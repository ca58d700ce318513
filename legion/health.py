"""The service's health from its agents' states: what ``/healthz`` answers.

Each agent is ``loading`` (its model is loading, or its actor is restarting), ``ready`` (it
loaded its model and decoded a token) or ``failed`` (it cannot serve; its ``error`` says why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def service_health(agents: Sequence[Mapping]) -> tuple[int, dict]:
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
    body: dict = {"status": status, "agents": health}
    if status == "failed":
        errors = {name: h.get("error") for name, h in health.items() if h.get("error")}
        body["error"] = "no agent can answer: " + "; ".join(f"{n}: {e}" for n, e in errors.items())
    return (200 if status in ("ok", "degraded") else 503), body
