"""``ResultCache``: arbitrated answers in SQLite, shared by every ingress replica.

A key covers everything that decides an answer: the normalised task, the strategy, the
reply length, the context given to the agents (history, retrieved documents) and every
agent's config (model, prompts, sampling). Entries expire after ``ttl_s``; past
``max_entries`` the least recently used go first. Hit and miss counters live in the same
file, so ``legion cache stats`` shows the hit rate of all replicas together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from legion.config import LegionConfig
from legion.db import reading, transaction
from legion.messages import TaskRequest, TaskResult

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    used_at REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS results_used_at ON results (used_at);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('hits', 0), ('misses', 0);
"""

_SPACES = re.compile(r"\s+")
# Fields of a TaskRequest that identify or bound one request but do not change its answer.
# Every other field is in the key, so a field added later can cost hits but never give a
# wrong one.
_NOT_IN_KEY = frozenset({"id", "request_id", "timeout_s"})


def normalize_task(task: str) -> str:
    """The task as the cache compares it: Unicode NFKC, case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", task)).strip().casefold()


class CacheStats(BaseModel):
    """What ``legion cache stats`` and the metrics report."""

    path: str
    entries: int
    hits: int
    misses: int
    hit_rate: float  # hits / (hits + misses); 0 before the first lookup
    bytes: int
    ttl_s: float
    max_entries: int


class CacheInfo(BaseModel):
    """``GET /v1/cache``: whether the result cache is on and, when it is, its counters."""

    enabled: bool
    path: str | None = None
    entries: int | None = None
    hits: int | None = None
    misses: int | None = None
    hit_rate: float | None = Field(None, description="hits / (hits + misses); 0 before the first lookup.")
    bytes: int | None = None
    ttl_s: float | None = None
    max_entries: int | None = None

    @classmethod
    def of(cls, stats: CacheStats | None) -> CacheInfo:
        return cls(enabled=False) if stats is None else cls(enabled=True, **stats.model_dump())


def _profile_stamp(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return [path]
    return [path, stat.st_size, stat.st_mtime_ns]


class ResultCache:
    """Task results in one SQLite file; safe to use from many processes and threads at once."""

    def __init__(self, path: str | os.PathLike, *, ttl_s: float, max_entries: int):
        self.path = Path(path).expanduser()
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        # Statement by statement: executescript would COMMIT the surrounding transaction.
        with transaction(self.path) as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    @classmethod
    def from_config(cls, cfg: LegionConfig) -> ResultCache:
        return cls(cfg.data_path / cfg.cache.file, ttl_s=cfg.cache.ttl_s, max_entries=cfg.cache.max_entries)

    @staticmethod
    def key(req: TaskRequest, cfg: LegionConfig, adapted: Mapping[str, float] | None = None) -> str:
        """The cache key of ``req`` as ``cfg``'s agents and Arbiter would answer it (its ids do not
        count). ``adapted``: the factors ``arbiter.adapt`` weighs the profile's members by now
        (they move with the traffic; another set of factors is another answer)."""
        request = req.model_dump(mode="json", exclude=set(_NOT_IN_KEY))
        request["task"] = normalize_task(req.task)
        material = {
            "request": request,
            "agents": [a.model_dump(mode="json") for a in cfg.agents],
            # How the Arbiter decides (trust, debate rounds, adaptive_risk, equivalence, ...): a
            # restart with other settings must not serve the answers of the old ones. The profiles
            # are below, by their content.
            "arbiter": cfg.arbiter.model_dump(mode="json", exclude={"profile", "free_text_profile"}),
            # The profile decides too (learned, equilibrium's start, a tie, a choice's
            # probability): another profile, or the same file refitted, is another answer. Free
            # text is weighed by the free-text profile where there is one.
            "profile": _profile_stamp(
                cfg.arbiter.profile if req.choices is not None else cfg.arbiter.text_profile
            ),
        }
        if adapted is not None:
            material["adapted"] = {m: round(float(f), 9) for m, f in sorted(adapted.items())}
        blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> TaskResult | None:
        """The stored result for ``key`` if it has not expired; counts a hit or a miss."""
        now = time.time()
        with transaction(self.path) as conn:
            row = conn.execute(
                "SELECT result FROM results WHERE key = ? AND created_at > ?", (key, now - self.ttl_s)
            ).fetchone()
            result = None
            if row is not None:
                try:
                    result = TaskResult.model_validate_json(row[0])
                except ValidationError:
                    # Written by a version whose TaskResult had another shape: drop it.
                    log.warning("dropping a cache entry that no longer parses as a TaskResult")
                    conn.execute("DELETE FROM results WHERE key = ?", (key,))
            if result is None:
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'misses'")
            else:
                conn.execute("UPDATE results SET used_at = ?, hits = hits + 1 WHERE key = ?", (now, key))
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'hits'")
        return result

    def put(self, key: str, result: TaskResult) -> None:
        """Store ``result`` under ``key``; drops expired entries and keeps at most ``max_entries``."""
        now = time.time()
        blob = result.model_dump_json()
        with transaction(self.path) as conn:
            conn.execute(
                "INSERT INTO results (key, result, created_at, used_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET result = excluded.result, "
                "created_at = excluded.created_at, used_at = excluded.used_at",
                (key, blob, now, now),
            )
            conn.execute("DELETE FROM results WHERE created_at <= ?", (now - self.ttl_s,))
            (count,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
            if count > self.max_entries:
                conn.execute(
                    "DELETE FROM results WHERE key IN (SELECT key FROM results ORDER BY used_at ASC LIMIT ?)",
                    (count - self.max_entries,),
                )

    def stats(self) -> CacheStats:
        with reading(self.path) as conn:
            (entries,) = conn.execute("SELECT COUNT(*) FROM results").fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            (page_count,) = conn.execute("PRAGMA page_count").fetchone()
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        hits, misses = counters.get("hits", 0), counters.get("misses", 0)
        looked_up = hits + misses
        return CacheStats(
            path=str(self.path),
            entries=entries,
            hits=hits,
            misses=misses,
            hit_rate=round(hits / looked_up, 4) if looked_up else 0.0,
            bytes=page_count * page_size,
            ttl_s=self.ttl_s,
            max_entries=self.max_entries,
        )

    def clear(self) -> int:
        """Remove every entry and reset the counters; returns how many entries were removed."""
        with transaction(self.path) as conn:
            removed = conn.execute("DELETE FROM results").rowcount
            conn.execute("UPDATE counters SET value = 0")
        return removed
