"""``legion ask`` against a server that is not there: one line naming the URL and the fix."""

from __future__ import annotations

import socket

from legion_cli.cli import build_parser, main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_ask_without_a_server_says_where_it_looked_and_what_to_change(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["ask", "Name a colour.", "--url", url, "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{url}/v1/tasks" in err and "--url" in err and "LEGION_URL" in err


def test_every_ask_option_has_help():
    ask = build_parser()._subparsers._group_actions[0].choices["ask"]
    assert all(a.help for a in ask._actions), [a.dest for a in ask._actions if not a.help]
