"""ConversationStore on real SQLite files: order, budget, many writers, a writer killed mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from legion.config import config_from_dict
from legion.errors import InvalidRequest
from legion.service.api import ChatBody, chat_request, client_keeps_history
from legion.state.history import ConversationStore, Turn, check_session_id, history_budget_chars


@pytest.fixture()
def store(tmp_path) -> ConversationStore:
    return ConversationStore(tmp_path / "history.db", max_stored_turns=6)


def test_turns_keep_their_order_per_session(store):
    assert store.append(
        "alice", [Turn(role="user", content="hi"), Turn(role="assistant", content="hello")]
    ) == [
        1,
        2,
    ]
    assert store.append("bob", [Turn(role="user", content="other")]) == [1]
    assert store.append("alice", [Turn(role="user", content="again", task_id="t-1")]) == [3]
    turns = store.turns("alice")
    assert [(t.seq, t.role, t.content) for t in turns] == [
        (1, "user", "hi"),
        (2, "assistant", "hello"),
        (3, "user", "again"),
    ]
    assert turns[2].task_id == "t-1"
    assert store.turns("nobody") == []


def test_recent_keeps_whole_latest_turns_within_the_budget(store):
    store.append("s", [Turn(role="user", content=c) for c in ("aaaa", "bbbb", "cccc", "dddd")])
    assert [t.content for t in store.recent("s", max_turns=2, max_chars=1000)] == ["cccc", "dddd"]
    assert [t.content for t in store.recent("s", max_turns=10, max_chars=9)] == ["cccc", "dddd"]
    assert store.recent("s", max_turns=10, max_chars=3) == []
    assert store.recent("s", max_turns=0, max_chars=1000) == []


def test_old_turns_beyond_the_bound_are_dropped(store):
    for i in range(5):
        store.append("s", [Turn(role="user", content=f"q{i}"), Turn(role="assistant", content=f"a{i}")])
    turns = store.turns("s")
    assert len(turns) == store.max_stored_turns
    assert [t.content for t in turns[-2:]] == ["q4", "a4"]
    assert turns[0].seq == 10 - store.max_stored_turns + 1


@pytest.mark.parametrize(
    ("value", "fragment"), [("   ", "empty"), ("x" * 129, "limit is 128"), ("a\nb", "control")]
)
def test_bad_session_ids_say_what_to_change(value, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        check_session_id(value)


def test_history_budget_shrinks_with_other_context_and_reply():
    cfg = config_from_dict({"agents": [{"name": "a", "n_ctx": 512}], "history": {"max_chars": 100_000}})
    roomy = history_budget_chars(cfg, "short task", 0, 16)
    assert 0 < roomy < 512 * 3
    assert history_budget_chars(cfg, "short task", 500, 16) == roomy - 500
    assert history_budget_chars(cfg, "short task", 0, 116) == roomy - 300
    assert history_budget_chars(cfg, "short task", 10_000, 16) == 0
    capped = config_from_dict({"agents": [{"name": "a", "n_ctx": 512}], "history": {"max_chars": 50}})
    assert history_budget_chars(capped, "short task", 0, 16) == 50


def test_stored_turns_follow_the_instructions_unless_the_client_sends_its_own():
    cfg = config_from_dict({})
    body = ChatBody(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And?"}]
    )
    assert not client_keeps_history(body)
    req = chat_request(body, cfg, history=[("user", "My name is Ada."), ("assistant", "Hello Ada.")])
    assert req.task == "And?"
    assert req.context.splitlines() == [
        "Conversation so far:",
        "Instructions: Be brief.",
        "User: My name is Ada.",
        "Assistant: Hello Ada.",
    ]
    own = ChatBody(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "And?"},
        ]
    )
    assert client_keeps_history(own)


_APPENDER = textwrap.dedent(
    """
    import sys
    from legion.state.history import ConversationStore, Turn
    path, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ConversationStore(path, max_stored_turns=10**6)
    for i in range(count):
        seqs = store.append("shared", [Turn(role="user", content=f"{writer} q{i}"),
                                       Turn(role="assistant", content=f"{writer} a{i}")])
        # Printed only after the commit returned: every line names a committed pair.
        print(f"{writer} {i} {seqs[0]}", flush=True)
    """
)


def _check_session(path, expected_pairs: set[tuple[str, int]] | None = None) -> list[Turn]:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    turns = ConversationStore(path, max_stored_turns=10**6).turns("shared")
    # Positions run 1..n without a gap, and every pair stayed together in order.
    assert [t.seq for t in turns] == list(range(1, len(turns) + 1))
    assert len(turns) % 2 == 0
    for q, a in zip(turns[::2], turns[1::2], strict=True):
        assert (q.role, a.role) == ("user", "assistant")
        assert q.content.replace(" q", " a") == a.content
    if expected_pairs is not None:
        stored = Counter(tuple(t.content.replace(" q", " ").split()) for t in turns[::2])
        assert all(stored[(w, str(i))] == 1 for w, i in expected_pairs)
    return turns


def test_several_processes_append_at_once_and_every_turn_survives(tmp_path):
    path = tmp_path / "history.db"
    writers, count = 4, 100
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _APPENDER, str(path), f"w{w}", str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers
    turns = _check_session(path, {(f"w{w}", i) for w in range(writers) for i in range(count)})
    assert len(turns) == 2 * writers * count
    # Each writer saw the position its pair really got.
    reported = {(w, int(i)): int(seq) for line in "".join(outs).splitlines() for w, i, seq in [line.split()]}
    by_seq = {t.seq: t.content for t in turns}
    assert all(by_seq[seq] == f"{w} q{i}" for (w, i), seq in reported.items())


def test_a_writer_killed_mid_write_leaves_every_committed_turn(tmp_path):
    path = tmp_path / "history.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _APPENDER, str(path), "victim", "1000000"], stdout=subprocess.PIPE, text=True
    )
    committed: set[tuple[str, int]] = set()
    try:
        while len(committed) < 300:
            line = proc.stdout.readline()
            assert line, "the writer stopped before it was killed"
            w, i, _ = line.split()
            committed.add((w, int(i)))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    turns = _check_session(path, committed)
    assert len(turns) >= 2 * len(committed)
    # The file still takes writes after the crash.
    ConversationStore(path).append("shared", [Turn(role="user", content="after q0")])


OLD_SCHEMA = """
CREATE TABLE turns (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    task_id TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
)
"""


def test_a_file_from_before_tool_turns_is_rebuilt_with_every_turn_kept(tmp_path):
    path = tmp_path / "history.db"
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_SCHEMA)
        rows = [
            ("ada", i, "user" if i % 2 else "assistant", f"turn {i}", f"task-{i}", 100.0 + i)
            for i in (1, 2, 3)
        ]
        conn.executemany("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?)", rows)
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO turns VALUES ('ada', 9, 'tool', 'x', NULL, 1.0)")
    store = ConversationStore(path)
    kept = store.turns("ada")
    assert [(t.seq, t.role, t.content, t.task_id, t.created_at) for t in kept] == [r[1:] for r in rows]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    store.append(
        "ada",
        [
            Turn(role="assistant", content="{}", tool_calls=[call]),
            Turn(role="tool", content="sunny", tool_call_id="call_1"),
        ],
    )
    again = ConversationStore(path).turns("ada")  # opening it again changes nothing
    assert [t.role for t in again] == ["user", "assistant", "user", "assistant", "tool"]
    assert again[3].tool_calls == [call] and again[4].tool_call_id == "call_1"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert names == {"turns"}
