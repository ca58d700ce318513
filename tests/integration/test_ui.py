"""The web console at /ui in a real headless Chromium, and the SSE stream of /v1/tasks it reads.

The browser is Debian's ``chromium`` driven by Playwright's Python package (no browser
download); without it the browser test skips and says how to install it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import wait_healthy

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO_OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


def _events(client: httpx.Client, body: dict) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """POST /v1/tasks with stream=true; the response and its (event, data) pairs in order."""
    out: list[tuple[str, dict]] = []
    with client.stream("POST", "/v1/tasks", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r, out
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                out.append((name, json.loads(line[len("data:") :])))
    return r, out


def test_task_stream_sends_candidates_then_the_result(client):
    task = f"Name a primary color. ({uuid.uuid4().hex[:8]})"  # a cache miss
    r, events = _events(client, {"task": task, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-legion-cache"] == "miss"
    names = [n for n, _ in events]
    assert names[-2:] == ["result", "done"], names
    assert names.count("result") == 1 and "error" not in names
    result = events[-2][1]
    candidates = [d for n, d in events if n == "candidate"]
    # Every agent's answer streamed before the result, and the same as the result lists them.
    assert names.index("result") > max(i for i, n in enumerate(names) if n == "candidate")
    by_agent = lambda c: c["agent"]  # noqa: E731
    assert sorted(candidates, key=by_agent) == sorted(result["candidates"], key=by_agent)
    # The other trace events streamed in the order the result's trace holds them.
    streamed_steps = [d["step"] for n, d in events if n == "trace"]
    assert streamed_steps == [e["step"] for e in result["trace"] if e["step"] != "candidate"]
    assert "decision" in streamed_steps

    # The result is what /v1/tasks answers (here from the cache the stream filled).
    plain = client.post("/v1/tasks", json={"task": task, "max_tokens": 4})
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-legion-cache"] == "hit"
    body = plain.json()
    assert set(body) == set(result)
    assert (body["answer"], body["votes"], body["candidates"]) == (
        result["answer"],
        result["votes"],
        result["candidates"],
    )

    # A cache hit streams at once: the result, then done.
    r2, hit = _events(client, {"task": task, "max_tokens": 4})
    assert r2.headers["x-legion-cache"] == "hit"
    assert [n for n, _ in hit] == ["result", "done"]
    assert hit[0][1]["cached"] is True and hit[0][1]["answer"] == result["answer"]


def test_task_stream_refuses_bad_input_before_streaming(client):
    r, events = _events(client, {"task": "hello", "strategy": "no-such-strategy"})
    assert r.status_code == 422, r.text
    assert "no-such-strategy" in r.json()["error"]["message"] and events == []


def test_ui_static_files_are_served(client):
    r = client.get("/ui", follow_redirects=True)
    assert r.status_code == 200 and "<title>Legion console</title>" in r.text
    assert client.get("/ui/app.js").headers["content-type"].split(";")[0] in (
        "text/javascript",
        "application/javascript",
    )
    assert client.get("/ui/no-such-file.js").status_code == 404


def test_console_in_a_real_browser(legion_url, legion_config, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    agents = [a.name for a in legion_config.agents]
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{legion_url}/ui")
            # The strategies come from /v1/models, the agents' state from /v1/agents.
            page.wait_for_function("document.querySelectorAll('#strategy option').length > 1")
            page.wait_for_selector("#agents tbody tr td.state.loaded")
            assert page.locator("#agents tbody tr").count() == len(agents)

            page.fill("#task-input", "What is the capital of France?")
            page.fill("#max-tokens", "6")
            page.uncheck("#use-cache")  # the agents answer now, so the candidates stream in
            page.click("#run")
            page.wait_for_selector("#answer-box:not([hidden])", timeout=300_000)

            assert page.locator("#status.error").count() == 0, page.text_content("#status")
            answer = page.text_content("#answer").strip()
            assert answer
            cards = page.locator("#candidates .candidate")
            assert sorted(cards.nth(i).get_attribute("data-agent") for i in range(cards.count())) == sorted(
                agents
            )
            # Each answering card names the answer group it votes in (its normalized key).
            labels = page.locator("#candidates .candidate .group")
            assert labels.count() >= 1, page.inner_html("#candidates")[:2000]
            voted = page.eval_on_selector_all(
                "#votes-chart svg rect.bar", "bs => bs.map(b => b.dataset.label)"
            )
            assert labels.first.get_attribute("data-group") in voted
            bars = page.locator("#votes-chart svg rect.bar")
            assert bars.count() >= 1
            assert page.locator("#votes-chart svg rect.bar.winner").count() == 1
            assert page.locator("#trace li").count() > len(agents)
            assert page.locator("#recent li").count() == 1
            assert answer in page.text_content("#recent")
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    REPO_OUTPUT.mkdir(exist_ok=True)
    shutil.copy(shot, REPO_OUTPUT / "ui.png")


KEY = "ui-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_url(legion_url, legion_config):
    """A second app with API keys and a tiny task timeout under /keyed; the same app name, so the
    same Arbiter and agents."""
    from ray import serve

    from legion.config import config_from_dict
    from serve_app import build_app

    data = legion_config.model_dump(mode="json")
    data["serve"]["ingress_num_cpus"] = 0  # the session's agents hold the cores
    data["security"] = {"api_keys": [KEY], "audit_file": "ui-audit.db"}
    data["serve"]["request_timeout_s"] = 0.05  # every task here runs out of time: an error event
    serve.run(build_app(config_from_dict(data)), name="legionui", route_prefix="/keyed")
    url = f"{legion_url}/keyed"
    wait_healthy(url, 120)
    yield url
    serve.delete("legionui")


def test_console_asks_for_a_key_and_keeps_it_in_the_tab(keyed_url):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    assert httpx.get(f"{keyed_url}/ui/app.js", timeout=30).status_code == 200  # public
    assert httpx.get(f"{keyed_url}/v1/agents", timeout=30).status_code == 401
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{keyed_url}/ui/")
            page.wait_for_selector("#key-form:not([hidden])")
            assert page.locator("#agents tbody tr").count() == 0
            page.fill("#key-input", KEY)
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("#agents tbody tr td.state.loaded")
            page.wait_for_function("document.querySelectorAll('#strategy option').length > 1")
            assert page.evaluate("sessionStorage.getItem('legion.apiKey')") == KEY
            assert page.evaluate("JSON.stringify(localStorage)") == "{}"
            assert page.context.cookies() == []
        finally:
            browser.close()


def test_task_stream_reports_a_failure_as_an_error_event(keyed_url):
    with httpx.Client(base_url=keyed_url, timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as c:
        r, events = _events(c, {"task": f"Name a fruit ({uuid.uuid4().hex[:8]}).", "cache": False})
    assert r.status_code == 200  # the stream had started when the task ran out of time
    names = [n for n, _ in events]
    assert names[-2:] == ["error", "done"] and "result" not in names, names
    error = events[-2][1]["error"]
    assert error["code"] == "timeout" and "timeout" in error["message"]
