"""Every kustomization renders, and every document is one the API server accepts.

Schema: strict validation (unknown fields are errors) against the pinned
Kubernetes version, from the schemas kubernetes-validate ships (no network).
"""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest

from tests.manifests.documents import container, env_names, find, of_kind, pod_spec, workloads
from tests.manifests.render import KUBERNETES_VERSION, KUSTOMIZATIONS, OVERLAYS, render

pytestmark = pytest.mark.manifests

SECRET_NAMES = ("DJANGO_SECRET_KEY", "REDIS_PASSWORD", "BROADCAST_TOKEN")
# A Kubernetes dependent-variable reference, expanded by the kubelet.
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# The Prometheus Operator's kinds have no schema in kubernetes-validate;
# promtool checks the rules (test_monitoring.py).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_document_validates_strictly(name):
    docs = render(name)
    assert docs, f"{name} rendered nothing"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {error.message} at {list(error.path)}")


def test_strict_validation_rejects_an_unknown_field():
    """The pinned version's strict schemas really are strict (a misspelt field fails)."""
    deployment = copy.deepcopy(find(render("dev"), "Deployment", "daphne"))
    container(deployment)["readinesProbe"] = container(deployment)["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_put_everything_in_their_own_namespace(name):
    namespace = f"channels-blueprint-{name}"
    assert [doc["metadata"]["name"] for doc in of_kind(render(name), "Namespace")] == [namespace]
    for doc in render(name):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_no_secret_values_in_the_manifests(name):
    docs = render(name)
    assert not of_kind(docs, "Secret"), "the Secret is created by the user, never shipped"
    for doc in of_kind(docs, "ConfigMap"):
        assert not set(doc.get("data", {})) & set(SECRET_NAMES), doc["metadata"]["name"]
    for workload in workloads(docs):
        for entry in container(workload).get("env", []):
            if entry["name"] in SECRET_NAMES:
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{workload['metadata']['name']}: {entry['name']}"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_variable_references_point_at_variables_defined_before_them(name):
    """$(REDIS_PASSWORD) in REDIS_URL expands only if REDIS_PASSWORD comes first;
    otherwise the app gets the literal text as its password."""
    docs = render(name)
    for workload in workloads(docs):
        spec = container(workload)
        defined = [n for n in env_names(workload, docs) if n not in {e["name"] for e in spec.get("env", [])}]
        for entry in spec.get("env", []):
            for referenced in REFERENCE.findall(entry.get("value", "")):
                assert referenced in defined, (
                    f"{workload['metadata']['name']}: {entry['name']} uses $({referenced}) before it is defined"
                )
            defined.append(entry["name"])
        for word in spec.get("command", []) + spec.get("args", []):
            for referenced in REFERENCE.findall(word):
                assert referenced in defined, f"{workload['metadata']['name']}: $({referenced}) is never defined"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_run_as_non_root_with_a_read_only_root(name):
    for workload in workloads(render(name)):
        spec, what = pod_spec(workload), workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, what
        assert spec["securityContext"]["runAsUser"] == 10001, what
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, what
        security = container(workload)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, what
        assert security["allowPrivilegeEscalation"] is False, what
        assert security["capabilities"]["drop"] == ["ALL"], what
        assert {"requests", "limits"} <= set(container(workload)["resources"]), what


def _replicas(docs, name):
    return find(docs, "Deployment", name)["spec"].get("replicas", 1)


def test_dev_is_one_replica_of_each_with_redis_in_the_cluster():
    docs = render("dev")
    assert [_replicas(docs, n) for n in ("daphne", "gunicorn", "nginx")] == [1, 1, 1]
    assert find(docs, "StatefulSet", "redis")
    assert not of_kind(docs, "HorizontalPodAutoscaler")


def test_staging_runs_three_daphne_replicas_with_redis_in_the_cluster():
    docs = render("staging")
    assert _replicas(docs, "daphne") == 3
    assert find(docs, "StatefulSet", "redis")
    assert not of_kind(docs, "HorizontalPodAutoscaler")


def test_production_autoscales_daphne_and_uses_an_external_redis():
    docs = render("production")
    assert not of_kind(docs, "StatefulSet"), "production brings its own Redis"
    daphne = find(docs, "Deployment", "daphne")
    # A replica count would fight the HPA on every apply.
    assert "replicas" not in daphne["spec"]
    hpa = find(docs, "HorizontalPodAutoscaler", "daphne")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "daphne"}
    assert hpa["spec"]["minReplicas"] >= 2
    # Removing a replica drops its sockets: scale in only after a long calm.
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 900
    for workload in ("daphne", "gunicorn"):
        url = next(e["value"] for e in container(find(docs, "Deployment", workload))["env"] if e["name"] == "REDIS_URL")
        assert "@redis:" not in url, f"{workload} still points at the in-cluster Redis"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_deployment_has_a_disruption_budget_and_a_careful_rollout(name):
    docs = render(name)
    budgets = {
        tuple(sorted(doc["spec"]["selector"]["matchLabels"].items())) for doc in of_kind(docs, "PodDisruptionBudget")
    }
    for deployment in of_kind(docs, "Deployment"):
        selector = tuple(sorted(deployment["spec"]["selector"]["matchLabels"].items()))
        assert selector in budgets, f"no PodDisruptionBudget for {deployment['metadata']['name']}"
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert "preStop" in container(deployment)["lifecycle"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_app_pods_reach_redis_and_only_nginx_reaches_app_pods(name):
    docs = render(name)
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in of_kind(docs, "NetworkPolicy")}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    app_sources = [peer for rule in policies["app"]["ingress"] for peer in rule["from"]]
    assert app_sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nginx"}}}]
    if "redis" in policies:
        redis_sources = [peer for rule in policies["redis"]["ingress"] for peer in rule["from"]]
        assert redis_sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "app"}}}]
        app_pods = {
            d["metadata"]["name"]
            for d in of_kind(docs, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "app"
        }
        assert app_pods == {"daphne", "gunicorn"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_carries_the_blueprint_labels(name):
    for doc in render(name):
        part_of = doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of")
        assert part_of == "channels-blueprint", f"{doc['kind']} {doc['metadata']['name']}"
    for workload in workloads(render(name)):
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert template_labels.get("app.kubernetes.io/part-of") == "channels-blueprint"
        assert "app.kubernetes.io/name" in template_labels
