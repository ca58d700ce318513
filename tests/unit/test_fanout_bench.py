"""``legion bench --fanout``'s tasks: read from the eval's JSONL format and sent uncached, with the
fan-out mode, as ``/v1/tasks`` bodies (no Ray, no model; the served run is in tests/integration)."""

from __future__ import annotations

import json

from legion_cli.fanout_bench import BenchTask, load_tasks


def test_tasks_come_from_a_data_file_as_question_and_choices(tmp_path):
    data = tmp_path / "items.jsonl"
    rows = [
        {"id": "a", "context": "Question: Which is a gas?\nAnswer:", "choices": ["air", "rock"], "answer": 0},
        {"id": "b", "context": "Question: Which melts?\nAnswer:", "choices": ["stone", "ice"], "answer": 1},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tasks, source = load_tasks(str(data), 1)
    assert source == str(data)
    assert tasks == [BenchTask("Which is a gas?", ("air", "rock"), 0)]
    assert tasks[0].body("adaptive", 8) == {
        "task": "Which is a gas?",
        "cache": False,
        "fanout": "adaptive",
        "choices": ["air", "rock"],
    }
    free, _ = load_tasks(str(data), None, free_text=True)
    assert [t.task for t in free] == ["Which is a gas?", "Which melts?"]
    body = {"task": "Which melts?", "cache": False, "fanout": "all", "max_tokens": 8}
    assert free[1].body("all", 8) == body


def test_the_bench_parser_takes_the_fanout_options():
    from legion_cli.cli import build_parser

    argv = ["bench", "--fanout", "--limit", "3", "--concurrency", "2", "--free-text"]
    args = build_parser().parse_args(argv)
    assert args.fanout and args.limit == 3 and args.concurrency == 2 and args.free_text and args.data is None
    plain = build_parser().parse_args(["bench"])
    assert not plain.fanout and not plain.free_text


def test_with_json_stdout_carries_the_result_alone(capsys):
    """What a bench's Ray processes print while it runs goes to stderr, so that
    ``legion bench --fanout/--views/--rag --json | jq`` reads one JSON object."""
    from legion_cli.bench import json_stdout

    with json_stdout(True) as out:
        print("(raylet) something Ray says")
    print('{"ok": true}', file=out)
    got = capsys.readouterr()
    assert got.out == '{"ok": true}\n' and "Ray says" in got.err
    with json_stdout(False) as out:
        print("a table")
    assert capsys.readouterr().out == "a table\n"
