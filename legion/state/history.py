"""``ConversationStore``: the turns of each chat session in SQLite, shared by every replica.

A turn is one message (``user``, ``assistant``, or ``tool``: a function's result) with its
position in the session; the position is assigned inside the write transaction, so writers in
several processes never collide or leave a gap. An assistant turn that called functions keeps
its calls (``tool_calls``), a tool turn the call it answers (``tool_call_id``). ``recent`` picks
the latest turns that fit the agents' budget. A file written before tool turns existed is
rebuilt in place, in one transaction, its turns kept.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from legion.config import LegionConfig
from legion.db import reading, transaction
from legion.errors import InvalidRequest

_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool')),
    content TEXT NOT NULL,
    task_id TEXT,
    created_at REAL NOT NULL,
    tool_calls TEXT,
    tool_call_id TEXT,
    PRIMARY KEY (session_id, seq)
)
"""
_OLD_COLUMNS = "session_id, seq, role, content, task_id, created_at"
_COLUMNS = "role, content, seq, task_id, created_at, tool_calls, tool_call_id"

MAX_SESSION_ID_CHARS = 128


class Turn(BaseModel):
    role: str  # "user", "assistant" or "tool"
    content: str
    seq: int = 0
    task_id: str | None = None
    created_at: float = 0.0
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers


def _turn(row: tuple) -> Turn:
    calls = json.loads(row[5]) if row[5] else None
    return Turn(
        role=row[0],
        content=row[1],
        seq=row[2],
        task_id=row[3],
        created_at=row[4],
        tool_calls=calls,
        tool_call_id=row[6],
    )


def _migrate(conn) -> None:
    """Create the table, or rebuild one written before tool turns (its role CHECK allowed only
    user and assistant): copy every turn into the new table, then swap, in the caller's
    transaction, so a failure leaves the old table as it was."""
    found = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'turns'").fetchone()
    if found is None:
        conn.execute(_TABLE.format(name="turns"))
        return
    if "tool_call_id" in found[0]:
        return
    conn.execute("DROP TABLE IF EXISTS turns_rebuilt")
    conn.execute(_TABLE.format(name="turns_rebuilt"))
    conn.execute(f"INSERT INTO turns_rebuilt ({_OLD_COLUMNS}) SELECT {_OLD_COLUMNS} FROM turns")
    conn.execute("DROP TABLE turns")
    conn.execute("ALTER TABLE turns_rebuilt RENAME TO turns")


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
            _migrate(conn)

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
                "INSERT INTO turns (session_id, seq, role, content, task_id, created_at, tool_calls, "
                "tool_call_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        session_id,
                        s,
                        t.role,
                        t.content,
                        t.task_id,
                        now,
                        json.dumps(t.tool_calls) if t.tool_calls else None,
                        t.tool_call_id,
                    )
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
                f"SELECT {_COLUMNS} FROM turns WHERE session_id = ? ORDER BY seq", (session_id,)
            ).fetchall()
        return [_turn(r) for r in rows]

    def recent(self, session_id: str, *, max_turns: int, max_chars: int) -> list[Turn]:
        """The latest turns, oldest first, at most ``max_turns`` and ``max_chars`` of content.

        Whole turns only: a turn that does not fit ends the selection.
        """
        if max_turns <= 0 or max_chars <= 0:
            return []
        with reading(self.path) as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM turns WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
                (session_id, max_turns),
            ).fetchall()
        picked: list[Turn] = []
        used = 0
        for r in rows:
            used += len(r[1])
            if used > max_chars:
                break
            picked.append(_turn(r))
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
