"""SQLite access shared by Legion's stores (cache, history, trust weights, audit log).

Many Serve replicas and actors write the same files at once, so every store goes through
``connect``: one connection per process and file, WAL journal, a busy timeout, and a lock
that serialises this process's threads on the connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_connections: dict[tuple[int, str], tuple[sqlite3.Connection, threading.RLock]] = {}
_guard = threading.Lock()

BUSY_TIMEOUT_MS = 30_000


def connect(path: str | os.PathLike) -> tuple[sqlite3.Connection, threading.RLock]:
    """This process's connection to ``path`` (created with its folder on first use) and its lock.

    A forked child gets its own connection: the key includes the process id.
    """
    p = str(Path(path).expanduser().resolve())
    key = (os.getpid(), p)
    with _guard:
        found = _connections.get(key)
        if found is not None:
            return found
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            p, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, isolation_level=None
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        found = (conn, threading.RLock())
        _connections[key] = found
        return found


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, retrying while another process holds it.

    Changing the journal mode takes an exclusive lock, and SQLite can answer "database is
    locked" at once there instead of waiting out the busy timeout (seen with several processes
    opening a new file together: one in a few hundred failed). WAL is a property of the file,
    so once any process has switched it the pragma is a read that returns "wal".
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            transient = "locked" in str(e) or "busy" in str(e)
            if not transient or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
            continue
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"SQLite kept journal mode {mode!r} instead of WAL")
        return


@contextmanager
def transaction(path: str | os.PathLike) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on this process's connection; rolls back on error."""
    conn, lock = connect(path)
    with lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[sqlite3.Connection]:
    """This process's connection, held under its lock, for reads."""
    conn, lock = connect(path)
    with lock:
        yield conn
