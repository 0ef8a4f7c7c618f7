"""The monitoring component (k8s/components/monitoring): promtool accepts its
rules and their unit tests pass (each alert fires and stays quiet where it
should), every metric an alert or the Grafana dashboard names is one the app
exports, and Prometheus may reach what the PodMonitor scrapes.

promtool comes with Debian's `prometheus` package (the Makefile's
SYSTEM_PACKAGES; `make k8s-check` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.manifests.documents import container, find, of_kind
from tests.manifests.render import ROOT, render
from tests.required import unavailable

pytestmark = pytest.mark.manifests

HERE = Path(__file__).parent / "monitoring"
METRICS = ROOT / "app" / "realtime" / "metrics.py"
DASHBOARD = ROOT / "k8s" / "components" / "monitoring" / "blueprint-dashboard.json"
# Series a name may carry beyond the metric's own (counters, histograms).
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
# Names the app does not define that Prometheus or prometheus_client provide:
# the scrape's `up`, the client's process collector.
PROVIDED = re.compile(r"up|process_[a-z_]+|python_[a-z_]+")
# PromQL words that look like metric names.
PROMQL = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def _rules() -> list[dict]:
    rule = find(render("monitoring"), "PrometheusRule", "channels-blueprint")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


@pytest.fixture(scope="module")
def promtool(tmp_path_factory) -> tuple[str, Path]:
    found = shutil.which("promtool")
    if not found:
        unavailable("promtool is not installed (Debian package `prometheus`: make system-packages)")
    directory = tmp_path_factory.mktemp("rules")
    rule = find(render("monitoring"), "PrometheusRule", "channels-blueprint")
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(HERE / "alerts.test.yaml", directory)
    return found, directory


def _run(promtool: tuple[str, Path], *args: str) -> None:
    binary, directory = promtool
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules(promtool):
    _run(promtool, "check", "rules", "rules.yaml")


def test_every_alert_fires_and_stays_quiet_in_its_unit_tests(promtool):
    _run(promtool, "test", "rules", "alerts.test.yaml")
    cases = [
        case
        for test in yaml.safe_load((HERE / "alerts.test.yaml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for alert in (rule["alert"] for rule in _rules()):
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert}: a case where it fires and one where it does not"


def _exported() -> set[str]:
    return set(
        re.findall(r"""\b(?:Counter|Gauge|Histogram|Summary)\(\s*["']([a-z_:][a-z0-9_:]*)["']""", METRICS.read_text())
    )


def _metric_names(expression: str) -> set[str]:
    """Identifiers in a PromQL expression that name series: not functions
    (followed by a parenthesis), not label names or values, not keywords."""
    without_strings = re.sub(r'"[^"]*"', '""', expression)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_groupings = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
    words = re.findall(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", without_groupings)
    return {word for word in words if word not in PROMQL and not re.fullmatch(r"\d+[smhdwy]", word)}


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dashboard_expressions() -> list[str]:
    """The panels' queries and the query variables' (a datasource variable's
    `query` is a plugin name, not PromQL)."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [v["query"] for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard.get("panels", []))
    return found


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_named_is_one_the_app_exports(source):
    expressions = [r["expr"] for r in _rules()] if source == "alerts" else _dashboard_expressions()
    assert expressions
    exported = _exported()
    for expression in expressions:
        names = {name for name in _metric_names(re.sub(r"label_values\(([^,)]*).*", r"\1", expression))}
        names -= {"__name__"}
        assert names, f"no metric in {expression!r}"
        for name in names:
            assert PROVIDED.fullmatch(name) or _base(name) in exported, f"{source}: {name} in {expression!r}"


def test_the_metric_names_check_catches_a_misspelt_one():
    assert "blueprint_ws_open_socket" not in _exported()
    assert _metric_names('sum by (replica) (rate(blueprint_ws_open_socket{a="b"}[5m])) > 1') == {
        "blueprint_ws_open_socket"
    }


def test_prometheus_may_reach_the_port_the_pod_monitor_scrapes():
    docs = render("monitoring")
    monitor = find(docs, "PodMonitor", "app")
    policy = find(docs, "NetworkPolicy", "allow-monitoring")
    assert policy["spec"]["podSelector"] == monitor["spec"]["selector"]
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    for role in ("daphne", "gunicorn"):
        ports = {p["name"]: p["containerPort"] for p in container(find(docs, "Deployment", role))["ports"]}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert ports[endpoint["port"]] in allowed, f"{role}: {endpoint['port']} is not open to Prometheus"
    assert len(of_kind(docs, "PrometheusRule")) == 1


def test_the_socket_alert_compares_with_the_overlays_cap():
    docs = render("monitoring")
    cap = next(
        e["value"] for e in container(find(docs, "Deployment", "daphne"))["env"] if e["name"] == "WS_MAX_CONNECTIONS"
    )
    expression = next(r["expr"] for r in _rules() if r["alert"] == "BlueprintSocketsNearCap")
    assert expression.split()[0] == cap, expression
