"""API keys, their scopes, and the HTTP layer that enforces Legion's security policy.

Keys exist only as SHA-256 hashes once the config is loaded (in memory, in the Serve
deployment's arguments, in ``legion config``); a client proves a key with
``Authorization: Bearer <key>``. ``SecurityMiddleware`` is a plain ASGI middleware: it
authenticates, checks the route's scope, applies the per-key rate limit and the body-size
limit, and commits the audit record before the response leaves the replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from legion.errors import ConfigError, Forbidden, LegionError, PayloadTooLarge, Unauthorized
from legion.keys import API_KEYS_ENV, SCOPES, hash_key, key_id, normalize_key_entries, parse_key_entry
from legion.service.audit import AuditEntry, AuditLog
from legion.service.ratelimit import RateLimiter

if TYPE_CHECKING:
    from legion.config import LegionConfig

log = logging.getLogger(__name__)

_PUBLIC_PATHS = frozenset({"/healthz", "/favicon.ico"})
_TASK_ROUTES = frozenset(
    {"/v1/tasks", "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings"}
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key's id and scopes (``anonymous`` when no keys are configured)."""

    key_id: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


class KeyStore:
    """The configured keys, by hash; checks a request's ``Authorization`` header and scope."""

    def __init__(self, entries: Iterable[str]):
        self._keys: dict[str, Principal] = {}
        for entry in normalize_key_entries(entries):
            digest, scopes = parse_key_entry(entry)
            self._keys[digest] = Principal(key_id(digest), scopes)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """The key's principal; ``ANONYMOUS`` without configured keys; ``Unauthorized`` otherwise."""
        if not self._keys:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("this server needs an API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
        # A lookup by SHA-256 digest: timing can reveal at most digest prefixes, which say nothing
        # about a key (preimage resistance), so no constant-time loop over the keys is needed.
        principal = self._keys.get(hash_key(token.strip()))
        if principal is None:
            raise Unauthorized("the API key is not valid: check it, or ask the operator for one")
        return principal

    @staticmethod
    def authorize(principal: Principal, scope: str | None, method: str, path: str) -> None:
        if scope is not None and scope not in principal.scopes:
            raise Forbidden(
                f"{principal.key_id} lacks the '{scope}' scope that {method} {path} needs; "
                f"use a key with it (its scopes: {'+'.join(sorted(principal.scopes))})",
                details={"needed_scope": scope},
            )


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs (``None``: public). Routes not listed here need ``admin``."""
    if path in _PUBLIC_PATHS:
        return None
    if method in ("GET", "HEAD") and (path == "/ui" or path.startswith("/ui/")):
        return None  # the web console's static files; the page sends the key with its API calls
    if method in ("GET", "HEAD", "OPTIONS"):
        return "read"
    if method == "POST" and path in _TASK_ROUTES:
        return "tasks"
    return "admin"


# ------------------------------------------------------------------------ bind address
def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys_enabled: bool, insecure: bool) -> None:
    """Refuse a non-loopback bind without API keys unless the operator said ``--insecure``."""
    if keys_enabled or insecure or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host} without API keys: anyone who reaches it could use it. "
        f"Set {API_KEYS_ENV} (or security.api_keys_file), or pass --insecure to serve it open"
    )


# ---------------------------------------------------------------------- request policy
class SecurityPolicy:
    """One replica's checks: keys and scopes, the per-key rate limit, body size, audit log."""

    def __init__(self, cfg: LegionConfig):
        sec = cfg.security
        self.keys = KeyStore(sec.api_keys)
        self.limiter = (
            RateLimiter(sec.rate_limit_per_minute, sec.rate_limit_burst)
            if self.keys.enabled and sec.rate_limit_per_minute > 0
            else None
        )
        self.max_body_bytes = sec.max_body_bytes
        self.max_admin_body_bytes = sec.max_admin_body_bytes
        self.audit = (
            AuditLog(cfg.data_path / sec.audit_file, max_rows=sec.audit_max_rows) if sec.audit else None
        )

    def body_limit(self, method: str, path: str) -> int:
        """Largest body accepted: admin routes (document uploads) have their own, larger limit."""
        return self.max_admin_body_bytes if required_scope(method, path) == "admin" else self.max_body_bytes

    def authenticate(self, method: str, path: str, authorization: str | None) -> Principal:
        """Who sends the request (``ANONYMOUS`` on a public route or without keys)."""
        if required_scope(method, path) is None:
            return ANONYMOUS
        return self.keys.authenticate(authorization)

    def authorize(self, principal: Principal, method: str, path: str) -> None:
        """The route's scope, then the key's rate limit; raises ``Forbidden`` or ``RateLimited``."""
        scope = required_scope(method, path)
        if scope is None:
            return
        self.keys.authorize(principal, scope, method, path)
        if self.limiter is not None:
            self.limiter.check(principal.key_id)


def task_hash(body: bytes) -> str | None:
    """SHA-256 of the request's task (``task``, or the last user message of a chat), if any."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    text = data.get("task")
    if not isinstance(text, str):
        text = None
        messages = data.get("messages")
        if isinstance(messages, list):
            for m in reversed(messages):
                if isinstance(m, dict) and m.get("role") == "user":
                    c = m.get("content")
                    if isinstance(c, list):
                        c = "".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
                    text = c if isinstance(c, str) else None
                    break
    if text is None:
        return None
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


class _BodyTooLarge(Exception):
    pass


class SecurityMiddleware:
    """ASGI middleware applying a ``SecurityPolicy`` to every HTTP request.

    ``policy`` returns the policy of the replica serving the request (``None`` disables the
    checks); ``error_response`` turns a ``LegionError`` into an ASGI response, so the error
    shape stays defined in one place. The audit record's id is the request's ``X-Request-Id``
    (one is made and returned when the request has none); ``X-Legion-Degraded: audit`` says
    the record could not be written yet.
    """

    def __init__(
        self,
        app: ASGIApp,
        policy: Callable[[], SecurityPolicy | None],
        error_response: Callable[[LegionError], ASGIApp],
    ):
        self.app = app
        self._resolve = policy
        self._policy: SecurityPolicy | None = None
        self._resolved = False
        self._error_response = error_response

    def _current(self) -> SecurityPolicy | None:
        if not self._resolved:
            self._policy = self._resolve()
            self._resolved = True
        return self._policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self._current()
        if policy is None:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        method = scope["method"]
        path = _route_path(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # Serve's proxy forwards the client's X-Request-Id or one it made, and returns it.
        given = headers.get("x-request-id")
        request_id = given[:128] if given else uuid.uuid4().hex
        record = {"key_id": None, "task_hash": None}
        started = False

        async def audit(status: int) -> bool:
            # Committed before the response leaves: a client never holds an unaudited answer.
            if policy.audit is None:
                return True
            entry = AuditEntry(
                ts=time.time(),
                request_id=request_id,
                key_id=record["key_id"],
                client=(scope.get("client") or ("", 0))[0] or None,
                method=method,
                route=path,
                status=status,
                task_hash=record["task_hash"],
                latency_ms=round((time.perf_counter() - t0) * 1000, 2),
            )
            return await asyncio.to_thread(policy.audit.record, entry)

        async def send_audited(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                extra = [] if given else [(b"x-request-id", request_id.encode())]
                if not await audit(int(message["status"])):
                    extra.append((b"x-legion-degraded", b"audit"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            principal = policy.authenticate(method, path, headers.get("authorization"))
            record["key_id"] = principal.key_id
            policy.authorize(principal, method, path)
            limit = policy.body_limit(method, path)
            body = await self._read_body(receive, headers, limit)
        except LegionError as exc:
            await self._error_response(exc)(scope, receive, send_audited)
            return
        except _BodyTooLarge:
            exc = PayloadTooLarge(
                f"the request body is over the limit of {limit} bytes: send less",
                details={"max_body_bytes": limit},
            )
            await self._error_response(exc)(scope, receive, send_audited)
            return
        if body is None:  # the client went away before sending its body
            return
        record["task_hash"] = task_hash(body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_audited)
        except Exception:
            if not started:  # the outer error handler answers 500; the audit log says so too
                started = True
                await audit(500)
            raise

    @staticmethod
    async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _route_path(scope: Scope) -> str:
    # The path inside the app, without the route prefix Serve mounts it under.
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :] or "/"
    return path
