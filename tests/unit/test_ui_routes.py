"""The web console's static files are public; the API calls it makes keep their scopes."""

from __future__ import annotations

from pathlib import Path

from legion.service.security import required_scope


def test_console_files_are_public_and_its_api_calls_are_not():
    for path in ("/ui", "/ui/", "/ui/index.html", "/ui/app.js", "/ui/style.css"):
        assert required_scope("GET", path) is None, path
    assert required_scope("POST", "/ui/index.html") == "admin"  # no writes hide under /ui
    assert required_scope("GET", "/uix") == "read"
    assert required_scope("POST", "/v1/tasks") == "tasks"  # the stream too (a body field)
    assert required_scope("GET", "/v1/agents") == "read"


def test_console_files_ship_in_the_package():
    import legion

    ui = Path(legion.__file__).parent / "ui"
    html = (ui / "index.html").read_text(encoding="utf-8")
    for asset in ("app.js", "style.css"):
        assert (ui / asset).is_file() and f'"{asset}"' in html
