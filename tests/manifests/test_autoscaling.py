"""The production HPA scales Daphne on open sockets per pod: its target is a
stated fraction of the overlay's WS_MAX_CONNECTIONS, below the cap and below
the socket alert, and the metric it names is the one the example
prometheus-adapter rule (k8s/components/monitoring/prometheus-adapter-rules.yaml)
serves from a series the app exports."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.manifests.documents import env_value, find
from tests.manifests.render import K8S, render
from tests.manifests.test_monitoring import _exported, _metric_names

pytestmark = pytest.mark.manifests

HPA_SOURCE = K8S / "overlays" / "production" / "horizontalpodautoscaler-daphne.yaml"
ADAPTER_RULES = K8S / "components" / "monitoring" / "prometheus-adapter-rules.yaml"
# "Socket target: 70 % of the overlay's WS_MAX_CONNECTIONS" in the HPA's comment.
STATED_FRACTION = re.compile(r"Socket target:\s*(\d+(?:\.\d+)?)\s*%\s*of the overlay's WS_MAX_CONNECTIONS")


def _hpa(docs) -> dict:
    return find(docs, "HorizontalPodAutoscaler", "daphne")


def _metrics_of_type(hpa: dict, kind: str) -> list[dict]:
    return [metric for metric in hpa["spec"]["metrics"] if metric["type"] == kind]


def _socket_metric(hpa: dict) -> dict:
    pods = _metrics_of_type(hpa, "Pods")
    assert len(pods) == 1, "the HPA scales on one Pods metric, open sockets"
    return pods[0]["pods"]


def _cap(docs) -> int:
    return int(env_value(find(docs, "Deployment", "daphne"), docs, "WS_MAX_CONNECTIONS"))


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]


def _served_name(rule: dict, series: str) -> str | None:
    """The name prometheus-adapter serves a series under (its `name` section:
    `as` defaults to $1 with one capture group, $0 otherwise); None when the
    rule does not match the series."""
    naming = rule.get("name", {})
    pattern = naming.get("matches", "")
    match = re.search(pattern, series)
    if not match:
        return None
    template = naming.get("as") or ("$1" if re.compile(pattern).groups == 1 else "$0")
    return re.sub(r"\$\{?(\d+)\}?", lambda group: match.group(int(group.group(1))), template)


def _series_metric(rule: dict) -> str:
    names = _metric_names(rule["seriesQuery"])
    assert len(names) == 1, f"one metric per adapter rule: {rule['seriesQuery']!r}"
    return names.pop()


def test_the_hpa_scales_on_open_sockets_per_pod_first_and_cpu_second():
    hpa = _hpa(render("production"))
    assert [metric["type"] for metric in hpa["spec"]["metrics"]] == ["Pods", "Resource"]
    assert _socket_metric(hpa)["target"]["type"] == "AverageValue"
    assert [m["resource"]["name"] for m in _metrics_of_type(hpa, "Resource")] == ["cpu"]


def test_the_socket_target_is_the_stated_fraction_of_the_cap_and_below_it():
    docs = render("production")
    stated = STATED_FRACTION.search(HPA_SOURCE.read_text())
    assert stated, f"{HPA_SOURCE.name} no longer states its target as a fraction of WS_MAX_CONNECTIONS"
    fraction = float(stated.group(1)) / 100
    target = int(_socket_metric(_hpa(docs))["target"]["averageValue"])
    cap = _cap(docs)
    assert target < cap, f"the HPA waits for {target} sockets a pod, the cap is {cap}: pods refuse before it acts"
    assert target == round(fraction * cap), f"{target} is not the stated {fraction:.0%} of {cap}"


def test_the_hpa_acts_before_the_socket_alert_fires():
    docs = render("monitoring")
    rule = find(docs, "PrometheusRule", "channels-blueprint")
    expression = next(
        r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "BlueprintSocketsNearCap"
    )
    threshold = re.match(r"\s*(\d+)\s*\*\s*([\d.]+)\s*<", expression)
    assert threshold, f"BlueprintSocketsNearCap no longer reads `CAP * FRACTION < ...`: {expression!r}"
    alert_at = int(threshold.group(1)) * float(threshold.group(2))
    assert int(_socket_metric(_hpa(docs))["target"]["averageValue"]) < alert_at


def test_the_metric_the_hpa_names_is_the_one_the_adapter_serves():
    wanted = _socket_metric(_hpa(render("production")))["metric"]["name"]
    served = {_served_name(rule, _series_metric(rule)) for rule in _adapter_rules()}
    assert wanted in served, f"the HPA asks for {wanted}, the adapter rule serves {served}"


def test_the_adapter_rule_reads_a_series_the_app_exports_per_pod():
    exported = _exported()
    for rule in _adapter_rules():
        assert _series_metric(rule) in exported, rule["seriesQuery"]
        # The labels the PodMonitor's scrape adds, mapped to the objects the HPA asks about.
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_the_naming_check_follows_the_adapters_rules():
    rule = {"name": {"matches": "^(.*)_total$", "as": "${1}_per_second"}}
    assert _served_name(rule, "blueprint_ws_messages_sent_total") == "blueprint_ws_messages_sent_per_second"
    assert _served_name({"name": {"matches": "^(.*)_total$"}}, "a_total") == "a"
    assert _served_name({"name": {"matches": "^a_total$"}}, "a_total") == "a_total"
    assert _served_name(rule, "blueprint_ws_open_sockets") is None
