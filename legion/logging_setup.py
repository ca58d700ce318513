"""Legion's log lines: plain text, or one JSON object per line when ``LEGION_LOG_FORMAT=json``.

Every line written while a request is handled carries its request id (and the route, the
agent and the latency where known), in every process the request passes through: the
ingress sets the fields with ``log_context``, the request id rides in the typed messages to
the Arbiter and the agents, which set it again. JSON lines need no parsing rules in Cloud
Logging (``severity``, ``message``, ``time``) or ELK.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LOG_FORMAT_ENV = "LEGION_LOG_FORMAT"
LOG_LEVEL_ENV = "LEGION_LOG_LEVEL"
REQUEST_ID_HEADER = "X-Request-Id"
LogFormat = Literal["text", "json"]

# Fields a log line may carry besides level, time, logger and message, in output order.
CONTEXT_FIELDS = ("request_id", "route", "agent", "status", "latency_ms")
# A client-supplied request id: what trace ids and UUIDs use, nothing that could forge a log line.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:=/+-]{1,128}$")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "legion_log_context", default=None
)


def valid_request_id(value: str) -> bool:
    """True if ``value`` may be used as a request id (1-128 of ``A-Za-z0-9._:=/+-``)."""
    return bool(_REQUEST_ID.match(value))


def current_fields() -> dict[str, Any]:
    """The log fields of the request being handled in this context (empty outside one)."""
    return dict(_context.get() or {})


def current_request_id() -> str | None:
    return (_context.get() or {}).get("request_id")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Add ``fields`` (``None`` values are skipped) to every line logged inside the block."""
    merged = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    """Copies the request's fields onto each record (an explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level/severity, logger, message, context fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "severity": record.levelname,  # the key Cloud Logging reads the level from
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None and value != "-":
                out[key] = value
        out["pid"] = record.process
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def log_format(value: str | None = None) -> LogFormat:
    """``value``, else ``$LEGION_LOG_FORMAT``, else ``text``; raises ``ValueError`` on anything else."""
    raw = (value if value is not None else os.environ.get(LOG_FORMAT_ENV, "text")).strip().lower()
    if raw not in ("text", "json"):
        raise ValueError(f"{LOG_FORMAT_ENV} must be 'text' or 'json', got {raw!r}")
    return raw  # type: ignore[return-value]


def configure_logging(
    level: str | None = None, fmt: str | None = None, stream: TextIO | None = None
) -> LogFormat:
    """Install Legion's handler on the root logger (idempotent; replaces an earlier one).

    Called by the CLI and by every Legion actor at start-up, so the format holds in each Ray
    worker process. Returns the format in use.
    """
    chosen = log_format(fmt)
    level_name = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_legion", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._legion = True  # type: ignore[attr-defined]
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(_TEXT_FORMAT))
    root.addHandler(handler)
    # Ray worker processes start with no root handler at WARNING: without this, the INFO lines
    # of actors (one per request) would never be written.
    root.setLevel(level_name)
    return chosen
