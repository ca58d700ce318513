"""API keys, scopes, the bind check, and the security middleware on a real ASGI app (no Ray).

The middleware runs in front of a small FastAPI app through Starlette's TestClient; the routes
behind it are stand-ins (they are not the subject), the checks and the audit file are real.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from legion.config import config_from_dict
from legion.errors import ConfigError, ErrorCode, LegionError
from legion.keys import hash_key, normalize_key_entries
from legion.service.security import (
    KeyStore,
    SecurityMiddleware,
    SecurityPolicy,
    check_bind,
    is_loopback,
    required_scope,
)

ADMIN = "admin-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"
ASKER = "asker-key-0123456789abcdef"


# ------------------------------------------------------------------------------ keys
def test_keys_are_hashed_at_load_and_never_dumped(monkeypatch, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# operators\n{READER}:read\n\n")
    monkeypatch.setenv("LEGION_API_KEYS", f"{ASKER}:tasks+read")
    cfg = config_from_dict({"security": {"api_keys": [ADMIN], "api_keys_file": str(keyfile)}})
    dumped = json.dumps(cfg.model_dump(mode="json"))
    for key in (ADMIN, READER, ASKER):
        assert key not in dumped
    assert sorted(cfg.security.api_keys) == sorted(
        [
            f"sha256:{hash_key(ADMIN)}:read+tasks+admin",
            f"sha256:{hash_key(READER)}:read",
            f"sha256:{hash_key(ASKER)}:read+tasks",
        ]
    )
    assert cfg.security.api_keys_file is None  # read once; its keys now live hashed in api_keys
    # The hashed form survives a round trip (the Serve replica rebuilds the config from the dump).
    again = config_from_dict(cfg.model_dump(mode="json"))
    assert sorted(again.security.api_keys) == sorted(cfg.security.api_keys)


def test_same_key_twice_gets_the_union_of_its_scopes():
    merged = normalize_key_entries([f"{ASKER}:read", f"{ASKER}:tasks"])
    assert merged == [f"sha256:{hash_key(ASKER)}:read+tasks"]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("short", "at least 16 characters"),
        (f"{ADMIN}:root", "unknown scope root"),
        (f"{ADMIN}:+", "unknown scope (empty)"),
        ("sha256:abc", "64 hex digits"),
        ("has a space in the key!", "spaces or commas"),
    ],
)
def test_bad_key_entries_fail_at_start_without_echoing_the_key(entry, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"security": {"api_keys": [entry]}})
    assert fragment in err.value.message
    assert "security" in err.value.message
    if len(entry) >= 16:
        assert entry.split(":")[0] not in err.value.message


def test_missing_keys_file_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        config_from_dict({"security": {"api_keys_file": str(tmp_path / "nope")}})


def test_keystore_authenticates_bearer_keys():
    store = KeyStore(normalize_key_entries([ADMIN, f"{READER}:read"]))
    assert store.enabled and len(store) == 2
    admin = store.authenticate(f"Bearer {ADMIN}")
    assert admin.scopes == {"read", "tasks", "admin"}
    assert admin.key_id == f"key-{hash_key(ADMIN)[:10]}" and ADMIN not in admin.key_id
    assert store.authenticate(f"bearer   {READER} ").scopes == {"read"}
    for header, fragment in [
        (None, "needs an API key"),
        ("", "needs an API key"),
        (f"Basic {ADMIN}", "Bearer <key>"),
        ("Bearer", "Bearer <key>"),
        ("Bearer wrong-key-0123456789", "not valid"),
    ]:
        with pytest.raises(LegionError) as err:
            store.authenticate(header)
        assert err.value.code == ErrorCode.UNAUTHORIZED and fragment in err.value.message


def test_scopes_by_route():
    assert required_scope("GET", "/healthz") is None
    assert required_scope("GET", "/v1/models") == "read"
    assert required_scope("GET", "/openapi.json") == "read"
    assert required_scope("POST", "/v1/tasks") == "tasks"
    assert required_scope("POST", "/v1/chat/completions") == "tasks"
    assert required_scope("POST", "/v1/documents") == "admin"
    assert required_scope("DELETE", "/v1/cache") == "admin"
    assert required_scope("POST", "/v1/some-future-route") == "admin"  # unknown writes need admin


def test_bind_check():
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert is_loopback(host)
        check_bind(host, keys_enabled=False, insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "legion.example.com"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="--insecure"):
            check_bind(host, keys_enabled=False, insecure=False)
        check_bind(host, keys_enabled=True, insecure=False)
        check_bind(host, keys_enabled=False, insecure=True)


# ------------------------------------------------------------------------- middleware
def _error_response(exc: LegionError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)


def _client(tmp_path, **security) -> tuple[TestClient, SecurityPolicy]:
    cfg = config_from_dict({"security": security, "data_dir": str(tmp_path)})
    policy = SecurityPolicy(cfg)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    @app.post("/v1/tasks")
    async def tasks(body: dict) -> dict:
        return {"echo": body}

    @app.post("/v1/documents")
    async def documents(body: dict) -> dict:
        return {"size": len(json.dumps(body))}

    @app.get("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    app.add_middleware(SecurityMiddleware, policy=lambda: policy, error_response=_error_response)
    return TestClient(app, raise_server_exceptions=False), policy


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_middleware_enforces_keys_and_scopes_and_audits_each_request(tmp_path):
    client, policy = _client(tmp_path, api_keys=[ADMIN, f"{READER}:read"])
    assert client.get("/healthz").status_code == 200  # the one public route
    r = client.post("/v1/tasks", json={"task": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post("/v1/tasks", json={"task": "hi"}, headers=_auth(READER))
    assert r.status_code == 403 and "'tasks' scope" in r.json()["error"]["message"]
    assert client.get("/v1/models", headers=_auth(READER)).status_code == 200
    r = client.post("/v1/tasks", json={"task": " What is 2+2? "}, headers=_auth(ADMIN))
    assert r.status_code == 200 and r.json() == {"echo": {"task": " What is 2+2? "}}
    assert client.post("/v1/documents", json={"x": 1}, headers=_auth(READER)).status_code == 403

    rows = policy.audit.tail(100)
    assert [(e.method, e.route, e.status) for e in rows] == [
        ("GET", "/healthz", 200),
        ("POST", "/v1/tasks", 401),
        ("POST", "/v1/tasks", 403),
        ("GET", "/v1/models", 200),
        ("POST", "/v1/tasks", 200),
        ("POST", "/v1/documents", 403),
    ]
    reader_id, admin_id = f"key-{hash_key(READER)[:10]}", f"key-{hash_key(ADMIN)[:10]}"
    assert [e.key_id for e in rows] == ["anonymous", None, reader_id, reader_id, admin_id, reader_id]
    assert rows[4].task_hash == hashlib.sha256(b"What is 2+2?").hexdigest()
    assert rows[4].request_id == r.headers["x-request-id"]
    assert all(e.latency_ms >= 0 for e in rows)
    raw = policy.audit.path.read_bytes() + policy.audit.path.with_name("audit.db-wal").read_bytes()
    assert ADMIN.encode() not in raw and READER.encode() not in raw and b"What is 2+2?" not in raw


def test_chat_task_hash_is_the_last_user_message(tmp_path):
    client, policy = _client(tmp_path)
    body = {"messages": [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]}
    client.post("/v1/tasks", json=body)
    assert policy.audit.tail(1)[0].task_hash == hashlib.sha256(b"second").hexdigest()


def test_rate_limit_per_key(tmp_path):
    client, policy = _client(tmp_path, api_keys=[ADMIN, ASKER], rate_limit_per_minute=1, rate_limit_burst=3)
    codes = [client.get("/v1/models", headers=_auth(ADMIN)).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    limited = client.get("/v1/models", headers=_auth(ADMIN)).json()["error"]
    assert limited["code"] == "rate_limited" and limited["details"]["retry_after_s"] == 60
    assert client.get("/v1/models", headers=_auth(ASKER)).status_code == 200  # its own bucket
    assert client.get("/healthz").status_code == 200  # public, not limited
    assert [e.status for e in policy.audit.tail(100)].count(429) == 3


def test_no_rate_limit_without_keys(tmp_path):
    client, policy = _client(tmp_path, rate_limit_per_minute=1, rate_limit_burst=1)
    assert policy.limiter is None
    assert {client.get("/v1/models").status_code for _ in range(5)} == {200}


def test_body_limits_by_declared_and_by_streamed_size(tmp_path):
    client, policy = _client(tmp_path, max_body_bytes=2048, max_admin_body_bytes=8192)
    big = {"task": "x" * 4000}
    r = client.post("/v1/tasks", json=big)
    assert r.status_code == 413 and r.json()["error"]["details"]["max_body_bytes"] == 2048

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/v1/tasks", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/v1/tasks", json={"task": "x" * 1500}).status_code == 200
    assert client.post("/v1/documents", json=big).status_code == 200  # admin routes: their own limit
    assert client.post("/v1/documents", json={"t": "x" * 9000}).status_code == 413
    assert [e.status for e in policy.audit.tail(10)] == [413, 413, 200, 200, 413]


def test_unwritable_audit_file_answers_anyway_and_says_so(tmp_path):
    (tmp_path / "blocked").write_text("")
    client, policy = _client(tmp_path, audit_file="blocked/audit.db")
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.headers["x-legion-degraded"] == "audit"
    assert policy.audit.pending == 1
    (tmp_path / "blocked").unlink()
    r = client.get("/v1/models")
    assert r.status_code == 200 and "x-legion-degraded" not in r.headers
    assert [e.route for e in policy.audit.tail(10)] == ["/v1/models", "/v1/models"]


def test_a_crashing_route_is_audited_as_500(tmp_path):
    client, policy = _client(tmp_path)
    assert client.get("/v1/boom").status_code == 500
    assert policy.audit.tail(1)[0].status == 500


def test_audit_can_be_turned_off(tmp_path):
    client, policy = _client(tmp_path, audit=False)
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.headers["x-request-id"]
    assert policy.audit is None and not (tmp_path / "audit.db").exists()
