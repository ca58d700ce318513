"""Dynamic trust weights: one weight per agent, updated by multiplicative weights (Hedge).

After each task an agent's loss is 0 when its answer matched the decision (or the ground
truth, when an evaluation supplies one) and 1 when it did not; Hedge multiplies its weight by
``exp(-eta * loss)`` and renormalises so the weights average 1. A floor keeps every agent in
the vote: an agent that was outvoted for a while can earn its weight back. ``TrustStore``
keeps the weights in SQLite (through ``legion.db``), so they survive restarts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from legion import db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trust (
    agent TEXT PRIMARY KEY,
    weight REAL NOT NULL,
    updates INTEGER NOT NULL DEFAULT 0,
    agreements INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
)
"""


def hedge_update(
    weights: Mapping[str, float], losses: Mapping[str, float], eta: float, floor: float = 0.0
) -> dict[str, float]:
    """One Hedge step: ``w_i * exp(-eta * loss_i)``, renormalised to mean 1.

    Agents without a loss (they did not answer) keep their weight before renormalising.
    Losses must lie in [0, 1]. Then every weight is raised to at least ``floor``, so the
    weights average 1 or a little more.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not weights:
        return {}
    new = {}
    for agent, w in weights.items():
        loss = losses.get(agent)
        if loss is not None and not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss of {agent} must lie in [0, 1], got {loss}")
        new[agent] = w * math.exp(-eta * loss) if loss is not None else w
    mean = sum(new.values()) / len(new)
    if mean <= 0:
        return {a: 1.0 for a in new}
    return {a: max(floor, w / mean) for a, w in new.items()}


def agreement_losses(answers: Mapping[str, str | None], reference: str) -> dict[str, float]:
    """Loss 0 for agents whose normalised answer equals ``reference``, 1 otherwise.

    Agents whose answer is ``None`` (they failed or timed out) get no loss: a crash says
    nothing about how trustworthy the agent's answers are.
    """
    return {a: (0.0 if ans == reference else 1.0) for a, ans in answers.items() if ans is not None}


@dataclass
class TrustRecord:
    """One agent's trust as stored."""

    agent: str
    weight: float
    updates: int
    agreements: int


class TrustStore:
    """Trust weights in a SQLite file; every agent starts at weight 1."""

    def __init__(self, path: str | os.PathLike, *, eta: float = 0.1, floor: float = 0.05):
        self.path = os.fspath(path)
        self.eta = eta
        self.floor = floor
        with db.transaction(self.path) as conn:
            conn.execute(_SCHEMA)

    def records(self, agents: Iterable[str]) -> dict[str, TrustRecord]:
        """The stored record of each agent in ``agents`` (weight 1 for an agent never updated)."""
        names = list(agents)
        with db.reading(self.path) as conn:
            rows = conn.execute("SELECT agent, weight, updates, agreements FROM trust").fetchall()
        found = {r[0]: TrustRecord(r[0], float(r[1]), int(r[2]), int(r[3])) for r in rows}
        return {a: found.get(a, TrustRecord(a, 1.0, 0, 0)) for a in names}

    def weights(self, agents: Iterable[str]) -> dict[str, float]:
        return {a: r.weight for a, r in self.records(agents).items()}

    def update(self, agents: Iterable[str], losses: Mapping[str, float]) -> dict[str, float]:
        """Apply one Hedge step over ``agents`` in one transaction; returns the new weights."""
        names = list(agents)
        with db.transaction(self.path) as conn:
            rows = conn.execute("SELECT agent, weight, updates, agreements FROM trust").fetchall()
            found = {r[0]: (float(r[1]), int(r[2]), int(r[3])) for r in rows}
            current = {a: found.get(a, (1.0, 0, 0))[0] for a in names}
            new = hedge_update(current, losses, self.eta, self.floor)
            now = time.time()
            for a in names:
                _, updates, agreements = found.get(a, (1.0, 0, 0))
                if a in losses:
                    updates += 1
                    agreements += int(losses[a] == 0.0)
                conn.execute(
                    "INSERT INTO trust (agent, weight, updates, agreements, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(agent) DO UPDATE SET weight=excluded.weight, "
                    "updates=excluded.updates, agreements=excluded.agreements, "
                    "updated_at=excluded.updated_at",
                    (a, new[a], updates, agreements, now),
                )
        return new
