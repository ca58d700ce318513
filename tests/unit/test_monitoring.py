"""The monitoring files: alert rules, their promtool unit tests, the example scrape config and the
Grafana dashboard, checked with Prometheus's own ``promtool`` and against ``legion/metrics.py``.

The dashboard's queries run against a real Prometheus in tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from legion import metrics

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "legion-dashboard.json"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "no promtool: install Debian's prometheus package (apt-get install prometheus; .ci/run does)"
        )
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR)


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_queries() -> list[tuple[str, dict]]:
    """(panel title, target) for every query of the Grafana dashboard."""
    out = []

    def walk(panels):
        for p in panels:
            out.extend((p["title"], t) for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def test_alert_rules_pass_promtool_check():
    r = _run("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout


def test_alert_rules_pass_their_promtool_unit_tests():
    r = _run("test", "rules", str(ALERTS_TEST))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_tested_firing_and_quiet():
    """Each alert has a case where it fires and one where it stays quiet (an empty exp_alerts)."""
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts == {
        "LegionLatencyP95High",
        "LegionErrorRatioHigh",
        "LegionAgentDown",
        "LegionQueueSaturated",
        "LegionMetricsDown",
    }
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"


def test_example_scrape_config_is_valid_and_loads_the_rules():
    r = _run("check", "config", str(SCRAPE_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout
    jobs = {j["job_name"]: j for j in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    # Ray's service-discovery file labels its targets job="ray"; the alerts watch job="legion".
    assert any(rc.get("target_label") == "job" and rc.get("replacement") == "legion"
               for rc in jobs["legion"].get("relabel_configs", []))  # fmt: skip


def test_dashboard_queries_parse(tmp_path):
    """promtool parses every panel query (as a recording rule: it has no standalone parser)."""
    queries = dashboard_queries()
    assert len(queries) >= 12
    records = [{"record": f"dashboard:query{i}", "expr": t["expr"]} for i, (_, t) in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = _run("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def _exported_names() -> set[str]:
    """Every series name Ray exports for the metrics defined in legion/metrics.py."""
    names = set()
    for kind, name, *_ in metrics._DEFS.values():
        base = f"ray_{name}"
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "gauge":
            names.add(base)
        else:
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_dashboard_and_alerts_name_only_metrics_that_legion_exports():
    exprs = [t["expr"] for _, t in dashboard_queries()] + [r["expr"] for r in _rules()]
    used = {n for e in exprs for n in re.findall(r"\bray_legion_\w+", e)}
    assert used, "no Legion metric referenced"
    assert used - _exported_names() == set()
    # And every Legion metric shows on the dashboard (a metric nobody can see is dead weight).
    dash = " ".join(t["expr"] for _, t in dashboard_queries())
    unseen = [name for _, name, *_ in metrics._DEFS.values() if f"ray_{name}" not in dash]
    assert unseen == [], "metrics no panel shows"
