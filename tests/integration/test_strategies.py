"""Every strategy through ``POST /v1/tasks`` on the real model, trust weights in /v1/agents
(also after the Arbiter restarts), the OpenAI ``legion:<strategy>`` models, and ``legion eval``
on a tiny file with the real model."""

from __future__ import annotations

import json
import time

import openai
import pytest
import ray

from legion_cli.cli import main
from tests.integration.conftest import TEST_APP

TASK = {"task": "Name one fruit that is red.", "max_tokens": 6, "cache": False}


def _steps(body: dict) -> list[str]:
    return [e["step"] for e in body["trace"]]


def _decision(body: dict) -> dict:
    return next(e for e in body["trace"] if e["step"] == "decision")["data"]


@pytest.mark.parametrize("strategy", ["borda", "approval", "trust", "equilibrium"])
def test_single_round_strategies(client, legion_config, strategy):
    r = client.post("/v1/tasks", json={**TASK, "strategy": strategy})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["strategy"] == strategy
    assert {c["agent"] for c in body["candidates"]} == {a.name for a in legion_config.agents}
    steps = _steps(body)
    assert steps[-1] == "decision" and "fanout" in steps
    decision = _decision(body)
    assert decision["strategy"] == strategy
    assert decision["winner"] == decision["ranking"][0]
    answers = {c["text"].lower().strip(" .") for c in body["candidates"] if "error" not in c and c["text"]}
    if len(answers) > 1 and strategy != "trust":
        # Agents disagreed: every agent scored every answer, and the trace holds the matrix.
        scores = next(e for e in body["trace"] if e["step"] == "scores")["data"]
        assert set(scores["loglik"]) == {a.name for a in legion_config.agents}
        assert all(len(v) == len(scores["options"]) for v in scores["loglik"].values())
        assert set(decision["ranking"]) == set(scores["options"])
    if strategy == "trust":
        assert steps[0] == "trust"
    if strategy == "equilibrium" and "iterations" in decision:
        assert decision["iterations"] == legion_config.arbiter.equilibrium_iterations
        assert decision["solver_ms"] < body["latency_ms"]


def test_debate_traces_every_round(client):
    r = client.post("/v1/tasks", json={**TASK, "strategy": "debate"})
    assert r.status_code == 200, r.text
    body = r.json()
    d = _decision(body)
    rounds = [e for e in body["trace"] if e["step"] == "debate_round"]
    assert len(rounds) == d["rounds"] <= d["max_rounds"]
    if d["rounds"]:
        assert "debate_round_1" in _steps(body)
        assert rounds[-1]["data"]["agreed"] == d["agreed"]
    else:
        assert d["agreed"]


def test_decomposition_plans_and_integrates(client):
    r = client.post(
        "/v1/tasks",
        json={
            "task": "What is the capital of France, and what is the capital of Spain?",
            "strategy": "decompose",
            "max_tokens": 24,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    steps = _steps(body)
    assert steps[0] == "plan" and steps[-1] == "decision"
    # Two "plan" events: the planner call itself, then the plan it produced (with subtasks).
    plan = next(e for e in body["trace"] if e["step"] == "plan" and "subtasks" in e["data"])["data"]
    if _decision(body)["decomposed"]:
        assert len(plan["subtasks"]) >= 2
        assert {"subtasks", "integrate"} <= set(steps)
        assigned = next(e for e in body["trace"] if e["step"] == "subtasks")["data"]["assigned"]
        assert [a["subtask"] for a in assigned] == plan["subtasks"]
    else:
        assert "not_compound" in steps and "fanout" in steps
    assert body["answer"].strip()


def test_conflict_says_whether_it_resolved(client):
    r = client.post("/v1/tasks", json={**TASK, "strategy": "conflict"})
    assert r.status_code == 200, r.text
    body = r.json()
    check = next(e for e in body["trace"] if e["step"] == "conflict_check")["data"]
    d = _decision(body)
    assert d["split"] == check["split"]
    assert (d["resolved_by"] is not None) == check["split"]
    assert ("conflict_resolution" in _steps(body)) == check["split"]


def test_openai_model_selects_the_strategy(legion_url):
    oa = openai.OpenAI(base_url=f"{legion_url}/v1", api_key="unused")
    ids = {m.id for m in oa.models.list().data}
    assert {"legion:borda", "legion:equilibrium", "legion:debate", "legion:conflict"} <= ids
    resp = oa.chat.completions.create(
        model="legion:borda", messages=[{"role": "user", "content": "Name a color."}], max_tokens=6
    )
    assert resp.model_extra["legion"]["strategy"] == "borda"


def test_trust_weights_are_visible_and_survive_an_arbiter_restart(client, legion_config):
    client.post("/v1/tasks", json={**TASK, "strategy": "trust"}).raise_for_status()
    before = {a["name"]: a["trust"] for a in client.get("/v1/agents").json()["agents"]}
    assert all(t["updates"] >= 1 for t in before.values())
    assert all(0 < t["weight"] for t in before.values())
    arbiter = ray.get_actor(f"{TEST_APP}-arbiter", namespace=legion_config.ray_namespace)
    ray.kill(arbiter, no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            r = client.get("/v1/agents")
            if r.status_code == 200:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "the Arbiter never came back"
        time.sleep(0.5)
    after = {a["name"]: a["trust"] for a in r.json()["agents"]}
    assert after == before


def test_eval_cli_on_the_real_model(tmp_path, capsys):
    rows = [
        {
            "id": "a",
            "context": "Question: What color is the sky on a clear day?\nAnswer:",
            "choices": ["blue", "green", "red"],
            "answer": 0,
        },
        {
            "id": "b",
            "context": "Question: How many legs does a dog have?\nAnswer:",
            "choices": ["three", "four"],
            "answer": 1,
        },
    ]
    data = tmp_path / "tiny_dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "legion.yaml"
    cfg.write_text('agents:\n  - name: plain\n  - name: told\n    role_prompt: "Answer correctly.\\n\\n"\n')
    out = tmp_path / "res.json"
    rc = main(
        [
            "eval",
            "--data",
            str(data),
            "--config",
            str(cfg),
            "--strategies",
            "plurality,equilibrium",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"single:plain", "single:told", "plurality", "equilibrium"}
    assert all(v["n"] == 2 and 0.0 <= v["accuracy"] <= 1.0 and v["seconds"] > 0 for v in res.values())
    saved = json.loads(out.read_text())
    assert saved["results"]["plurality"]["accuracy"] == res["plurality"]["accuracy"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(rows[0]) + "\n" + json.dumps({"context": "x", "choices": ["a", "b"], "answer": 5}) + "\n"
    )
    assert main(["eval", "--data", str(bad), "--config", str(cfg)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
