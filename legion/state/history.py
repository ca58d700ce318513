"""``ConversationStore``: the turns of each chat session in SQLite, shared by every replica.

A turn is one message (``user`` or ``assistant``) with its position in the session; the
position is assigned inside the write transaction, so writers in several processes never
collide or leave a gap. ``recent`` picks the latest turns that fit the agents' budget.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from legion.config import LegionConfig
from legion.db import reading, transaction
from legion.errors import InvalidRequest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    task_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
)
"""

MAX_SESSION_ID_CHARS = 128


class Turn(BaseModel):
    role: str  # "user" or "assistant"
    content: str
    seq: int = 0
    task_id: str | None = None
    created_at: float = 0.0


def check_session_id(value: str) -> str:
    """A session id as sent (the ``user`` field or ``X-Session-Id``), or ``InvalidRequest``."""
    sid = value.strip()
    if not sid:
        raise InvalidRequest("the session id is empty: send a non-empty 'user' field or X-Session-Id")
    if len(sid) > MAX_SESSION_ID_CHARS:
        raise InvalidRequest(
            f"the session id is {len(sid)} characters; the limit is {MAX_SESSION_ID_CHARS}: shorten it"
        )
    if not sid.isprintable():
        raise InvalidRequest("the session id holds control characters: use printable text")
    return sid


class ConversationStore:
    """Chat turns by session id in one SQLite file; safe from many processes and threads."""

    def __init__(self, path: str | os.PathLike, *, max_stored_turns: int = 1000):
        self.path = Path(path).expanduser()
        self.max_stored_turns = max_stored_turns
        with transaction(self.path) as conn:
            conn.execute(_SCHEMA)

    @classmethod
    def from_config(cls, cfg: LegionConfig) -> ConversationStore:
        return cls(cfg.data_path / cfg.history.file, max_stored_turns=cfg.history.max_stored_turns)

    def append(self, session_id: str, turns: list[Turn]) -> list[int]:
        """Add ``turns`` at the end of the session, atomically; returns their positions."""
        now = time.time()
        with transaction(self.path) as conn:
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM turns WHERE session_id = ?", (session_id,)
            ).fetchone()
            seqs = list(range(last + 1, last + 1 + len(turns)))
            conn.executemany(
                "INSERT INTO turns (session_id, seq, role, content, task_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (session_id, s, t.role, t.content, t.task_id, now)
                    for s, t in zip(seqs, turns, strict=True)
                ],
            )
            if seqs and seqs[-1] > self.max_stored_turns:
                conn.execute(
                    "DELETE FROM turns WHERE session_id = ? AND seq <= ?",
                    (session_id, seqs[-1] - self.max_stored_turns),
                )
        return seqs

    def turns(self, session_id: str) -> list[Turn]:
        """Every stored turn of the session, oldest first (empty for an unknown session)."""
        with reading(self.path) as conn:
            rows = conn.execute(
                "SELECT role, content, seq, task_id, created_at FROM turns WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        return [Turn(role=r[0], content=r[1], seq=r[2], task_id=r[3], created_at=r[4]) for r in rows]

    def recent(self, session_id: str, *, max_turns: int, max_chars: int) -> list[Turn]:
        """The latest turns, oldest first, at most ``max_turns`` and ``max_chars`` of content.

        Whole turns only: a turn that does not fit ends the selection.
        """
        if max_turns <= 0 or max_chars <= 0:
            return []
        with reading(self.path) as conn:
            rows = conn.execute(
                "SELECT role, content, seq, task_id, created_at FROM turns "
                "WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
                (session_id, max_turns),
            ).fetchall()
        picked: list[Turn] = []
        used = 0
        for r in rows:
            used += len(r[1])
            if used > max_chars:
                break
            picked.append(Turn(role=r[0], content=r[1], seq=r[2], task_id=r[3], created_at=r[4]))
        return picked[::-1]


def history_budget_chars(cfg: LegionConfig, task: str, other_chars: int, max_tokens: int | None) -> int:
    """Characters of history every agent can take besides the task, its prompt, ``other_chars``
    of other context (retrieved documents) and the reply; at most ``history.max_chars``.

    Counts about 3 characters per token (English text is nearer 4), so the estimate errs on
    the side of leaving room in the smallest agent's context window.
    """
    room = cfg.history.max_chars
    for a in cfg.agents:
        reply = max_tokens or a.sampling.max_tokens
        prompt = len(a.role_prompt) + len(a.prompt_template) + len(task) + other_chars
        room = min(room, (a.n_ctx - reply) * 3 - prompt)
    return max(0, room)
