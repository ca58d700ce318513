"""legion.db: the connection every store shares."""

import sqlite3
import threading

from legion import db


def test_opening_a_file_while_another_process_writes_to_it_waits_instead_of_failing(tmp_path):
    # A writer in rollback-journal mode holds RESERVED. Switching the file to WAL needs an
    # exclusive lock, and SQLite refuses that at once (no busy wait) to avoid a deadlock: the
    # CI failure "database is locked" from PRAGMA journal_mode=WAL with four processes.
    path = tmp_path / "shared.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t(x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    release.start()
    try:
        conn, _ = db.connect(path)
    finally:
        release.join()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # The writer's row was committed, not lost to the switch.
    with db.reading(path) as c:
        assert c.execute("SELECT x FROM t").fetchall() == [(1,)]
    writer.close()


def test_a_file_that_is_not_a_database_still_fails_clearly(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite" * 100)
    try:
        db.connect(path)
    except sqlite3.DatabaseError as e:
        assert "not a database" in str(e)
    else:
        raise AssertionError("connect accepted a file that is not a database")
