"""A real Prometheus (Debian's package) scrapes the session's Legion through Ray's metrics export
port: Legion's series arrive, every query of the Grafana dashboard returns data, and the alert
rules load and evaluate on the real series.

The fixture starts its own ``prometheus`` binary on a free port with its own config and data
directory; the package's system service plays no part.
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import time
from datetime import datetime

import httpx
import pytest
import yaml

from tests.integration.conftest import _free_port
from tests.unit.test_monitoring import ALERTS, dashboard_queries

# Dashboard queries (panel title, refId) whose series must show a value above 0 once traffic has
# flowed; the others (queue depth, active sequences, 5xx share) may rightly read 0 and must only
# read a number.
_POSITIVE = {
    ("Requests/s by route and status", "A"),
    ("Latency p50/p95/p99 by route", "A"),
    ("Latency p50/p95/p99 by route", "B"),
    ("Latency p50/p95/p99 by route", "C"),
    ("Tokens generated/s by agent replica", "A"),
    ("Decode tokens/s per agent replica (engine)", "A"),
    ("Batch occupancy (sequences per decode step)", "A"),
    ("Queue depth per agent replica (and its max_queue)", "B"),
    ("Cache hit ratio", "A"),
    ("Arbitration rounds per task by strategy", "A"),
    ("Agreement rate with the decision (mean)", "A"),
    ("Agent pool replicas", "A"),
    ("Agents up (Arbiter's health check)", "A"),
}
# Panels showing a share: every value lies in [0, 1].
_RATIOS = {
    "Cache hit ratio",
    "Error rate (5xx share, health probes left out)",
    "Agreement rate with the decision (mean)",
}


class _Prometheus:
    def __init__(self, url: str):
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=30)

    def api(self, path: str, **params) -> dict:
        body = self._http.get(f"/api/v1/{path}", params=params).json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that returns one series (``None`` if it returns none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait(self, what: str, check, limit_s: float = 180) -> None:
        """Poll until ``check()`` is true: Ray exports every 10 s, Prometheus scrapes every 1 s."""
        deadline = time.monotonic() + limit_s
        while not check():
            assert time.monotonic() < deadline, f"never arrived in Prometheus: {what}"
            time.sleep(1)


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus: install Debian's prometheus (apt-get install prometheus; .ci/run does)")
    work = tmp_path_factory.mktemp("prometheus")
    # Every live node's metrics export port, as Ray's service-discovery file would list them
    # (that file is written by the dashboard, which the session's cluster does not start).
    targets = [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray_cluster.nodes() if n["Alive"]
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "legion", "static_configs": [{"targets": targets}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (work / "prometheus.log").read_text()
        try:
            if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, (work / "prometheus.log").read_text()
        time.sleep(0.5)
    yield _Prometheus(url)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def _wave(client, n: int) -> None:
    """One round of traffic: an uncached task, a task answered from the cache, a bad request."""
    r = client.post("/v1/tasks", json={"task": f"Name a planet. ({n})", "max_tokens": 8, "cache": False})
    assert r.status_code == 200, r.text
    for _ in range(2):  # the first call of the first wave stores it; every later one hits
        r = client.post("/v1/tasks", json={"task": "Name a colour.", "max_tokens": 8})
        assert r.status_code == 200, r.text
    assert client.post("/v1/tasks", json={"task": ""}).status_code == 422


def _requests(prom: _Prometheus, status: str) -> float:
    return prom.value(f'sum(ray_legion_requests_total{{route="/v1/tasks",status="{status}"}})') or 0.0


# Counters that every wave increases, each reported by a different process (ingress, agents,
# Arbiter), so each reaches Prometheus on its own 10 s export tick.
_WAVE_COUNTERS = [
    'ray_legion_requests_total{route="/v1/tasks",status="200"}',
    'ray_legion_request_latency_s_count{route="/v1/tasks"}',
    'ray_legion_cache_lookups_total{outcome="hit"}',
    "ray_legion_tokens_generated_total",
    "ray_legion_arbitrated_tasks_total",
    "ray_legion_arbitration_rounds_total",
    "ray_legion_agreement_rate_count",
]


@pytest.fixture(scope="module")
def traffic(prometheus, legion_url):
    """Two waves of traffic, the second after Prometheus has scraped every counter the first
    increased: a new counter's first sample already holds its first increments, and a rate needs
    an increase between two samples. Returns once every counter shows a rate."""
    start = time.time()
    p = prometheus
    with httpx.Client(base_url=legion_url, timeout=300) as client:
        _wave(client, 1)
        p.wait("the first wave", lambda: all(p.value(f"sum({c})") for c in _WAVE_COUNTERS))
        # More waves while waiting, one per Ray export tick: a process whose export missed the
        # scrape window (seen in long suites, where many apps' workers report) gets another
        # increase to report.
        n, last = 2, 0.0
        deadline = time.monotonic() + 240
        while not all((p.value(f"sum(rate({c}[5m]))") or 0) > 0 for c in _WAVE_COUNTERS):
            assert time.monotonic() < deadline, "never arrived in Prometheus: the later waves" + "".join(
                f"\n  {c}: {p.query(c)}" for c in _WAVE_COUNTERS
            )
            if time.monotonic() - last > 11:
                _wave(client, n)
                n, last = n + 1, time.monotonic()
            time.sleep(1)
    # The gauges reported every 2 s and the Arbiter's health checks, exported by now or soon.
    p.wait("the agents' gauges", lambda: p.query("ray_legion_agent_up"))
    # A ratio of two rates (rounds per task) needs both counters to have moved inside its window
    # in the same series; in a long suite other apps' Arbiters (some deleted by now, some
    # restarted by the chaos tests) report beside this one. Keep the traffic flowing, a wave
    # per Ray export tick, until every panel has a finite value since the traffic began: the
    # very range the dashboard test reads (a check of "now" alone passed on other apps' rates
    # from before the traffic, and the test then found nothing in its range).
    with httpx.Client(base_url=legion_url, timeout=300) as client:
        for n in range(3, 12):
            if all(_finite_since(p, t["expr"], start) for _, t in dashboard_queries()):
                break
            _wave(client, n)
            time.sleep(11)
    return start


def _finite_since(p: _Prometheus, expr: str, start: float) -> bool:
    data = p.api("query_range", query=expr, start=start, end=time.time(), step="1s")
    return any(math.isfinite(float(v)) for s in data["result"] for _, v in s["values"])


def _by(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"][label]: float(r["value"][1]) for r in result}


def test_legion_series_arrive_in_prometheus(prometheus, traffic, legion_config):
    p = prometheus
    agents = [a.name for a in legion_config.agents]
    replicas = {f"{legion_config.serve.app_name}-agent-{a}" for a in agents}

    # The scrape target is up, and the requests by route and status are there.
    assert _by(p.query('up{job="legion"}'), "instance") and all(
        v == 1 for v in _by(p.query('up{job="legion"}'), "instance").values()
    )
    assert _requests(p, "200") >= 6 and _requests(p, "422") >= 2
    # The latency histogram: its +Inf bucket counts every observation.
    count = p.value('sum(ray_legion_request_latency_s_count{route="/v1/tasks"})')
    assert count >= 8
    assert p.value('sum(ray_legion_request_latency_s_bucket{route="/v1/tasks",le="+Inf"})') == count
    les = {r["metric"]["le"] for r in p.query('ray_legion_request_latency_s_bucket{route="/v1/tasks"}')}
    assert "2" in les or "2.0" in les, les  # the bucket edge the latency alert relies on
    # Tokens by agent replica, counted and as the engine's decode rate.
    assert set(_by(p.query("sum by (agent) (ray_legion_tokens_generated_total)"), "agent")) >= replicas
    tps = _by(p.query("max by (agent) (ray_legion_agent_tokens_per_s)"), "agent")
    assert replicas <= set(tps) and all(tps[r] > 0 for r in replicas), tps
    # Queue depth and the limit it is measured against (the agents' max_queue).
    assert replicas <= set(_by(p.query("max by (agent) (ray_legion_queue_depth)"), "agent"))
    limits = _by(p.query("max by (agent) (ray_legion_queue_limit)"), "agent")
    assert {r: limits.get(r) for r in replicas} == {
        f"{legion_config.serve.app_name}-agent-{a.name}": float(a.max_queue) for a in legion_config.agents
    }
    # Cache hits (the repeated task) and misses (its first call).
    assert (p.value('sum(ray_legion_cache_lookups_total{outcome="hit"})') or 0) >= 3
    assert (p.value('sum(ray_legion_cache_lookups_total{outcome="miss"})') or 0) >= 1
    # Every configured agent is up, and its pool has one replica.
    # (Other apps of the session's cluster report their own agents: look at this app's only.)
    up = _by(p.query("min by (agent) (ray_legion_agent_up)"), "agent")
    assert {a: up.get(a) for a in agents} == dict.fromkeys(agents, 1.0)
    assert set(agents) <= set(_by(p.query("max by (agent) (ray_legion_agent_replicas)"), "agent"))


def _explain(prom: _Prometheus, expr: str, start: float) -> str:
    """The raw series behind ``expr`` over the test's window: their labels and values."""
    out = []
    for name in sorted(set(re.findall(r"\bray_legion_\w+", expr))):
        data = prom.api("query_range", query=name, start=start, end=time.time(), step="1s")
        for s in data["result"]:
            labels = {k: v for k, v in s["metric"].items() if k not in ("__name__", "SessionName", "Version")}
            values = sorted({v for _, v in s["values"]}, key=float)
            out.append(f"{name}{labels}: {len(s['values'])} samples, values {values[:6]}")
    return "; ".join(out) or "no series at all"


def _unix(rfc3339: str) -> float:
    """Prometheus's timestamps carry nanoseconds; Python parses microseconds."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")).timestamp()


def _legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"{{\s*(\w+)\s*}}", legend or ""))


def test_every_dashboard_query_returns_data(prometheus, traffic):
    queries = dashboard_queries()
    known = {(title, t["refId"]) for title, t in queries}
    assert _POSITIVE <= known, "a panel this test knows was renamed"
    assert _RATIOS <= {title for title, _ in known}, "a panel this test knows was renamed"
    problems, report = [], []
    for title, target in queries:
        data = prometheus.api("query_range", query=target["expr"], start=traffic, end=time.time(), step="1s")
        series = data["result"]
        values = [float(v) for s in series for _, v in s["values"]]
        finite = [v for v in values if math.isfinite(v)]
        report.append(f"{title} [{target['refId']}]: {len(series)} series, max {max(finite, default=None)}")
        if not finite:
            why = _explain(prometheus, target["expr"], traffic)
            problems.append(f"{title} [{target['refId']}]: no data ({target['expr']}); {why}")
            continue
        missing = {
            label
            for s in series
            for label in _legend_labels(target.get("legendFormat"))
            if label not in s["metric"]
        }
        if missing:
            problems.append(f"{title} [{target['refId']}]: legend labels {missing} not in the series")
        if (title, target["refId"]) in _POSITIVE and max(finite) <= 0:
            problems.append(f"{title} [{target['refId']}]: only zeros after traffic")
        if title in _RATIOS and not all(0 <= v <= 1 for v in finite):
            problems.append(f"{title} [{target['refId']}]: a share outside [0, 1]: {finite}")
    print("\n".join(report))
    assert problems == [], "\n".join([*problems, "", *report])


def test_alert_rules_load_and_watch_real_series(prometheus, traffic, legion_config):
    groups = prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    wanted = {
        r.get("alert") or r["record"]
        for g in yaml.safe_load(ALERTS.read_text())["groups"]
        for r in g["rules"]
    }
    assert set(rules) == wanted
    # Every rule evaluated after the traffic, without an error.
    done = time.time()

    def evaluated() -> bool:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return all(r["health"] == "ok" and _unix(r["lastEvaluation"]) > done for r in rules)

    prometheus.wait("a rule evaluation after the traffic", evaluated, limit_s=30)
    # What each alert watches is computed from the real series (the label matching works on the
    # labels Ray adds), and reads a healthy service: every agent up, the error ratio a number.
    p = prometheus
    prometheus.wait("the recorded series", lambda: p.query("agent:legion_queue_fill:max"))
    agents = {a.name for a in legion_config.agents}
    up = _by(p.query("agent:legion_agent_up:min"), "agent")
    assert {a: up.get(a) for a in agents} == dict.fromkeys(agents, 1.0)
    replicas = {f"{legion_config.serve.app_name}-agent-{a}" for a in agents}
    fill = _by(p.query("agent:legion_queue_fill:max"), "agent")
    assert replicas <= set(fill) and all(0 <= fill[r] <= 1 for r in replicas), fill
    assert "/v1/tasks" in _by(p.query("route:legion_request_latency_s:p95_rate5m"), "route")
    ratio = p.value("legion:request_errors:ratio_rate5m")
    assert ratio is not None and 0 <= ratio <= 1
    # No agent-down or saturation alert on a healthy service.
    ours = agents | replicas
    alerts = [a["labels"] for a in p.api("alerts")["alerts"]]
    wrong = [
        a
        for a in alerts
        if a["alertname"] in ("LegionAgentDown", "LegionQueueSaturated") and a["agent"] in ours
    ]
    assert wrong == [] and not [a for a in alerts if a["alertname"] == "LegionMetricsDown"], alerts
