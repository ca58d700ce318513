"""API keys as configured: entries parsed, checked and hashed, read from ``$LEGION_API_KEYS``
and from a keys file. Shared ground: ``legion.config`` hashes the keys while it loads, and
``legion.service.security`` checks requests against them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

SCOPES = ("read", "tasks", "admin")
"""``read``: GET routes; ``tasks``: asking (tasks, chat, completions, embeddings); ``admin``: every
other write (ingest, cache)."""

API_KEYS_ENV = "LEGION_API_KEYS"
MIN_KEY_CHARS = 16
_HASH_PREFIX = "sha256:"
_MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def hash_key(key: str) -> str:
    """The stored form of a key: its SHA-256 in hex (keys are random, so no salt is needed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: str) -> str:
    """A key's name in logs and the audit log: a prefix of its hash, never the key."""
    return f"key-{digest[:10]}"


def _parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split("+") if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(
            f"unknown scope {', '.join(unknown) or '(empty)'} in an API key entry; "
            f"scopes are {', '.join(SCOPES)}, joined with + (key:read+tasks)"
        )
    return scopes


def parse_key_entry(entry: str) -> tuple[str, frozenset[str]]:
    """``(hash, scopes)`` of one entry; the error messages never repeat the key."""
    entry = entry.strip()
    if entry.startswith(_HASH_PREFIX):
        digest, _, scopes = entry[len(_HASH_PREFIX) :].partition(":")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("a hashed API key entry must be sha256:<64 hex digits>[:scopes]")
        return digest, _parse_scopes(scopes) if scopes else frozenset(SCOPES)
    key, sep, scopes = entry.rpartition(":")
    if not sep:
        key, scopes = entry, ""
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"API keys must be at least {MIN_KEY_CHARS} characters; make one with {_MAKE_KEY}")
    if any(c.isspace() for c in key) or "," in key:
        raise ValueError("API keys may not hold spaces or commas")
    return hash_key(key), _parse_scopes(scopes) if scopes else frozenset(SCOPES)


def normalize_key_entries(entries: Iterable[str]) -> list[str]:
    """Entries ``key``, ``key:scope1+scope2`` or ``sha256:<hex>[:scopes]`` → hashed entries.

    A bare key has every scope. The same key listed twice gets the union of its scopes.
    Raises ``ValueError`` (without the key in the message) on a bad entry.
    """
    merged: dict[str, set[str]] = {}
    for entry in entries:
        if not entry.strip():
            continue
        digest, scopes = parse_key_entry(entry)
        merged.setdefault(digest, set()).update(scopes)
    return [f"{_HASH_PREFIX}{d}:{'+'.join(s for s in SCOPES if s in sc)}" for d, sc in merged.items()]


def env_key_entries() -> list[str]:
    """The entries of ``$LEGION_API_KEYS`` (comma-separated)."""
    return [e for e in os.environ.get(API_KEYS_ENV, "").split(",") if e.strip()]


def read_key_file(path: str | os.PathLike) -> list[str]:
    """The entries of a keys file: one per line, blank lines and ``#`` comments skipped."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {p}: {exc.strerror or exc}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
