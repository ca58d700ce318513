"""Compare `legion bench`'s HTTP overhead of this checkout with another revision's, in one run.

    python scripts/http_overhead_ab.py REV [--pairs 3] [--requests 40]

Checks REV out into a temporary git worktree, then alternates (A B A B ..., the first side
swapped every pair) child processes that each run that checkout's own ``_http_overhead``
(``legion_cli.bench`` here, ``legion.bench`` before the redesign): a fresh Ray cluster, two
agents, paired ``/v1/tasks`` and direct Arbiter calls, and a no-op POST through Serve. Prints
each side's medians over its runs and the ratio new/old. Both sides use this venv's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CHILD = """
import json, os, sys
# legion_cli exists only after the redesign; test for the file, since this venv's editable
# install would otherwise find the new checkout's package for the old one.
if os.path.exists("legion_cli/bench.py"):
    from legion_cli.bench import _http_overhead
else:
    from legion.bench import _http_overhead
import ray
ray.init(num_cpus=float(os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
print("RESULT " + json.dumps(_http_overhead(int(sys.argv[1]), float(os.cpu_count() or 1))))
"""


def _run(checkout: Path, requests: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(requests)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    ray = Path(sys.executable).with_name("ray")  # this venv's CLI, on PATH or not
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{checkout}: no result\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the revision to compare with (e.g. the commit before a change)")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each side, alternated")
    ap.add_argument("--requests", type=int, default=40, help="paired requests per run")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev], check=True
        )
        try:
            for i in range(args.pairs):
                for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    r = _run(old if side == "old" else ROOT, args.requests)
                    runs[side].append(r)
                    print(f"pair {i + 1} {side}: {json.dumps(r)}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    keys = ("http_overhead_ms_p50", "serve_noop_post_ms_p50", "http_p50_ms", "direct_p50_ms")
    summary = {
        side: {k: round(statistics.median(r[k] for r in rs), 2) for k in keys} for side, rs in runs.items()
    }
    summary["ratio_new_over_old"] = {
        k: round(summary["new"][k] / summary["old"][k], 3) for k in keys if summary["old"][k]
    }
    summary["rev"] = args.rev
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
