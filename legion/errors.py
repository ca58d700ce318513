"""Legion's one error vocabulary: every error a user can cause, with what to change.

The core raises these; only the HTTP ingress maps them to status codes (``http_status``).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable error codes, returned as ``error.code`` over HTTP."""

    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_STRATEGY = "unknown_strategy"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    NO_CANDIDATES = "no_candidates"
    TIMEOUT = "timeout"
    CONFIG = "invalid_config"
    MODEL_LOAD = "model_load_failed"
    INTERNAL = "internal_error"


_HTTP_STATUS = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNKNOWN_STRATEGY: 422,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.NOT_READY: 503,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.NO_CANDIDATES: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CONFIG: 500,
    ErrorCode.MODEL_LOAD: 500,
    ErrorCode.INTERNAL: 500,
}


class LegionError(Exception):
    """Base of every error Legion raises on purpose.

    ``message`` says what went wrong and what to change; ``details`` carries data a client
    can act on (for instance the allowed values).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, details: dict | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self.code]

    def to_dict(self) -> dict:
        out = {"code": self.code.value, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    # Ray pickles exceptions raised inside actors; keep the keyword-only fields on the way.
    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.code, self.details))


def _rebuild(cls, message, code, details):
    return cls(message, code=code, details=details)


class ConfigError(LegionError):
    code = ErrorCode.CONFIG


class InvalidRequest(LegionError):
    code = ErrorCode.INVALID_REQUEST


class UnknownStrategy(LegionError):
    code = ErrorCode.UNKNOWN_STRATEGY


class NotReady(LegionError):
    code = ErrorCode.NOT_READY


class NoCandidates(LegionError):
    code = ErrorCode.NO_CANDIDATES


class ModelLoadError(LegionError):
    code = ErrorCode.MODEL_LOAD


class Unauthorized(LegionError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(LegionError):
    code = ErrorCode.FORBIDDEN


class RateLimited(LegionError):
    """``details["retry_after_s"]`` says when to retry; the ingress sends it as ``Retry-After``."""

    code = ErrorCode.RATE_LIMITED


class LlamaUnusable(ModelLoadError):
    """The installed llama.cpp cannot run a model on this CPU (the start-up check failed);
    the message names the cause and the rebuild command."""
