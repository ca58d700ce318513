"""The web console at /ui in a real headless Chromium, and the SSE stream of /v1/tasks it reads.

The browser is Debian's ``chromium`` driven by Playwright's Python package (no browser
download); without it the browser test skips and says how to install it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
VIEWS_APP = "legionviews"


def _playwright():
    """Playwright's sync API, or a skip that says what to install."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does)")
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")


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
    bare = lambda cs: sorted(({k: v for k, v in c.items() if k != "group"} for c in cs), key=by_agent)  # noqa: E731
    assert bare(candidates) == bare(result["candidates"])
    # A streamed answer's group is its own key on arrival; joining equivalent answers afterwards may
    # merge it into another ("Red (red)" into "red"), and the result lists the final groups.
    final = {c["agent"]: c["group"] for c in result["candidates"]}
    assert all(c["group"] == final[c["agent"]] or final[c["agent"]] in result["votes"] for c in candidates)
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
    sync_api = _playwright()
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
    sync_api = _playwright()
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


@pytest.fixture(scope="module")
def views_app(legion_url, tmp_path_factory):
    """A third app whose one agent speaks as three views, with the profile ``legion calibrate``
    fits for them on a few items of the shipped ARC-Easy train split: (url, config)."""
    from ray import serve

    import legion
    from actors import stop_actors
    from legion.config import config_from_dict
    from serve_app import build_app

    tmp = tmp_path_factory.mktemp("views")
    agent = {
        "name": "panel",
        "num_cpus": 0.6,
        "views": [
            {"name": "qa", "prompt_form": "qa", "scoring": "sum"},
            {"name": "cloze-byte", "prompt_form": "cloze", "scoring": "per_byte"},
            {"name": "qa2", "prompt_form": "qa", "scoring": "per_token", "few_shot": 2, "few_shot_seed": 1},
        ],
    }
    fitted = tmp / "views.yaml"
    fitted.write_text(json.dumps({"agents": [agent]}))  # YAML reads JSON
    profile = tmp / "profile.json"
    train = Path(legion.__file__).parent / "data" / "arc_easy_train.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "legion_cli", "calibrate", "--data", str(train), "--limit", "12",
         "--config", str(fitted), "--out", str(profile), "--folds", "3", "--threads", "2"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cfg = config_from_dict(
        {
            "agents": [agent],
            "arbiter": {"agent_timeout_s": 300, "profile": str(profile)},
            "serve": {"app_name": VIEWS_APP, "max_replicas": 1, "ingress_num_cpus": 0},
            "data_dir": str(tmp / "data"),
        }
    )
    serve.run(build_app(cfg), name=VIEWS_APP, route_prefix=f"/{VIEWS_APP}")
    url = f"{legion_url}/{VIEWS_APP}"
    wait_healthy(url, 300)
    yield url, cfg
    serve.delete(VIEWS_APP)
    stop_actors(cfg)


def _recent(page) -> list[dict]:
    """The tasks the console remembers in this tab, newest first: each with the API's result."""
    return json.loads(page.evaluate("sessionStorage.getItem('legion.recent')") or "[]")


def test_console_shows_views_and_decides_over_choices(views_app, tmp_path):
    """The agents panel lists each agent's views; a task with choices shows every choice's
    probability, the decided one and who picked it, and an abstention says why."""
    sync_api = _playwright()
    url, cfg = views_app
    members = [m.name for m in cfg.panel]
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{url}/ui/")
            page.wait_for_selector("#agents tr.agent td.state.loaded")
            page.wait_for_function("document.querySelectorAll('#strategy option').length > 1")

            # (1) Each agent's views under it, as /v1/agents describes them.
            (agent,) = httpx.get(f"{url}/v1/agents", timeout=60).json()["agents"]
            assert [v["name"] for v in agent["views"]] == members
            rows = page.locator("#agents tr.views[data-agent='panel'] tr.view")
            assert [rows.nth(i).get_attribute("data-member") for i in range(rows.count())] == members
            for v in agent["views"]:
                row = page.locator(f"#agents tr.view[data-member='{v['name']}']")
                assert row.locator("td.name").inner_text() == v["name"]
                assert row.locator("td.form").inner_text() == f"{v['prompt_form']} · {v['scoring']}"
                assert row.locator("td.few-shot").inner_text() == str(v["few_shot"])
                assert v["profile_weight"] is not None  # the fixture's profile weighs every member
                cell = row.locator("td.profile-weight")
                assert float(cell.get_attribute("data-weight")) == v["profile_weight"]
                assert float(cell.inner_text()) == pytest.approx(v["profile_weight"], abs=5e-4)

            # (2) A task with choices: one line per choice; markup in a choice stays text.
            choices = ["blue", "<i>seven</i>", "a hammer"]
            page.fill("#task-input", "Question: Which of these is a color?\nAnswer:")
            page.fill("#choices-input", "\n".join(choices) + "\n\n")  # a blank line is no choice
            page.uncheck("#use-cache")
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('#recent li').length === 1", timeout=300_000)
            assert page.locator("#status.error").count() == 0, page.text_content("#status")
            result = _recent(page)[0]["result"]
            choice = result["choice"]
            assert choice["choices"] == choices and choice["index"] is not None
            assert choice["probability_source"] == "profile"
            assert page.text_content("#answer") == choices[choice["index"]] == result["answer"]
            items = page.locator("#choice-list li.choice")
            assert items.count() == len(choices)
            assert page.locator("#choice-list i").count() == 0  # shown as text, not parsed
            for i, text in enumerate(choices):
                li = items.nth(i)
                assert text in li.locator(".text").inner_text()
                assert float(li.get_attribute("data-probability")) == choice["probabilities"][i]
                width = li.locator(".prob .fill").evaluate("e => e.getBoundingClientRect().width")
                track = li.locator(".prob").evaluate("e => e.getBoundingClientRect().width")
                assert width == pytest.approx(choice["probabilities"][i] * track, abs=1.5)
                pickers = li.locator(".picker")
                shown = [pickers.nth(j).get_attribute("data-member") for j in range(pickers.count())]
                assert shown == [m for m, k in choice["picks"].items() if k == i]
                assert ("decided" in li.get_attribute("class")) == (i == choice["index"])
            assert sorted(choice["picks"]) == sorted(members)
            assert page.locator("#choice-abstained").is_hidden()
            # The candidates are the members, slash and all, each naming the choice it picked.
            cards = page.locator("#candidates .candidate")
            assert sorted(cards.nth(i).get_attribute("data-agent") for i in range(cards.count())) == sorted(
                members
            )
            for m, k in choice["picks"].items():
                card = page.locator(f"#candidates .candidate[data-agent='{m}']")
                assert card.locator("header strong").inner_text() == m
                assert card.locator(".group").inner_text() == f"picks {chr(ord('A') + k)}. {choices[k]}"
            page.screenshot(path=str(tmp_path / "ui-choices.png"), full_page=True)

            # Below min_confidence the answer is none, and the console says why.
            page.fill("#min-confidence", "1")
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('#recent li').length === 2", timeout=300_000)
            assert page.locator("#status.error").count() == 0, page.text_content("#status")
            abstained = _recent(page)[0]["result"]
            assert abstained["answer"] is None and abstained["choice"]["index"] is None
            reason = abstained["choice"]["abstained"]
            assert reason and page.text_content("#choice-abstained") == f"Abstained: {reason}"
            assert page.text_content("#answer") == "(abstained)"
            assert page.locator("#choice-list li.decided").count() == 0
            assert page.locator("#choice-list li.choice").count() == len(choices)

            # The members' trust weights after those votes, as /v1/agents has them (the table
            # follows the server every 3 s).
            (agent,) = httpx.get(f"{url}/v1/agents", timeout=60).json()["agents"]
            trust = {v["name"]: v["trust"]["weight"] for v in agent["views"]}
            page.wait_for_function(
                """(want) => Object.entries(want).every(([m, w]) => {
                    const td = document.querySelector(`#agents tr.view[data-member="${m}"] td.trust`);
                    return td && Number(td.dataset.weight) === w; })""",
                arg=trust,
            )
            page.screenshot(path=str(tmp_path / "ui-views.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    REPO_OUTPUT.mkdir(exist_ok=True)
    for shot in ("ui-choices.png", "ui-views.png"):
        shutil.copy(tmp_path / shot, REPO_OUTPUT / shot)
