"""Soak test: thousands of requests through the HTTP API while the resident memory (RSS) of every
Legion process is sampled; prints each process's growth from the first to the last quarter.

    .venv/bin/python scripts/soak.py                      # starts a throwaway `legion serve`
    .venv/bin/python scripts/soak.py --requests 5000 --concurrency 8 --json
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

The mix touches every layer: novel tasks (agents), repeated tasks (cache), chat, streaming chat,
reads (models, agents, health) and invalid requests (4xx paths). Samples start after a warm-up,
so first-use allocations (model, KV cache, caches) do not read as growth. A process counts as
growing when its RSS rises from the first to the last quarter by more than ``--tolerance-mib``
and keeps rising (positive slope over the second half); the exit status is 1 if any does.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LEGION_TITLES = ("ServeReplica", "ArbiterActor", "AgentActor", "ProxyActor", "ServeController", "Retriever")


# ------------------------------------------------------------------------- processes
def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids[ppid].append(int(entry))
    return kids


def legion_processes(root_pid: int | None) -> dict[int, str]:
    """pid -> Ray process title of the Legion actors (under ``root_pid`` when given)."""
    if root_pid is not None:
        kids, todo, pids = _children(), [root_pid], []
        while todo:
            p = todo.pop()
            pids.append(p)
            todo.extend(kids.get(p, []))
    else:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    out = {}
    for pid in pids:
        title = _cmdline(pid)
        if title.startswith("ray::") and any(t in title for t in LEGION_TITLES):
            out[pid] = title.split()[0].removeprefix("ray::")
    return out


def _label(title: str, pid: int, agents_by_pid: dict[int, str]) -> str:
    if pid in agents_by_pid:
        return f"agent {agents_by_pid[pid]}"
    base = title.split(".")[0]  # "AgentActor.generate" -> "AgentActor" (the method changes)
    return f"{base} (pid {pid})"


class MemorySampler(threading.Thread):
    """Samples RSS of the Legion processes every ``interval_s`` while ``active`` is set."""

    def __init__(self, root_pid: int | None, interval_s: float):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[int, float]]] = defaultdict(list)  # pid -> (requests, MiB)
        self.titles: dict[int, str] = {}
        self.done = 0  # requests finished so far, set by the load
        self.active = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.active.is_set():
                for pid, title in legion_processes(self.root_pid).items():
                    rss = _rss_mib(pid)
                    if rss is not None:
                        self.titles.setdefault(pid, title)
                        self.samples[pid].append((self.done, rss))
            self.stop.wait(self.interval_s)


def _slope_mib_per_1k(points: list[tuple[int, float]]) -> float:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    if len(set(xs)) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den * 1000


def growth_report(sampler: MemorySampler, agents_by_pid: dict[int, str], tolerance_mib: float) -> list[dict]:
    rows = []
    for pid, points in sampler.samples.items():
        if len(points) < 8:
            continue
        q = len(points) // 4
        first = statistics.fmean(p[1] for p in points[:q])
        last = statistics.fmean(p[1] for p in points[-q:])
        slope = _slope_mib_per_1k(points[len(points) // 2 :])
        rows.append(
            {
                "process": _label(sampler.titles[pid], pid, agents_by_pid),
                "pid": pid,
                "samples": len(points),
                "first_quarter_mib": round(first, 1),
                "last_quarter_mib": round(last, 1),
                "growth_mib": round(last - first, 1),
                "growth_pct": round((last - first) / first * 100, 2) if first else 0.0,
                "second_half_slope_mib_per_1k_requests": round(slope, 2),
                "growing": (last - first) > tolerance_mib and slope > 0,
            }
        )
    return sorted(rows, key=lambda r: r["process"])


# ------------------------------------------------------------------------------ load
class Load:
    """The request mix; each call returns the HTTP status (0 for a transport error)."""

    def __init__(self, url: str, api_key: str | None, seed: int):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.n = 0
        # Weighted so that thousands of requests fit in minutes on a small machine: a novel task
        # costs every agent a generation, the rest are cheap but cross the same layers.
        self.mix = [
            (15, self.novel_task),
            (25, self.repeated_task),
            (5, self.chat),
            (5, self.stream_chat),
            (25, self.read),
            (15, self.health),
            (10, self.invalid),
        ]

    def pick(self):
        with self.lock:
            self.n += 1
            n = self.n
            kind = self.rng.choices([f for _, f in self.mix], weights=[w for w, _ in self.mix])[0]
        return kind, n

    def novel_task(self, c: httpx.Client, n: int) -> int:
        body = {"task": f"What is {n} plus {n % 7}?", "max_tokens": 2, "cache": False}
        return c.post(f"{self.url}/v1/tasks", json=body).status_code

    def repeated_task(self, c: httpx.Client, n: int) -> int:
        body = {"task": f"Name a primary colour ({n % 5}).", "max_tokens": 2}
        return c.post(f"{self.url}/v1/tasks", json=body).status_code

    def chat(self, c: httpx.Client, n: int) -> int:
        body = {
            "model": "legion",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {n}."},
            ],
            "max_tokens": 2,
            "cache": False,
        }
        return c.post(f"{self.url}/v1/chat/completions", json=body).status_code

    def stream_chat(self, c: httpx.Client, n: int) -> int:
        body = {
            "messages": [{"role": "user", "content": f"Count to {n % 9}."}],
            "max_tokens": 2,
            "stream": True,
        }
        with c.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
            for _ in r.iter_lines():
                pass
            return r.status_code

    def read(self, c: httpx.Client, n: int) -> int:
        return c.get(f"{self.url}/v1/{'models' if n % 3 else 'agents'}").status_code

    def health(self, c: httpx.Client, n: int) -> int:
        return c.get(f"{self.url}/healthz").status_code

    def invalid(self, c: httpx.Client, n: int) -> int:
        bad = [
            {"json": {"task": ""}},
            {"json": {"task": "hi", "max_tokens": 0}},
            {"content": b'{"task": ', "headers": {"content-type": "application/json"}},
            {"json": {"task": "hi", "strategy": "nope"}},
        ][n % 4]
        return c.post(f"{self.url}/v1/tasks", **bad).status_code


def run_load(load: Load, total: int, concurrency: int, sampler: MemorySampler | None, warmup: int) -> Counter:
    """Send ``total`` requests; stops early once 50 in a row fail to connect (the server is gone)."""
    statuses: Counter = Counter()
    lock = threading.Lock()
    issued = {"n": 0, "dead_streak": 0}

    def worker() -> None:
        with httpx.Client(headers=load.headers, timeout=300) as c:
            while True:
                with lock:
                    if issued["n"] >= total or issued["dead_streak"] >= 50:
                        return
                    issued["n"] += 1
                kind, n = load.pick()
                try:
                    status = kind(c, n)
                except httpx.HTTPError:
                    status = 0
                with lock:
                    issued["dead_streak"] = issued["dead_streak"] + 1 if status == 0 else 0
                    statuses[status] += 1
                    done = sum(statuses.values())
                    if sampler is not None:
                        sampler.done = done
                        if done >= warmup:
                            sampler.active.set()
                    if done % 500 == 0:
                        print(f"soak: {done}/{total} requests, statuses {dict(statuses)}", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


# ---------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, api_key: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    conf = workdir / "legion.yaml"
    # Three agents like the defaults, each held at one replica so pool autoscaling does not read as growth.
    conf.write_text(
        "agents:\n"
        + "".join(f"  - {{name: {n}, role: {n}, max_replicas: 1}}\n" for n in ("solver", "reasoner", "judge"))
        + f"serve: {{port: {port}, app_name: soak, max_replicas: 1}}\n"
        "security: {rate_limit_per_minute: 0}\n"
        f"data_dir: {workdir / 'data'}\n"
    )
    env = {
        **os.environ,
        "LEGION_API_KEYS": api_key,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    env.pop("RAY_ADDRESS", None)
    log = open(workdir / "serve.log", "w")  # the server's output, for as long as it runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "legion_cli", "serve", "--config", str(conf), "--no-dashboard"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"legion serve exited: see {workdir / 'serve.log'}")
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("legion serve never became healthy")
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running Legion (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("LEGION_API_KEY"))
    p.add_argument("--requests", type=int, default=3000, help="requests after the warm-up")
    p.add_argument("--warmup", type=int, default=300, help="requests before sampling starts")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--tolerance-mib", type=float, default=20.0, help="growth below this is not a leak")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--samples-out", help="also write every RSS sample to this CSV file")
    args = p.parse_args()

    proc, workdir = None, None
    url, key = args.url, args.api_key
    if url is None:
        import secrets

        workdir = Path(tempfile.mkdtemp(prefix="legion-soak-"))
        key = secrets.token_urlsafe(24)
        print(f"soak: starting legion serve (log: {workdir / 'serve.log'})", flush=True)
        proc, url = start_server(workdir, key)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        agents = httpx.get(f"{url}/v1/agents", headers=headers, timeout=60).json()["agents"]
        agents_by_pid = {a["health"]["pid"]: a["name"] for a in agents if a["health"].get("pid")}
        sampler = MemorySampler(proc.pid if proc else None, args.sample_s)
        sampler.start()
        t0 = time.monotonic()
        total = args.warmup + args.requests
        statuses = run_load(Load(url, key, args.seed), total, args.concurrency, sampler, args.warmup)
        seconds = time.monotonic() - t0
        sampler.stop.set()
        sampler.join()
        rows = growth_report(sampler, agents_by_pid, args.tolerance_mib)
        if args.samples_out:
            with open(args.samples_out, "w") as f:
                f.write("process,pid,requests_done,rss_mib\n")
                for pid, points in sampler.samples.items():
                    name = _label(sampler.titles[pid], pid, agents_by_pid)
                    f.writelines(f"{name},{pid},{n},{mib:.2f}\n" for n, mib in points)
    finally:
        if proc is not None:
            stop_server(proc)
    failures = sum(n for s, n in statuses.items() if s == 0 or s >= 500)
    summary = {
        "requests": sum(statuses.values()),
        "sampled_requests": args.requests,
        "seconds": round(seconds, 1),
        "requests_per_s": round(sum(statuses.values()) / seconds, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "processes": rows,
        "growing": [r["process"] for r in rows if r["growing"]],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"\nsoak: {summary['requests']} requests in {summary['seconds']} s "
            f"({summary['requests_per_s']} req/s), statuses {summary['statuses']}, failures {failures}"
        )
        head = ("process", "samples", "first q MiB", "last q MiB", "growth", "slope/1k")
        print(f"{head[0]:<34} {head[1]:>7} {head[2]:>12} {head[3]:>11} {head[4]:>8} {head[5]:>9}")
        for r in rows:
            flag = "  GROWING" if r["growing"] else ""
            print(
                f"{r['process']:<34} {r['samples']:>7} {r['first_quarter_mib']:>12.1f} "
                f"{r['last_quarter_mib']:>11.1f} {r['growth_mib']:>+8.1f} "
                f"{r['second_half_slope_mib_per_1k_requests']:>+9.2f}{flag}"
            )
    return 1 if summary["growing"] or failures else 0


if __name__ == "__main__":
    sys.exit(main())
