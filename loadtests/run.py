"""Start Legion, drive it with Locust headless for a fixed time, report, stop.

    python loadtests/run.py --users 100 --spawn-rate 20 --duration 60s [--config legion.yaml]
    python loadtests/run.py --url http://127.0.0.1:8000 --users 200 ...   (an already running Legion)

Writes ``<out>/locust_stats.csv`` (and the other Locust CSVs) and ``<out>/locust.html``, then
prints one line: users, requests, failures, shed (503 with Retry-After), req/s,
p50/p95/p99 per route, and the tokens the agents generated per second meanwhile. Exits 1 if
any request failed (shed requests are not failures).
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"legion serve exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} never became healthy")


def agent_tokens(url: str) -> int:
    """Completion tokens the agents have generated so far (``GET /v1/agents``; each agent's
    primary replica: replicas a pool added under load are not in this count)."""
    import httpx

    key = os.environ.get("LEGION_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    agents = httpx.get(f"{url}/v1/agents", headers=headers, timeout=60).raise_for_status().json()["agents"]
    return sum((a.get("stats") or {}).get("completion_tokens", 0) for a in agents)


def summarize(stats_csv: Path, users: int) -> tuple[str, int]:
    """The one-line summary of a Locust ``*_stats.csv``, and the number of failed requests."""
    rows = list(csv.DictReader(stats_csv.open()))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    routes = [r for r in rows if r["Name"] != "Aggregated"]
    shed = sum(int(r["Request Count"]) for r in routes if r["Name"].endswith("[shed]"))
    failures = int(total["Failure Count"])
    parts = [
        f"users={users}",
        f"requests={total['Request Count']}",
        f"failures={failures}",
        f"shed_503={shed}",
        f"req/s={float(total['Requests/s']):.1f}",
    ]
    for r in routes:
        parts.append(
            f"[{r['Type']} {r['Name']}: n={r['Request Count']} req/s={float(r['Requests/s']):.1f} "
            f"p50={r['50%']}ms p95={r['95%']}ms p99={r['99%']}ms]"
        )
    return " ".join(parts), failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--spawn-rate", type=float, default=20)
    p.add_argument("--duration", default="60s", help="Locust --run-time, e.g. 60s, 5m")
    p.add_argument("--url", help="an already running Legion; otherwise one is started")
    p.add_argument("--config", help="config for the Legion this script starts")
    p.add_argument("--out", default="loadtest-output", help="folder for the CSV and HTML reports")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "legion_cli", "serve", "--port", str(port), "--no-dashboard"]
        if args.config:
            cmd += ["--config", args.config]
        log = (out / "legion.log").open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc)
        locust = [
            sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration,
            "--host", url, "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
            "--only-summary", "--exit-code-on-error", "0",
        ]  # fmt: skip
        tokens0, t0 = agent_tokens(url), time.monotonic()
        subprocess.run(locust, check=True, env=os.environ.copy())
        tokens, seconds = agent_tokens(url) - tokens0, time.monotonic() - t0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    line, failures = summarize(out / "locust_stats.csv", args.users)
    # The uncached work, in the unit of `legion bench`: tokens the agents generated per second.
    print(f"{line} agent_tokens={tokens} agent_tokens/s={tokens / seconds:.1f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
