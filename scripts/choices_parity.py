"""Parity of a running Legion's choices with ``legion eval``: every item of a data file is sent to
``POST /v1/tasks`` as its question and choices, in file order, and the served decision is compared
with the one ``legion eval --out`` recorded for the same strategy (``report.decisions``).

    legion eval --data D.jsonl --limit 100 --strategies conflict --out eval.json
    legion serve &   # the same config, a fresh data_dir (the trust weights start equal in both)
    python scripts/choices_parity.py --data D.jsonl --limit 100 --eval eval.json --strategy conflict

Prints the items where they differ and one JSON line with the counts; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from legion.engine.views import load_items, split_question


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--eval", required=True, help="legion eval --out's JSON, run on the same items")
    p.add_argument("--strategy", required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--fanout",
        choices=("all", "adaptive"),
        default="all",
        help="adaptive: compare with the eval's <strategy>@adaptive decisions (eval --fanout adaptive)",
    )
    args = p.parse_args()
    items = load_items(args.data, args.limit)
    row = args.strategy if args.fanout == "all" else f"{args.strategy}@adaptive"
    wanted = json.loads(open(args.eval, encoding="utf-8").read())["report"]["decisions"][row]
    if len(wanted) != len(items):
        sys.exit(f"{args.eval} decided {len(wanted)} items, --data/--limit give {len(items)}")
    same = 0
    differ = []
    with httpx.Client(base_url=args.url, timeout=600) as client:
        for item, expected in zip(items, wanted, strict=True):
            parts = split_question(item.context)
            question = parts[1] if parts else item.context
            body = {
                "task": question,
                "choices": item.choices,
                "strategy": args.strategy,
                "cache": False,
                "fanout": args.fanout,
            }
            r = client.post("/v1/tasks", json=body)
            r.raise_for_status()
            got = r.json()["choice"]["index"]
            if got == expected:
                same += 1
            else:
                differ.append({"id": item.id, "served": got, "eval": expected})
                print(f"{item.id}: served {got}, legion eval {expected}", file=sys.stderr)
    print(json.dumps({"items": len(items), "same": same, "differ": differ, "strategy": row}))
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
