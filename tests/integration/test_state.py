"""External state through the HTTP API: the result cache, chat history, retrieval (RAG).

Real SQLite files and real Qdrant local mode under the session app's data_dir, owned by the
app's one retriever actor.
"""

from __future__ import annotations

import uuid

import pytest

from legion_cli.cli import main

_DOC = """# Brenmoor Island

The lighthouse keeper of Brenmoor Island is Pepperwick Sallis. Pepperwick Sallis has kept the
Brenmoor light since 1994 and rows to the mainland every second Tuesday.

The only tree on Brenmoor Island is a crooked rowan called the Grey Widow.
"""


def _agent_requests(client) -> dict[str, int]:
    return {a["name"]: a["stats"]["requests"] for a in client.get("/v1/agents").json()["agents"]}


def test_second_identical_task_is_a_cache_hit_that_touches_no_agent(client):
    task = f"Name a fruit that is yellow. ({uuid.uuid4().hex[:6]})"
    first = client.post("/v1/tasks", json={"task": task, "max_tokens": 8})
    assert first.status_code == 200, first.text
    assert first.headers["x-legion-cache"] == "miss" and first.json()["cached"] is False
    before = _agent_requests(client)

    again = client.post("/v1/tasks", json={"task": "  " + task.upper(), "max_tokens": 8})
    assert again.status_code == 200, again.text
    assert again.headers["x-legion-cache"] == "hit"
    hit, miss = again.json(), first.json()
    assert hit["cached"] is True and hit["id"] != miss["id"]
    assert (hit["answer"], hit["candidates"], hit["votes"], hit["trace"]) == (
        miss["answer"],
        miss["candidates"],
        miss["votes"],
        miss["trace"],
    )
    assert _agent_requests(client) == before

    bypass = client.post("/v1/tasks", json={"task": task, "max_tokens": 8, "cache": False})
    assert bypass.headers["x-legion-cache"] == "bypass" and bypass.json()["cached"] is False
    assert all(n > before[a] for a, n in _agent_requests(client).items())

    stats = client.get("/v1/cache").json()
    assert stats["enabled"] and stats["hits"] >= 1 and stats["entries"] >= 1


def test_history_is_kept_by_session_and_given_to_the_agents(client):
    sid = f"sess-{uuid.uuid4().hex[:8]}"
    question = "What colour is my bicycle?"

    def chat(content: str, **kw) -> dict:
        r = client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 8,
                "cache": False,
                **kw.pop("body", {}),
            },
            **kw,
        )
        assert r.status_code == 200, r.text
        return r.json()

    alone = chat(question)
    chat("My bicycle is teal with a wicker basket.", body={"user": sid})
    second = chat(question, headers={"X-Session-Id": sid})

    context = second["legion"]["trace"][0]
    assert context["step"] == "context" and context["data"]["history_turns"] == 2
    # The same question costs more prompt tokens with the first turns in front of it.
    assert second["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]

    turns = client.get(f"/v1/sessions/{sid}").json()["turns"]
    assert [(t["seq"], t["role"]) for t in turns] == [
        (1, "user"),
        (2, "assistant"),
        (3, "user"),
        (4, "assistant"),
    ]
    assert turns[0]["content"] == "My bicycle is teal with a wicker basket."
    assert turns[2]["content"] == question
    assert turns[3]["content"] == second["choices"][0]["message"]["content"]
    assert turns[3]["task_id"] == second["id"]

    missing = client.get(f"/v1/sessions/nobody-{uuid.uuid4().hex[:6]}")
    assert missing.status_code == 404 and "session" in missing.json()["error"]["message"]
    bad = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": "x" * 200}
    )
    assert bad.status_code == 422 and "limit is 128" in bad.json()["error"]["message"]


@pytest.fixture(scope="module")
def ingested(legion_url, tmp_path_factory) -> str:
    """The Brenmoor document, uploaded with ``legion ingest --url`` (POST /v1/documents)."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "brenmoor.md").write_text(_DOC, encoding="utf-8")
    assert main(["ingest", str(folder), "--url", legion_url, "--collection", "testdocs"]) == 0
    return str((folder / "brenmoor.md").resolve())


def test_question_answerable_only_from_an_ingested_document(client, ingested):
    body = {
        "task": "Who is the lighthouse keeper of Brenmoor Island?",
        "max_tokens": 12,
        "use_rag": True,
        "collection": "testdocs",
        "cache": False,
    }
    r = client.post("/v1/tasks", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["retrieval"]["used"], out["retrieval"]["collection"]) == (True, "testdocs")
    assert out["retrieval"]["reason"] is None
    assert out["sources"] and out["sources"][0]["file"] == ingested
    assert all(s["score"] >= 0.3 for s in out["sources"])
    assert "pepperwick" in out["answer"].lower()
    assert out["trace"][0]["data"]["retrieved_chunks"] == len(out["sources"])


def test_missing_collection_still_answers_and_says_so(client, ingested):
    r = client.post(
        "/v1/tasks",
        json={"task": "Who keeps the lighthouse?", "max_tokens": 8, "use_rag": True, "collection": "nosuch"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["answer"].strip()
    assert out["retrieval"]["used"] is False and "'nosuch' does not exist" in out["retrieval"]["reason"]
    assert out["sources"] == []


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"documents": []}, 422, "documents"),
        ({"documents": [{"source": "a.md", "text": "   "}]}, 422, "empty"),
        ({"documents": [{"source": "a.md", "text": "x", "format": "pdf"}]}, 422, "format"),
        ({"documents": [{"source": "a.md", "text": "x"}], "collection": "Bad Name"}, 422, "collection"),
    ],
)
def test_bad_documents_are_a_clear_4xx(client, body, status, fragment):
    r = client.post("/v1/documents", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
