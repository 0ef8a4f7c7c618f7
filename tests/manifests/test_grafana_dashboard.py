"""The monitoring component ships the Grafana dashboard as a ConfigMap the
Grafana sidecar loads, generated from the one JSON file (no copy to drift)."""

from __future__ import annotations

import json

import pytest

from tests.manifests.documents import find
from tests.manifests.render import K8S, render

pytestmark = pytest.mark.manifests

DASHBOARD = K8S / "components" / "monitoring" / "blueprint-dashboard.json"
CONFIG_MAP = "grafana-dashboard-channels-blueprint"


def test_the_dashboard_config_map_holds_the_file_and_the_sidecars_label():
    # Found by its plain name: no kustomize hash, which would leave the previous
    # dashboard behind on every change (apply does not prune), a duplicate.
    config_map = find(render("monitoring"), "ConfigMap", CONFIG_MAP)
    # The kube-prometheus-stack chart's sidecar default: label grafana_dashboard, value "1".
    assert config_map["metadata"]["labels"].get("grafana_dashboard") == "1"
    # The sidecar writes each key as a file for Grafana's provisioning, which reads *.json.
    assert list(config_map["data"]) == [DASHBOARD.name]
    assert config_map["data"][DASHBOARD.name] == DASHBOARD.read_text()
    assert json.loads(config_map["data"][DASHBOARD.name])["panels"]
