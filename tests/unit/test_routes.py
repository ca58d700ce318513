"""The HTTP routes of ``serve_app`` through a real FastAPI test client, with the replica's real
pipeline, security middleware and audit log; only the Arbiter and the retriever actors are
stand-ins (no Ray cluster, no model)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import serve_app
from legion.config import config_from_dict
from legion.service.audit import AuditLog
from legion.service.pipeline import TaskPipeline
from legion.service.security import SecurityPolicy
from tests.unit.test_pipeline import FakeArbiter, FakeRetriever

KEY = "route-test-key-0123456789"


class AgentsArbiter(FakeArbiter):
    async def agents(self) -> list[dict]:
        pool = {"replicas": [{"name": "legion-agent-solver", "in_flight": 0}], "min_replicas": 1}
        return [
            {
                "name": "solver",
                "role": "solver",
                "config": {"name": "solver"},
                "pool": {**pool, "max_replicas": 1, "scale_events": []},
                "trust": {"weight": 1.0, "updates": 3, "agreements": 3},
                "health": {"name": "solver", "loaded": True},
                "stats": {"requests": 3},
            }
        ]


def client(tmp_path, arbiter=None, cfg=None, **overrides) -> TestClient:
    """The ingress's routes over ``arbiter`` (default: a scripted one) with ``cfg`` (default: one
    agent, ``solver``, and ``overrides``)."""
    if cfg is None:
        cfg = config_from_dict({"agents": [{"name": "solver"}], "data_dir": str(tmp_path), **overrides})
    ingress = object.__new__(serve_app.LegionIngress)  # its __init__ starts actors; these stand in
    ingress.cfg, ingress.security = cfg, SecurityPolicy(cfg)
    ingress.arbiter, ingress.retriever = arbiter or AgentsArbiter(), FakeRetriever()
    ingress.pipeline = TaskPipeline.from_config(cfg, ingress.arbiter, ingress.retriever)
    return TestClient(serve_app._build_api(ingress))


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def chat_chunks(text: str) -> list:
    return [
        "[DONE]" if line == "data: [DONE]" else json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line
    ]


def test_a_task_answers_with_the_typed_response(tmp_path):
    r = client(tmp_path).post("/v1/tasks", json={"task": "Name a colour."})
    assert r.status_code == 200 and r.headers["x-legion-cache"] == "miss"
    body = r.json()
    assert body["answer"] == ".ruoloc a emaN" and body["cached"] is False
    assert set(body) == {
        "id",
        "answer",
        "strategy",
        "candidates",
        "votes",
        "latency_ms",
        "missing_agents",
        "trace",
        "cached",
        "fanout",
        "agents_asked",
        "skipped_agents",
    }
    assert "error" not in body["candidates"][0]  # left out while the agent answered


def test_the_task_stream_sends_candidates_then_the_result_then_done(tmp_path):
    r = client(tmp_path).post("/v1/tasks", json={"task": "Name a colour.", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert [n for n, _ in events] == ["candidate", "result", "done"]
    assert events[1][1]["answer"] == events[0][1]["text"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("x")], ids=["runtime", "key"])
def test_every_stream_ends_with_an_error_then_its_end_when_the_task_breaks(tmp_path, error):
    c = client(tmp_path, AgentsArbiter(error=error))
    events = sse(c.post("/v1/tasks", json={"task": "Name a colour.", "stream": True}).text)
    assert [n for n, _ in events] == ["error", "done"] and events[0][1]["error"]["code"] == "internal_error"
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "stream": True}
    chunks = chat_chunks(c.post("/v1/chat/completions", json=body).text)
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == "internal_error"


def test_the_chat_stream_offers_candidates_then_the_answer_at_the_end(tmp_path):
    body = {"model": "legion", "messages": [{"role": "user", "content": "Name a colour."}], "stream": True}
    chunks = chat_chunks(client(tmp_path).post("/v1/chat/completions", json=body).text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {} and chunks[1]["legion_candidate"]["agent"] == "solver"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[2:-2])
    assert text == ".ruoloc a emaN"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["legion"]["answer"] == text
    assert chunks[-1] == "[DONE]" and len({c["id"] for c in chunks[:-1]}) == 1


def test_the_api_documents_its_response_schemas(tmp_path):
    schema = client(tmp_path).get("/openapi.json").json()
    ok = {
        p: schema["paths"][p][m]["responses"]["200"]["content"]
        for p, m in (
            ("/v1/tasks", "post"),
            ("/v1/chat/completions", "post"),
            ("/v1/agents", "get"),
            ("/v1/models", "get"),
        )
    }
    assert ok["/v1/tasks"]["application/json"]["schema"]["$ref"].endswith("/TaskResponse")
    assert ok["/v1/chat/completions"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert ok["/v1/chat/completions"]["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")
    assert ok["/v1/agents"]["application/json"]["schema"]["$ref"].endswith("/AgentList")
    assert {"TaskResponse", "CandidateInfo", "AgentInfo", "ChatCompletionChunk"} <= set(
        schema["components"]["schemas"]
    )


def test_agents_and_their_watch_cost_one_audit_row_per_request(tmp_path, monkeypatch):
    monkeypatch.setattr(serve_app, "AGENTS_WATCH_S", 2.0)
    c = client(tmp_path, security={"audit_file": "audit.db"})
    assert c.get("/v1/agents").json()["agents"][0]["trust"]["weight"] == 1.0
    events = sse(c.get("/v1/agents", params={"watch_s": 1}).text)
    assert [n for n, _ in events] == ["agents", "agents", "done"]
    assert events[1][1]["agents"][0]["health"]["loaded"] is True
    rows = [e for e in AuditLog(tmp_path / "audit.db").tail(100) if e.route == "/v1/agents"]
    assert len(rows) == 2  # one for the plain read, one for the whole watch


def test_the_favicon_is_served_and_public(tmp_path):
    c = client(tmp_path, security={"api_keys": [KEY]})
    r = c.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml" and b"<svg" in r.content
    assert c.get("/v1/models").status_code == 401  # the rest still needs the key


def test_a_candidate_says_which_answer_group_it_votes_in():
    """The console labels each card with its group: the key equivalent answers share."""
    from legion.messages import Candidate
    from legion.service.api import candidate_response

    joined = candidate_response(Candidate(agent="a", role="solver", text="The lazy dog.", normalized="dog"))
    assert joined.model_dump()["group"] == "dog"
    failed = candidate_response(Candidate(agent="b", role="critic", error="no answer within 5 s"))
    assert "group" not in failed.model_dump() and failed.model_dump()["error"]
