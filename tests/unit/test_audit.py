"""The audit log on real SQLite files: rows, order, several writers, an unwritable file, pruning."""

from __future__ import annotations

import multiprocessing
import time

from legion.service.audit import AuditEntry, AuditLog


def _entry(i: int, status: int = 200, key: str | None = "key-0123456789") -> AuditEntry:
    return AuditEntry(
        ts=time.time(),
        request_id=f"req-{i}",
        key_id=key,
        client="127.0.0.1",
        method="POST",
        route="/v1/tasks",
        status=status,
        task_hash=f"{i:064x}",
        latency_ms=1.5 * i,
    )


def test_records_come_back_in_order_and_by_request_id(tmp_path):
    log = AuditLog(tmp_path / "audit.db")
    assert log.tail() == []
    written = [_entry(i, status=200 if i % 2 else 401, key=None if i % 2 == 0 else "key-x") for i in range(5)]
    for e in written:
        assert log.record(e) is True
    assert log.tail(3) == written[2:]
    assert log.tail(100) == written
    assert log.find("req-3") == written[3]
    assert log.find("req-404") is None
    # A second AuditLog on the same file (another replica) sees the same rows.
    assert AuditLog(tmp_path / "audit.db").tail(100) == written


def _write_many(path: str, worker: int, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        assert log.record(_entry(worker * 10_000 + i))


def test_several_processes_append_without_losing_a_row(tmp_path):
    path = str(tmp_path / "audit.db")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = {e.request_id for e in AuditLog(path).tail(10_000)}
    assert ids == {f"req-{w * 10_000 + i}" for w in range(3) for i in range(150)}


def test_unwritable_file_keeps_records_until_it_can_write(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the audit folder should be")
    log = AuditLog(blocker / "audit.db")
    assert log.record(_entry(1)) is False
    assert log.record(_entry(2)) is False
    assert log.pending == 2
    blocker.unlink()
    blocker.mkdir()
    assert log.record(_entry(3)) is True
    assert log.pending == 0
    assert [e.request_id for e in log.tail(10)] == ["req-1", "req-2", "req-3"]


def test_waiting_records_are_bounded(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.db", max_pending=3)
    for i in range(5):
        assert log.record(_entry(i)) is False
    assert log.pending == 3
    blocker.unlink()
    blocker.mkdir()
    assert log.record(_entry(5)) is True
    assert [e.request_id for e in log.tail(10)] == ["req-3", "req-4", "req-5"]  # the oldest went


def test_oldest_rows_are_pruned_beyond_max_rows(tmp_path):
    log = AuditLog(tmp_path / "audit.db", max_rows=100)
    for i in range(1000):
        log.record(_entry(i))
    kept = log.tail(10_000)
    assert len(kept) == 100
    assert kept[0].request_id == "req-900" and kept[-1].request_id == "req-999"


def test_concurrent_records_share_one_transaction(tmp_path):
    import threading

    log = AuditLog(tmp_path / "audit.db")
    writes = []
    real_write = log._write
    log._write = lambda entries: (writes.append(len(entries)), real_write(entries))
    results = []
    with log._write_lock:  # a transaction in progress: the next ten callers queue behind it
        threads = [
            threading.Thread(target=lambda i=i: results.append(log.record(_entry(i)))) for i in range(10)
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while log.pending < 10 and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert results == [True] * 10
    assert writes == [10]  # the first caller through wrote all ten; the others found theirs committed
    assert sorted(e.request_id for e in log.tail(100)) == sorted(f"req-{i}" for i in range(10))
