"""The optional Ingress example (k8s/components/ingress-nginx-example): rendered
with the production overlay as an overlay that opts in would be, it validates
strictly and passes checkov; its WebSocket timeouts are at least the blueprint
nginx's own; TLS comes from the Secret cert-manager writes for the host the
overlay allows; and the env its comments tell you to set is the nginx image's."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.manifests.documents import env_value, find, of_kind
from tests.manifests.render import K8S, KUBERNETES_VERSION, ROOT, kubectl
from tests.manifests.sources import NGINX_TEMPLATE
from tests.manifests.test_policy import CHECKOV
from tests.required import unavailable

pytestmark = pytest.mark.manifests

COMPONENT = K8S / "components" / "ingress-nginx-example"
OVERLAY = "production"
ANNOTATION = "nginx.ingress.kubernetes.io/"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, tuple[dict, ...]]:
    """The overlay with the component, as an overlay that opts in renders; the
    YAML file and its documents."""
    directory = tmp_path_factory.mktemp("ingress")
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": f"channels-blueprint-{OVERLAY}",
                # Relative: kustomize refuses absolute paths here.
                "resources": [os.path.relpath(K8S / "overlays" / OVERLAY, directory)],
                "components": [os.path.relpath(COMPONENT, directory)],
            }
        )
    )
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    output = directory / "rendered" / "ingress.yaml"
    output.parent.mkdir()
    output.write_text(result.stdout)
    return output, tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(scope="module")
def ingress(rendered) -> dict:
    docs = rendered[1]
    assert len(of_kind(docs, "Ingress")) == 1
    return find(docs, "Ingress", "nginx")


def _seconds(value: str) -> int:
    """An nginx time (75s, 2m, 75) in seconds."""
    number, unit = re.fullmatch(r"(\d+)(s|m|h)?", value).groups()
    return int(number) * {"s": 1, "m": 60, "h": 3600, None: 1}[unit]


def _nginx_ws_timeouts() -> dict[str, int]:
    """proxy_read_timeout and proxy_send_timeout of the template's `location /ws/`."""
    # From the directive to the brace that closes it at the same indentation.
    block = re.search(r"^([ \t]*)location\s+/ws/\s*\{$(.*?)^\1\}", NGINX_TEMPLATE.read_text(), re.S | re.M)
    assert block, f"{NGINX_TEMPLATE.name} has no `location /ws/` block"
    found = dict(re.findall(r"^\s*(proxy_(?:read|send)_timeout)\s+(\w+);", block.group(2), re.M))
    assert set(found) == {"proxy_read_timeout", "proxy_send_timeout"}, found
    return {name: _seconds(value) for name, value in found.items()}


def test_every_document_validates_strictly(rendered):
    for doc in rendered[1]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {error.message} at {list(error.path)}")


def test_checkov_passes(rendered):
    if not CHECKOV.exists():
        unavailable(f"{CHECKOV.relative_to(ROOT)} is missing: run `make checkov-venv`")
    path = rendered[0]
    result = subprocess.run(
        [str(CHECKOV), "--config-file", str(K8S / "checkov.yaml"), "--directory", str(path.parent)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=path.parent,
    )
    assert result.returncode == 0, f"checkov found policy failures:\n{result.stdout}\n{result.stderr}"
    assert "Passed checks: " in result.stdout and "Passed checks: 0," not in result.stdout, result.stdout


def test_the_ingress_sends_everything_to_the_nginx_service_in_the_namespace(rendered, ingress):
    docs = rendered[1]
    service = find(docs, "Service", "nginx")
    assert ingress["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert ingress["metadata"]["labels"]["app.kubernetes.io/part-of"] == "channels-blueprint"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for rule in ingress["spec"]["rules"]:
        paths = rule["http"]["paths"]
        assert [(p["path"], p["pathType"]) for p in paths] == [("/", "Prefix")], "one path, everything"
        backend = paths[0]["backend"]["service"]
        assert backend["name"] == "nginx" and backend["port"]["name"] in port_names


def test_websocket_timeouts_are_at_least_the_blueprint_nginxs(ingress):
    annotations = ingress["metadata"]["annotations"]
    for name, nginx_seconds in _nginx_ws_timeouts().items():
        annotation = ANNOTATION + name.replace("_", "-")
        assert annotation in annotations, f"no {annotation}: ingress-nginx would cut idle sockets at its 60 s"
        # ingress-nginx takes a number of seconds.
        assert int(annotations[annotation]) >= nginx_seconds, f"{annotation} below nginx's {name} {nginx_seconds}s"


def test_the_timeout_check_reads_nginx_times():
    assert [_seconds(v) for v in ("75s", "75", "2m", "1h")] == [75, 75, 120, 3600]


def test_tls_comes_from_the_secret_cert_manager_writes_for_the_host_the_overlay_allows(rendered, ingress):
    docs = rendered[1]
    assert ingress["metadata"]["annotations"].get("cert-manager.io/cluster-issuer")
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts == {"chat.example.com"}
    tls_hosts = {host for entry in ingress["spec"]["tls"] for host in entry["hosts"]}
    assert hosts <= tls_hosts, "a host served without TLS"
    assert all(entry.get("secretName") for entry in ingress["spec"]["tls"])
    assert not of_kind(docs, "Secret"), "cert-manager writes the Secret; it is never shipped"
    daphne = find(docs, "Deployment", "daphne")
    allowed = env_value(daphne, docs, "DJANGO_ALLOWED_HOSTS").split(",")
    trusted = env_value(daphne, docs, "CSRF_TRUSTED_ORIGINS").split(",")
    for host in hosts:
        assert host in allowed, f"Django would refuse {host}"
        assert f"https://{host}" in trusted, f"Django's CSRF check would refuse forms from https://{host}"


def test_the_real_ip_settings_named_in_the_comments_are_the_nginx_images():
    comments = (COMPONENT / "kustomization.yaml").read_text()
    named = set(re.findall(r"\bNGINX_[A-Z_]+\b", comments))
    assert {"NGINX_REAL_IP_FROM", "NGINX_REAL_IP_HEADER"} <= named
    header = NGINX_TEMPLATE.read_text()
    for name in named:
        assert re.search(rf"^#\s+{name}\b", header, re.M), f"{name} is not an input of {NGINX_TEMPLATE.name}"
