"""Online adaptation of the profile's weights from the panel's own unlabelled traffic.

A profile (``legion calibrate``) is fitted on one task; on another, the views that lead may be
others. The server sees many unlabelled items of the task it is given, and the members' picks on
them say something about each member's accuracy there, in the spirit of AMA prompting's weak
supervision (Arora et al., 2022): what agreement tells about accuracy once the voters'
dependencies are modelled.

The model. Under the one-coin model, a member ``i`` with skill ``kappa_i`` (accuracy above chance,
``legion.arbitration.adaptive``) on ``K``-way items agrees with an independent member ``j`` at a
rate whose chance-corrected value ``(K * agree - 1) / (K - 1)`` has expectation
``kappa_i * kappa_j``. Views of one model are *not* independent (they share the model's biases:
agreement 0.3-0.66 among Gemma's views on ARC), so only pairs across agents (model families) are
used. With two families that product identifies each member's skill up to one factor per family:
``kappa_i * mean_j kappa_j``, the mean over the other families' members, is the same scale for every
member of a family. What is identified, and what this adapts, is therefore the *relative* skill of
one agent's views on this traffic; the balance between agents stays as the profile fitted it.

The change. Every ``every`` items once ``min_items`` are in the window, member ``i``'s weight in the
profile is multiplied by ``(khat_i / mean_G khat) / (ktrain_i / mean_G ktrain)`` over its agent's
members ``G``, clipped to ``[1 / bound, bound]``: bounded, and 1 while there is too little evidence
or only one agent. The window holds the last ``window`` items' picks (indices only, never a task's
text) in SQLite; the factors are stored beside them, so replicas and restarts share them.

Measured on the dev sets (docs/arbitration.md, "A panel that fits its task"), this loses accuracy on
ARC-Challenge, where the two families share biases that agreement cannot tell from skill; it ships
off (``arbiter.adapt: off``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from legion import db
from legion.arbitration.adaptive import skill_from_accuracy
from legion.profile import Profile, load_profile

FLOOR = 0.02  # skills at or below this count as this: a ratio of near-zero skills is noise

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS adapt_picks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        panel TEXT NOT NULL,
        n_options INTEGER NOT NULL,
        picks TEXT NOT NULL,
        at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS adapt_picks_panel ON adapt_picks (panel, id)",
    """
    CREATE TABLE IF NOT EXISTS adapt_state (
        panel TEXT PRIMARY KEY,
        recorded INTEGER NOT NULL,
        refits INTEGER NOT NULL,
        window_items INTEGER NOT NULL,
        factors TEXT NOT NULL,
        skills TEXT NOT NULL,
        updated_at REAL NOT NULL
    )
    """,
)


@dataclass(frozen=True)
class Settings:
    window: int = 500
    min_items: int = 50
    every: int = 10
    bound: float = 2.0


def cross_family_skill(
    picks: np.ndarray, n_options: np.ndarray, family: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Each member's skill times its family's scale, from its chance-corrected agreement with the
    members of other families. ``picks[j, i]`` is member ``i``'s pick on item ``j`` (-1: it did
    not answer); returns the estimates and, for each member, the item pairs they rest on."""
    picks = np.asarray(picks, dtype=int)
    k = np.asarray(n_options, dtype=float)[:, None]
    n_members = picks.shape[1] if picks.ndim == 2 else 0
    est = np.zeros(n_members)
    support = np.zeros(n_members, dtype=int)
    for i in range(n_members):
        total = 0.0
        pairs = 0
        for j in range(n_members):
            if family[j] == family[i]:
                continue
            both = (picks[:, i] >= 0) & (picks[:, j] >= 0)
            if not both.any():
                continue
            agree = (picks[both, i] == picks[both, j]).astype(float)
            kk = k[both, 0]
            total += float(np.sum((kk * agree - 1.0) / (kk - 1.0)))
            pairs += int(both.sum())
        est[i] = total / pairs if pairs else 0.0
        support[i] = pairs
    return est, support


def within_family_factors(
    estimate: Mapping[str, float],
    train: Mapping[str, float],
    family: Mapping[str, str],
    bound: float,
) -> dict[str, float]:
    """Each member's factor: its skill relative to its family's mean on this traffic over the
    same on the profile's train items, clipped to [1/bound, bound]. A member alone in its family,
    or a family alone, keeps 1 (nothing identifies it)."""
    out = dict.fromkeys(estimate, 1.0)
    families = {family[m] for m in estimate}
    if len(families) < 2:
        return out
    for g in families:
        ms = [m for m in estimate if family[m] == g]
        if len(ms) < 2:
            continue
        here = {m: max(FLOOR, estimate[m]) for m in ms}
        fitted = {m: max(FLOOR, train[m]) for m in ms}
        mh = sum(here.values()) / len(ms)
        mt = sum(fitted.values()) / len(ms)
        for m in ms:
            ratio = (here[m] / mh) / (fitted[m] / mt)
            out[m] = float(min(bound, max(1.0 / bound, ratio)))
    return out


def panel_key(profile_path: str, profile: Profile, members: Sequence[str]) -> str:
    """What the stored window belongs to: the profile and the members voting. Another profile or
    another panel starts a window of its own."""
    blob = json.dumps(
        [os.path.abspath(profile_path), profile.model_dump(mode="json"), list(members)], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class State:
    """Where the adaptation stands: items recorded, refits, the window at the last refit, the
    factors and the estimated skills (relative, per family)."""

    recorded: int = 0
    refits: int = 0
    window_items: int = 0
    factors: dict[str, float] = field(default_factory=dict)
    skills: dict[str, float] = field(default_factory=dict)
    updated_at: float | None = None


class Adaptation:
    """The adaptation of one profile over one panel, kept in memory or, with ``path``, in SQLite
    (shared by the Arbiter's replicas and its restarts)."""

    def __init__(
        self,
        profile: Profile,
        family: Mapping[str, str],
        settings: Settings,
        path: str | os.PathLike | None = None,
        key: str = "memory",
    ):
        self.members = [a.name for a in profile.agents]
        missing = [m for m in self.members if m not in family]
        if missing:
            raise ValueError(f"no agent for members {missing}")
        self.family = {m: family[m] for m in self.members}
        self.train = {
            a.name: skill_from_accuracy(a.train_accuracy if a.train_accuracy is not None else 0.0, 4)
            for a in profile.agents
        }
        self.settings = settings
        self.path = os.fspath(path) if path is not None else None
        self.key = key
        self._rows: list[tuple[int, list[int]]] = []  # in memory: (n_options, picks) per item
        self._state = State()
        if self.path is not None:
            with db.transaction(self.path) as conn:
                for stmt in _SCHEMA:
                    conn.execute(stmt)

    # ------------------------------------------------------------------ recording and refitting

    def record(self, picks: Mapping[str, int | None], n_options: int) -> State:
        """Add one item's picks (member -> choice index; None or absent: it did not answer), keep
        the window bounded, and refit when it is due. An item with fewer than two answers, or
        answers from one agent only, says nothing about agreement across agents and is skipped."""
        if n_options < 2:
            raise ValueError(f"n_options must be at least 2, got {n_options}")
        got = [picks.get(m) for m in self.members]
        row = [int(p) if p is not None and 0 <= int(p) < n_options else -1 for p in got]
        if len({self.family[m] for m, p in zip(self.members, row, strict=True) if p >= 0}) < 2:
            return self.state()
        if self.path is None:
            return self._record_memory(row, n_options)
        with db.transaction(self.path) as conn:
            conn.execute(
                "INSERT INTO adapt_picks (panel, n_options, picks, at) VALUES (?, ?, ?, ?)",
                (self.key, n_options, json.dumps(row), time.time()),
            )
            # The window: the newest `window` rows of this panel.
            conn.execute(
                "DELETE FROM adapt_picks WHERE panel = ? AND id <= (SELECT id FROM adapt_picks "
                "WHERE panel = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.key, self.key, self.settings.window),
            )
            state = self._read(conn)
            state.recorded += 1
            if self._due(state.recorded):
                rows = conn.execute(
                    "SELECT n_options, picks FROM adapt_picks WHERE panel = ? ORDER BY id", (self.key,)
                ).fetchall()
                self._refit(state, [(int(k), json.loads(p)) for k, p in rows])
            state.updated_at = time.time()
            conn.execute(
                "INSERT INTO adapt_state (panel, recorded, refits, window_items, factors, skills, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(panel) DO UPDATE SET "
                "recorded=excluded.recorded, "
                "refits=excluded.refits, window_items=excluded.window_items, factors=excluded.factors, "
                "skills=excluded.skills, updated_at=excluded.updated_at",
                (
                    self.key,
                    state.recorded,
                    state.refits,
                    state.window_items,
                    json.dumps(state.factors),
                    json.dumps(state.skills),
                    state.updated_at,
                ),
            )
        self._state = state
        return state

    def _record_memory(self, row: list[int], n_options: int) -> State:
        self._rows.append((n_options, row))
        del self._rows[: max(0, len(self._rows) - self.settings.window)]
        st = self._state
        st.recorded += 1
        if self._due(st.recorded):
            self._refit(st, self._rows)
        st.updated_at = time.time()
        return st

    def _due(self, recorded: int) -> bool:
        s = self.settings
        return recorded >= s.min_items and (recorded - s.min_items) % s.every == 0

    def _refit(self, state: State, rows: Sequence[tuple[int, list[int]]]) -> None:
        picks = np.array([p for _, p in rows], dtype=int).reshape(len(rows), len(self.members))
        k = np.array([n for n, _ in rows], dtype=float)
        est, _ = cross_family_skill(picks, k, [self.family[m] for m in self.members])
        estimate = {m: float(e) for m, e in zip(self.members, est, strict=True)}
        state.factors = within_family_factors(estimate, self.train, self.family, self.settings.bound)
        state.skills = {m: round(v, 6) for m, v in estimate.items()}
        state.refits += 1
        state.window_items = len(rows)

    def _read(self, conn: Any) -> State:
        got = conn.execute(
            "SELECT recorded, refits, window_items, factors, skills, updated_at FROM adapt_state "
            "WHERE panel = ?",
            (self.key,),
        ).fetchone()
        if got is None:
            return State()
        recorded, refits, window_items, factors, skills, at = got
        return State(
            int(recorded), int(refits), int(window_items), json.loads(factors), json.loads(skills), float(at)
        )

    # ------------------------------------------------------------------ reading

    def state(self) -> State:
        """The stored state (the in-memory one without a file)."""
        if self.path is None:
            return self._state
        with db.reading(self.path) as conn:
            self._state = self._read(conn)
        return self._state

    def factors(self) -> dict[str, float]:
        got = self.state().factors
        return {m: float(got.get(m, 1.0)) for m in self.members}

    def adapt(self, profile: Profile, factors: Mapping[str, float] | None = None) -> Profile:
        """``profile`` with each member's weight (and sway, and its covariance's rows and columns)
        multiplied by its factor."""
        f = self.factors() if factors is None else factors
        if all(math.isclose(f.get(a.name, 1.0), 1.0) for a in profile.agents):
            return profile
        agents = []
        for a in profile.agents:
            x = f.get(a.name, 1.0)
            w = a.weight * x
            agents.append(
                a.model_copy(
                    update={
                        "weight": w,
                        "temperature": (1.0 / abs(w)) if w else None,
                        "vote_points": None if a.vote_points is None else min(1000.0, a.vote_points * x),
                    }
                )
            )
        cov = profile.covariance
        if cov is not None:  # each member's contributions scale with its weight
            xs = [f.get(m, 1.0) for m in cov.members]
            cov = cov.model_copy(
                update={
                    "matrix": [
                        [v * xs[i] * xs[j] for j, v in enumerate(row)] for i, row in enumerate(cov.matrix)
                    ]
                }
            )
        return profile.model_copy(update={"agents": agents, "covariance": cov})

    def summary(self) -> dict[str, Any]:
        """What ``/v1/agents`` shows."""
        st = self.state()
        s = self.settings
        return {
            "mode": "agreement",
            "recorded": st.recorded,
            "window_items": st.window_items,
            "refits": st.refits,
            "window": s.window,
            "min_items": s.min_items,
            "every": s.every,
            "bound": s.bound,
            "updated_at": st.updated_at,
            "factors": {m: round(v, 4) for m, v in self.factors().items()},
            "relative_skills": st.skills,
        }


def from_config(cfg: Any) -> Adaptation | None:
    """``arbiter.adapt``'s adaptation of ``arbiter.profile`` over ``cfg``'s panel (None when off or
    there is no profile), stored in ``adapt_file``: what the Arbiter adapts by and what the result
    cache's key reads the factors from."""
    a = cfg.arbiter
    if a.adapt == "off" or a.profile is None:
        return None
    profile = load_profile(a.profile)
    owner = {m.name: agent.name for agent in cfg.agents for m in agent.members()}
    settings = Settings(a.adapt_window, a.adapt_min_items, a.adapt_every, a.adapt_bound)
    key = panel_key(a.profile, profile, [m.name for m in cfg.panel])
    return Adaptation(profile, owner, settings, cfg.data_path / a.adapt_file, key)
