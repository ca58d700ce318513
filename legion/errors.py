"""Legion's one error vocabulary: every error a user can cause, with what to change.

The core raises these; only the HTTP ingress maps them to status codes (``http_status``).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable error codes, returned as ``error.code`` over HTTP."""

    INVALID_REQUEST = "invalid_request"
    INVALID_SCHEMA = "invalid_schema"
    UNSUPPORTED_FIELD = "unsupported_field"
    INVALID_TOOLS = "invalid_tools"
    INVALID_CHOICES = "invalid_choices"
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
    CANCELLED = "cancelled"
    CONFIG = "invalid_config"
    MODEL_LOAD = "model_load_failed"
    INTERNAL = "internal_error"


_HTTP_STATUS = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.INVALID_SCHEMA: 400,
    ErrorCode.UNSUPPORTED_FIELD: 400,
    ErrorCode.INVALID_TOOLS: 400,
    ErrorCode.INVALID_CHOICES: 400,
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
    ErrorCode.CANCELLED: 499,  # the caller went away or gave up (nginx's "client closed request")
    ErrorCode.CONFIG: 500,
    ErrorCode.MODEL_LOAD: 500,
    ErrorCode.INTERNAL: 500,
}


class LegionError(Exception):
    """Base of every error Legion raises on purpose.

    ``message`` says what went wrong and what to change; ``details`` carries data a client
    can act on (for instance the allowed values). The subclass says which ``ErrorCode`` it is:
    raise the subclass, never a bare code.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
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
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls, message, details):
    # Past the subclass's own __init__, whose arguments may differ from the base's.
    exc = cls.__new__(cls)
    LegionError.__init__(exc, message, details=details)
    return exc


class ConfigError(LegionError):
    code = ErrorCode.CONFIG


class InvalidRequest(LegionError):
    code = ErrorCode.INVALID_REQUEST


class InvalidSchema(LegionError):
    """A JSON schema or ``response_format`` Legion cannot constrain answers to; the message says
    what is wrong with it (a 400, as OpenAI answers a bad ``response_format``)."""

    code = ErrorCode.INVALID_SCHEMA


class UnsupportedField(LegionError):
    """A request field Legion does not honour (yet, or for an arbitrated answer at all), sent
    with a value that would change the answer: a 400 naming the field, never a silent drop."""

    code = ErrorCode.UNSUPPORTED_FIELD


class InvalidTools(LegionError):
    """A chat request's ``tools`` or ``tool_choice`` that cannot be called as given; the message
    names the tool and the fault (a 400, as OpenAI answers bad tools)."""

    code = ErrorCode.INVALID_TOOLS


class InvalidChoices(LegionError):
    """A task's ``choices`` (or ``min_confidence``) that cannot be decided as given: too few, too
    many, empty, too long, the same twice, or with a strategy or field that cannot go with them;
    a 400 naming the field and what to change."""

    code = ErrorCode.INVALID_CHOICES


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


class PayloadTooLarge(LegionError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class ModelNotFound(LegionError):
    code = ErrorCode.MODEL_NOT_FOUND


class NotFound(LegionError):
    code = ErrorCode.NOT_FOUND


class Overloaded(LegionError):
    """Every agent (or this agent's engine) is full; ``details["retry_after_s"]`` says when to retry."""

    code = ErrorCode.OVERLOADED


class StoreUnavailable(NotReady):
    """Qdrant (or the retriever actor in front of it) cannot answer; the message says which and what to do."""


class CollectionMissing(NotFound):
    pass


class AgentUnavailable(NotReady):
    """An agent's actor is gone or restarting; it rejoins by itself."""


class AgentGone(AgentUnavailable):
    """An agent's actor is gone for good (its restarts are used up, or it was removed)."""


class TaskTimeout(LegionError):
    """The task ran past its ``timeout_s``; ``trace`` holds what the Arbiter did until then."""

    code = ErrorCode.TIMEOUT

    def __init__(self, message: str, *, trace: list[dict] | None = None, details: dict | None = None):
        super().__init__(message, details={**(details or {}), "trace": list(trace or [])})

    @property
    def trace(self) -> list[dict]:
        return self.details.get("trace", [])


class Cancelled(LegionError):
    """The caller cancelled the request (its task's deadline passed, or its client went away);
    the engine stopped its work."""

    code = ErrorCode.CANCELLED


class InternalError(LegionError):
    """A failure inside Legion that the caller cannot fix; retrying may help."""
