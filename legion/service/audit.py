"""The audit log: one SQLite row per HTTP request (time, key id, route, status, task hash, latency).

It never holds a key or a task's text: the key's id is a prefix of its hash, the task is its
SHA-256. Writes go through ``legion.db`` (WAL, busy timeout), so every replica can append to
the same file. When the file cannot be written, records wait in memory (bounded) and go in
with the next write that succeeds; the request itself is answered regardless.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import deque
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from legion.db import connect, reading, transaction

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    key_id TEXT,
    client TEXT,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    task_hash TEXT,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE INDEX IF NOT EXISTS audit_request ON audit (request_id);
"""
_PRUNE_EVERY = 1000


@dataclass(frozen=True)
class AuditEntry:
    """One request as the audit log keeps it (``ts`` in Unix seconds)."""

    ts: float
    request_id: str
    key_id: str | None
    client: str | None
    method: str
    route: str
    status: int
    task_hash: str | None
    latency_ms: float


_COLUMNS = [f.name for f in fields(AuditEntry)]


class AuditLog:
    """Appends ``AuditEntry`` rows to a SQLite file; keeps at most ``max_rows`` (oldest go first).

    Group commit: threads that record at the same time share one transaction. A caller returns
    once a transaction holding its entry has committed (its own or another caller's), so the
    rule "committed before the response leaves" costs one commit per burst, not per request.
    """

    def __init__(self, path: str | os.PathLike, *, max_rows: int = 1_000_000, max_pending: int = 10_000):
        self.path = Path(path).expanduser()
        self.max_rows = max_rows
        self._pending: deque[tuple[int, AuditEntry]] = deque()  # (sequence number, entry)
        self._max_pending = max_pending
        self._lost = 0
        self._since_prune = 0
        self._schema_ready = False
        self._appended = 0  # sequence number of the last entry recorded
        self._written = 0  # every entry up to this sequence number is committed
        self._lock = threading.Lock()  # guards the fields above
        self._write_lock = threading.Lock()  # one transaction at a time

    @property
    def pending(self) -> int:
        """Records waiting for the file to become writable again."""
        return len(self._pending)

    def record(self, entry: AuditEntry) -> bool:
        """Append ``entry`` (and any waiting records); False if the file could not be written."""
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self._lost += 1
                log.error("audit log %s unwritable: %d records dropped so far", self.path, self._lost)
            self._appended += 1
            mine = self._appended
            self._pending.append((mine, entry))
        with self._write_lock:
            with self._lock:
                if self._written >= mine:  # committed by another caller's transaction meanwhile
                    return True
                batch = list(self._pending)
            try:
                self._write([e for _, e in batch])
            except (sqlite3.Error, OSError) as exc:
                log.warning(
                    "audit log %s unwritable (%s); %d records wait in memory",
                    self.path,
                    exc,
                    len(self._pending),
                )
                return False
            upto = batch[-1][0]
            with self._lock:
                self._written = max(self._written, upto)
                while self._pending and self._pending[0][0] <= upto:
                    self._pending.popleft()
            return True

    def _write(self, entries: list[AuditEntry]) -> None:
        if not self._schema_ready:
            conn, lock = connect(self.path)
            with lock:
                conn.executescript(_SCHEMA)
            self._schema_ready = True
        rows = [astuple(e) for e in entries]
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with transaction(self.path) as conn:
            conn.executemany(f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({placeholders})", rows)
            self._since_prune += len(rows)
            if self._since_prune >= _PRUNE_EVERY:
                self._since_prune = 0
                conn.execute(
                    "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?", (self.max_rows,)
                )

    def tail(self, n: int = 20) -> list[AuditEntry]:
        """The last ``n`` records, oldest first (empty if the file does not exist yet)."""
        if not self.path.exists():
            return []
        with reading(self.path) as conn:
            try:
                rows = conn.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM audit ORDER BY id DESC LIMIT ?", (n,)
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
        return [AuditEntry(*r) for r in reversed(rows)]

    def find(self, request_id: str) -> AuditEntry | None:
        """The record of one request, by the ``X-Request-Id`` its response carried."""
        if not self.path.exists():
            return None
        with reading(self.path) as conn:
            row = conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM audit WHERE request_id = ?", (request_id,)
            ).fetchone()
        return AuditEntry(*row) if row else None
