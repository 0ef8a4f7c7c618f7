"""The manifests agree with the rest of the project: the app and its image,
nginx's template, the load test, docker-compose.yml and the README.

A port, probe path, image tag or environment name changed in one place only
fails here.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client

from deploy import render_nginx
from deploy.stack import LocalStack, nginx_binary
from tests.certificates import self_signed
from tests.manifests import sources
from tests.manifests.documents import (
    container,
    container_port,
    env_names,
    env_value,
    find,
    http_probe_path,
    of_kind,
    workloads,
)
from tests.manifests.render import KUBERNETES_VERSION, KUSTOMIZATIONS, OVERLAYS, ROOT, render

pytestmark = pytest.mark.manifests

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
APP_IMAGE_REPOSITORY = "channels-blueprint"
LOADTEST_IMAGE_REPOSITORY = "channels-blueprint-loadtest"
# Found, not imported: importing locust monkey-patches the process with gevent.
LOCUST_PACKAGE = Path(importlib.util.find_spec("locust").origin).parent
# Read by a program that is not Python or shell in this repository.
READ_ELSEWHERE = {"REDISCLI_AUTH": "redis-cli's password, for the Redis readiness probe"}
# Set by Kubernetes only, with the reason compose does without.
KUBERNETES_ONLY = {
    "POD_NAME": "the downward API names the replica; under compose the entrypoint uses the container hostname",
}


def _every_overlay(fact):
    """The value of fact(docs) in every overlay, asserted to be the same."""
    values = {name: fact(render(name)) for name in OVERLAYS}
    assert len({json.dumps(v, sort_keys=True) for v in values.values()}) == 1, f"overlays differ: {values}"
    return values[OVERLAYS[0]]


def app_probe_paths(role: str) -> dict[str, str]:
    return _every_overlay(lambda docs: {p: http_probe_path(find(docs, "Deployment", role), p) for p in PROBES})


def app_port(role: str) -> int:
    return _every_overlay(lambda docs: container_port(find(docs, "Deployment", role)))


def image(docs, kind: str, name: str) -> str:
    return container(find(docs, kind, name))["image"]


# --- the app and its image ---


async def _status(role: str, path: str, port: int) -> int:
    """A GET as the kubelet sends it: to the pod IP, which is also the Host;
    through ASGI for daphne, WSGI for gunicorn, as each serves it."""
    headers = {"HTTP_HOST": f"10.244.1.17:{port}"}
    if role == "daphne":
        return (await AsyncClient().get(path, **headers)).status_code
    return (await sync_to_async(Client().get)(path, **headers)).status_code


async def _eventually(role: str, path: str, port: int, status: int, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while await _status(role, path, port) != status:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# Roles whose readiness follows the channel layer. gunicorn's does not: its
# pages need no Redis and its broadcast API answers 503 itself
# (k8s/base/gunicorn-ready-without-redis.yaml).
READY_WITH_REDIS_ONLY = {"daphne": True, "gunicorn": False}


@pytest.mark.parametrize("role", sources.APP_ROLES)
async def test_probe_paths_are_the_apps_liveness_and_readiness(role, settings):
    """Liveness and startup answer while Redis is down (no restart storm);
    Daphne's readiness answers only while the channel layer works, gunicorn's
    whatever Redis does."""
    paths, port = app_probe_paths(role), app_port(role)
    # Readiness answers from a cached check: it follows within a cache period and a check.
    settings.READYZ_CACHE_SECONDS = 0.1
    for probe, path in paths.items():
        assert await _eventually(role, path, port, 200), f"{role} {probe} {path}"

    with socket.socket() as sock:  # a port nothing listens on: Redis is down
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{dead_port}"]},
        }
    }
    settings.READYZ_TIMEOUT_SECONDS = 1.0
    if READY_WITH_REDIS_ONLY[role]:
        assert await _eventually(role, paths["readinessProbe"], port, 503), f"{role} stayed ready with Redis down"
    else:
        await asyncio.sleep(settings.READYZ_CACHE_SECONDS + settings.READYZ_TIMEOUT_SECONDS)
        assert await _status(role, paths["readinessProbe"], port) == 200, f"{role} turned unready with Redis down"
    assert await _status(role, paths["livenessProbe"], port) == 200
    assert await _status(role, paths["startupProbe"], port) == 200


@pytest.mark.parametrize("role", sources.APP_ROLES)
async def test_scrape_annotations_point_at_the_apps_metrics(role):
    """Prometheus' pod annotations name the port and path the app serves /metrics on."""
    annotations = _every_overlay(
        lambda docs: find(docs, "Deployment", role)["spec"]["template"]["metadata"].get("annotations", {})
    )
    assert annotations.get("prometheus.io/scrape") == "true", annotations
    port = app_port(role)
    assert annotations.get("prometheus.io/port") == str(port)
    assert await _status(role, annotations.get("prometheus.io/path", "/metrics"), port) == 200


@pytest.mark.parametrize("role", sources.APP_ROLES)
def test_app_ports_are_the_ones_the_image_binds(role):
    port = app_port(role)
    bound = sources.entrypoint_port(role)
    assert port == bound, f"{role}: container port {port}, but deploy/entrypoint.sh binds {bound}"
    for name in KUSTOMIZATIONS:
        for service in of_kind(render(name), "Service"):
            if service["metadata"]["name"] == role:
                assert [p["port"] for p in service["spec"]["ports"]] == [port]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_app_image_workloads_run_an_entrypoint_role(name):
    roles = set(re.findall(r"^\s*([a-z]+)\)$", sources.ENTRYPOINT.read_text(), re.M))
    for workload in workloads(render(name)):
        spec = container(workload)
        if spec["image"].split(":")[0] in (APP_IMAGE_REPOSITORY, LOADTEST_IMAGE_REPOSITORY):
            assert "command" not in spec, "the image's entrypoint must stay in charge"
            assert spec["args"][0] in roles, f"{workload['metadata']['name']}: {spec['args'][0]!r} is not a role"


def test_one_app_image_tag_everywhere():
    """The app and load-test images are built together: one tag for both."""
    images = {
        container(w)["image"]
        for name in KUSTOMIZATIONS
        for w in workloads(render(name))
        if container(w)["image"].split(":")[0] in (APP_IMAGE_REPOSITORY, LOADTEST_IMAGE_REPOSITORY)
    }
    assert len({image.split(":")[1] for image in images}) == 1, images
    assert {image.split(":")[0] for image in images} == {APP_IMAGE_REPOSITORY, LOADTEST_IMAGE_REPOSITORY}


def _source_texts(paths) -> str:
    return "\n".join(path.read_text() for path in paths)


def _is_read(name: str, text: str) -> bool:
    return re.search(rf"""["']{name}["']|\${{{name}\b|\${name}\b""", text) is not None


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_variable_is_read_by_what_receives_it(name):
    """A misspelt variable is silently ignored by its program: each name must
    appear in the code that reads it, or be used by another variable."""
    app_code = _source_texts([*sorted((ROOT / "app").rglob("*.py")), sources.ENTRYPOINT])
    locust_code = _source_texts([LOCUST_PACKAGE / "argument_parser.py", *sorted((ROOT / "loadtest").glob("*.py"))])
    nginx_code = _source_texts([sources.NGINX_TEMPLATE, ROOT / "nginx" / "docker-entrypoint.sh"])
    docs = render(name)
    for workload in workloads(docs):
        spec = container(workload)
        repository = spec["image"].split(":")[0]
        readers = {
            APP_IMAGE_REPOSITORY: app_code,
            LOADTEST_IMAGE_REPOSITORY: locust_code,
            "channels-blueprint-nginx": nginx_code,
        }.get(repository, "")  # redis reads no variable itself: only $(...) and READ_ELSEWHERE ones
        referenced = set(re.findall(r"\$\(([A-Z0-9_]+)\)", json.dumps(spec)))
        for variable in env_names(workload, docs):
            if variable in referenced or variable in READ_ELSEWHERE:
                continue
            assert _is_read(variable, readers), f"{workload['metadata']['name']}: nothing reads {variable}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_daphne_drain_fits_in_its_grace_period(name):
    """The kubelet kills at terminationGracePeriodSeconds: the preStop pause
    and the app's drain timeout must both fit before it."""
    docs = render(name)
    daphne = find(docs, "Deployment", "daphne")
    pause = container(daphne)["lifecycle"]["preStop"]["sleep"]["seconds"]
    try:
        drain = float(env_value(daphne, docs, "DRAIN_TIMEOUT_SECONDS"))
    except KeyError:
        drain = sources.app_drain_timeout_default()
    assert daphne["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pause + drain


# --- nginx ---


@pytest.mark.parametrize("name", OVERLAYS)
def test_nginx_reaches_every_daphne_pod_by_the_headless_service(name):
    docs = render(name)
    nginx = find(docs, "Deployment", "nginx")
    assert set(env_names(nginx, docs)) - {"POD_NAMESPACE"} <= sources.nginx_inputs()
    assert int(env_value(nginx, docs, "NGINX_LISTEN_PORT")) == container_port(nginx, "http")
    assert [p["targetPort"] for p in find(docs, "Service", "nginx")["spec"]["ports"]][0] == "http"
    # Per pod: DNS answers with every ready pod, nginx connects to the pods' own port.
    daphne_service = find(docs, "Service", "daphne")["spec"]
    daphne_port = container_port(find(docs, "Deployment", "daphne"), "http")
    assert daphne_service["clusterIP"] == "None"
    assert daphne_service["ports"][0]["port"] == daphne_port
    assert env_value(nginx, docs, "DAPHNE_DNS_NAME") == f"daphne.$(POD_NAMESPACE).svc.cluster.local:{daphne_port}"
    env = container(nginx)["env"]
    namespace = next(i for i, entry in enumerate(env) if entry["name"] == "POD_NAMESPACE")
    assert env[namespace]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Kubernetes expands $(POD_NAMESPACE) only from entries defined before.
    assert namespace < next(i for i, entry in enumerate(env) if entry["name"] == "DAPHNE_DNS_NAME")
    gunicorn_port = find(docs, "Service", "gunicorn")["spec"]["ports"][0]["port"]
    assert env_value(nginx, docs, "GUNICORN_ADDRESSES") == f"gunicorn:{gunicorn_port}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_port_a_service_sends_to_nginx_is_served_and_admitted(name):
    docs = render(name)
    nginx = find(docs, "Deployment", "nginx")
    ports = {port["name"]: port["containerPort"] for port in container(nginx)["ports"]}
    admitted = {
        port["port"] for rule in find(docs, "NetworkPolicy", "nginx")["spec"]["ingress"] for port in rule["ports"]
    }
    for service in of_kind(docs, "Service"):
        if service["spec"]["selector"] != {"app.kubernetes.io/name": "nginx"}:
            continue
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']} sends to a port nginx lacks"
            assert port["targetPort"] in admitted, f"the NetworkPolicy drops {service['metadata']['name']}'s traffic"
    if "https" in ports:
        # The TLS listener is the one the template renders from these inputs.
        tls_port = {e["name"]: e.get("value") for e in container(nginx)["env"]}.get("NGINX_TLS_PORT")
        assert int(tls_port or render_nginx.image_defaults()["NGINX_TLS_PORT"]) == ports["https"]
        mounts = {m["name"]: m["mountPath"] for m in container(nginx)["volumeMounts"]}
        secrets = {
            v["name"]: v["secret"]["secretName"] for v in nginx["spec"]["template"]["spec"]["volumes"] if "secret" in v
        }
        for variable, key in (("NGINX_TLS_CERTIFICATE", "tls.crt"), ("NGINX_TLS_CERTIFICATE_KEY", "tls.key")):
            path = Path(env_value(nginx, docs, variable))
            assert path.name == key and [v for v in secrets if mounts.get(v) == str(path.parent)], path


@pytest.mark.parametrize("name", OVERLAYS)
def test_nginx_renders_a_config_nginx_accepts_from_each_overlays_environment(name, tmp_path):
    docs = render(name)
    nginx = find(docs, "Deployment", "nginx")
    namespace = nginx["metadata"]["namespace"]
    values = {
        entry["name"]: entry["value"].replace("$(POD_NAMESPACE)", namespace)
        for entry in container(nginx)["env"]
        if "value" in entry
    }
    # The cluster's names resolve only there: gunicorn's is resolved at load.
    values["GUNICORN_ADDRESSES"] = "localhost:8001"
    values["NGINX_RUNTIME_DIR"] = str(tmp_path)
    for secret_file in ("NGINX_TLS_CERTIFICATE", "NGINX_TLS_CERTIFICATE_KEY"):
        if values.get(secret_file):
            values[secret_file] = str(self_signed(tmp_path)[secret_file == "NGINX_TLS_CERTIFICATE_KEY"])
    config = tmp_path / "nginx.conf"
    config.write_text(render_nginx.render(values))
    result = subprocess.run(
        [nginx_binary(), "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"daphne.{namespace}.svc.cluster.local:8000" in config.read_text()


@pytest.mark.parametrize("name", OVERLAYS)
def test_nginx_probes_its_own_health_location(name):
    nginx = find(render(name), "Deployment", "nginx")
    for probe in ("livenessProbe", "readinessProbe"):
        assert http_probe_path(nginx, probe) in sources.nginx_exact_locations(), probe


# --- the load test ---


def _loadtest_imports(path: Path, seen: set[str]) -> set[str]:
    """loadtest/*.py files a module needs, following `from loadtest... import` transitively."""
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module == "loadtest":
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loadtest."):
            modules = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            modules = [a.name.split(".")[1] for a in node.names if a.name.startswith("loadtest.")]
        for module in modules:
            filename = f"{module}.py"
            if filename not in seen and (path.parent / filename).exists():
                seen.add(filename)
                _loadtest_imports(path.parent / filename, seen)
    return seen


def test_loadtest_configmap_holds_the_locustfile_and_everything_it_imports():
    docs = render("loadtest")
    master = find(docs, "Job", "locust-master")
    mount = next(m for m in container(master)["volumeMounts"] if m["name"] == "scenarios")
    locustfile = Path(env_value(master, docs, "LOCUST_LOCUSTFILE"))
    assert locustfile.parent == Path(mount["mountPath"]) and locustfile.name == "locustfile.py"
    scenarios = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("locust-scenarios"))
    needed = _loadtest_imports(ROOT / "loadtest" / "locustfile.py", {"__init__.py", "locustfile.py"})
    assert needed <= set(scenarios["data"]), f"missing from the ConfigMap: {sorted(needed - set(scenarios['data']))}"
    for key, text in scenarios["data"].items():
        assert text == (ROOT / "loadtest" / key).read_text(), key


def test_loadtest_waits_for_exactly_the_workers_it_starts():
    docs = render("loadtest")
    master, workers = find(docs, "Job", "locust-master"), find(docs, "Job", "locust-workers")
    expected = int(env_value(master, docs, "LOCUST_EXPECT_WORKERS"))
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == expected
    assert master["spec"]["backoffLimit"] == 0, "a failed verdict must not be retried into a pass"


@pytest.mark.parametrize("name", OVERLAYS)
def test_loadtest_reaches_nginx_under_an_allowed_host(name):
    """The sockets' Origin is the target's host: the app must allow it."""
    master = find(render("loadtest"), "Job", "locust-master")
    target = re.fullmatch(r"http://([\w.-]+):(\d+)", env_value(master, render("loadtest"), "LOCUST_HOST"))
    docs = render(name)
    assert target and target.group(1) == "nginx"
    assert int(target.group(2)) == find(docs, "Service", "nginx")["spec"]["ports"][0]["port"]
    allowed = env_value(find(docs, "Deployment", "daphne"), docs, "DJANGO_ALLOWED_HOSTS").split(",")
    assert "nginx" in allowed


# --- docker-compose.yml ---


def _dockerfile_command() -> list[str]:
    return json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.M).group(1))


def _compose_service(services: dict, role: str) -> dict:
    assert role in services, f"docker-compose.yml has no `{role}` service"
    return services[role]


def test_compose_runs_the_same_images():
    services, docs = sources.compose_services(), render("dev")
    kinds = {"daphne": "Deployment", "gunicorn": "Deployment", "nginx": "Deployment", "redis": "StatefulSet"}
    for role, kind in kinds.items():
        compose_image = sources.with_defaults(_compose_service(services, role).get("image", ""))
        assert compose_image == image(docs, kind, role), f"{role}: compose {compose_image!r}"


@pytest.mark.parametrize("role", sources.APP_ROLES)
def test_compose_runs_the_same_roles_ports_and_health_paths(role):
    service = _compose_service(sources.compose_services(), role)
    k8s = find(render("dev"), "Deployment", role)
    assert (sources.compose_command(service) or _dockerfile_command()) == container(k8s)["args"]
    checks = sources.compose_healthcheck_urls(service)
    assert checks, f"compose {role} has no http healthcheck"
    for port, path in checks:
        assert port == app_port(role), f"compose {role} healthcheck port {port}"
        assert path in app_probe_paths(role).values(), f"compose {role} healthcheck path {path}"


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("role", sources.APP_ROLES)
def test_one_default_channel_layer_in_compose_kubernetes_and_the_local_stack(role, name):
    """The layer the benchmark chose (README, Performance) is the one every way of running the app runs."""
    compose = sources.with_defaults(_compose_service(sources.compose_services(), role)["environment"]["CHANNEL_LAYER"])
    docs = render(name)
    kubernetes = env_value(find(docs, "Deployment", role), docs, "CHANNEL_LAYER")
    local = inspect.signature(LocalStack).parameters["channel_layer"].default
    assert compose == kubernetes == local, f"compose {compose}, Kubernetes {name} {kubernetes}, local stack {local}"


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("role", sources.APP_ROLES)
def test_compose_passes_every_variable_kubernetes_sets(role, name):
    """One vocabulary: a name Kubernetes sets is one compose passes too (compose
    may pass more, empty by default, for .env to fill). REDIS_PASSWORD only
    builds REDIS_URL in both; KUBERNETES_ONLY names say why compose lacks them."""
    compose = sources.compose_environment_names(_compose_service(sources.compose_services(), role))
    docs = render(name)
    kubernetes = set(env_names(find(docs, "Deployment", role), docs)) - set(KUBERNETES_ONLY) - {"REDIS_PASSWORD"}
    assert not kubernetes - compose, f"set by Kubernetes, unknown to compose's {role}: {sorted(kubernetes - compose)}"


# --- README.md ---


def test_readme_names_the_images_kubernetes_runs():
    docs = render("dev")
    expected = {
        image(docs, "Deployment", "daphne"),
        image(docs, "Deployment", "nginx"),
        image(render("loadtest"), "Job", "locust-master"),
    }
    assert sources.readme_images(sources.readme()) == expected


def test_readme_ports_are_the_container_ports():
    docs = render("dev")
    expected = {
        "daphne": app_port("daphne"),
        "gunicorn": app_port("gunicorn"),
        "nginx": container_port(find(docs, "Deployment", "nginx"), "http"),
        "redis": container_port(find(docs, "StatefulSet", "redis")),
    }
    assert sources.readme_ports(sources.readme()) == expected


def test_readme_probe_paths_are_the_ones_kubernetes_probes():
    """The README names liveness and readiness by path (`/healthz` is
    liveness, `/readyz` readiness): the paths of the roles whose readiness
    follows Redis; gunicorn's readiness is its liveness path."""
    documented = sources.readme_probe_paths(sources.readme())
    for role in sources.APP_ROLES:
        paths = app_probe_paths(role)
        assert documented["liveness"] == {paths["livenessProbe"]}, documented
        if READY_WITH_REDIS_ONLY[role]:
            assert documented["readiness"] == {paths["readinessProbe"]}, documented
        else:
            assert paths["readinessProbe"] == paths["livenessProbe"], paths


@pytest.mark.parametrize("name", OVERLAYS)
def test_readme_lists_every_variable_kubernetes_and_compose_set(name):
    documented = sources.readme_environment_names(sources.readme())
    docs, services = render(name), sources.compose_services()
    for role in sources.APP_ROLES:
        names = set(env_names(find(docs, "Deployment", role), docs))
        names |= sources.compose_environment_names(_compose_service(services, role))
        assert not names - documented, f"README.md's environment table lacks {sorted(names - documented)}"


def test_readme_states_the_kubernetes_version_the_manifests_are_validated_against():
    assert f"Kubernetes {KUBERNETES_VERSION}" in sources.readme()


def _redis_memory_options(words: list[str]) -> dict[str, str]:
    return {flag: words[words.index(flag) + 1] for flag in ("--maxmemory", "--maxmemory-policy") if flag in words}


@pytest.mark.parametrize("name", ["dev", "staging"])
def test_compose_and_kubernetes_bound_redis_memory_alike(name):
    """History lives in Redis: both bound it, with the policy that only evicts what may go."""
    redis = container(find(render(name), "StatefulSet", "redis"))
    kubernetes = _redis_memory_options(redis["command"])
    compose = _redis_memory_options(" ".join(_compose_service(sources.compose_services(), "redis")["command"]).split())
    assert kubernetes == compose, f"compose {compose} against Kubernetes {kubernetes}"
    assert kubernetes.get("--maxmemory-policy") == "volatile-lru"


# --- the settings the chaos suite validated (README, Guarantees under faults) ---

# The app settings a fault's outcome depends on: the link timeout sets when
# members of a replica cut from Redis are sent elsewhere, the drain timeout a
# SIGTERM's length, the bounds how a slow member or a backlog is cut, the
# history what a resume can recover.
FAULT_SETTINGS = (
    "REDIS_LINK_TIMEOUT_SECONDS",
    "DRAIN_TIMEOUT_SECONDS",
    "READYZ_CACHE_SECONDS",
    "READYZ_TIMEOUT_SECONDS",
    "WS_MAX_PENDING_BYTES",
    "WS_MAX_PENDING_BYTES_TOTAL",
    "FANOUT_MAX_BACKLOG_BYTES",
    "ROOM_HISTORY_SIZE",
    "ROOM_HISTORY_TTL_SECONDS",
)


def _seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)(s|m)", duration).groups()
    return float(value) * (60 if unit == "m" else 1)


@pytest.mark.parametrize("name", OVERLAYS)
def test_kubernetes_runs_the_fault_settings_the_chaos_suite_ran_under_compose(name):
    """The chaos suite runs every fault on compose: Kubernetes must run the
    same values (empty: the app's default), or its table says nothing about a cluster."""
    docs = render(name)
    daphne = find(docs, "Deployment", "daphne")
    environment = _compose_service(sources.compose_services(), "daphne")["environment"]
    for variable in FAULT_SETTINGS:
        compose = sources.with_defaults(str(environment.get(variable, "")))
        try:
            kubernetes = env_value(daphne, docs, variable)
        except KeyError:
            kubernetes = ""
        assert compose == kubernetes, f"{variable}: compose {compose!r}, Kubernetes {name} {kubernetes!r}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_kubernetes_gives_the_drain_at_least_the_time_the_chaos_suite_gave_it(name):
    daphne = find(render(name), "Deployment", "daphne")
    pause = container(daphne)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = daphne["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    compose = _seconds(_compose_service(sources.compose_services(), "daphne")["stop_grace_period"])
    assert compose > sources.app_drain_timeout_default(), "compose kills the replica before its drain ends"
    assert grace - pause >= compose, f"{name}: {grace} s grace - {pause} s preStop < compose's {compose} s"


@pytest.mark.parametrize("name", OVERLAYS)
def test_a_replica_cut_from_redis_leaves_the_service_within_the_stall_the_chaos_suite_allows(name):
    from loadtest.chaos.checker import STALL_ALLOWANCE_SECONDS

    probe = container(find(render(name), "Deployment", "daphne"))["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= STALL_ALLOWANCE_SECONDS


def test_compose_lets_nginx_finish_its_graceful_stop():
    """nginx stops on SIGQUIT and lets its workers finish for worker_shutdown_timeout:
    compose must not kill it first (Kubernetes' grace period is tested with the manifests)."""
    timeout = _seconds(re.search(r"^worker_shutdown_timeout (\w+);", sources.NGINX_TEMPLATE.read_text(), re.M).group(1))
    grace = _seconds(_compose_service(sources.compose_services(), "nginx")["stop_grace_period"])
    assert grace > timeout, f"compose stops nginx after {grace} s, its workers may take {timeout} s"
