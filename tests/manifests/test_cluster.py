"""What a real cluster does that compose does not, checked on the rendered
manifests: tainted and cordoned nodes, load balancers that take time to stop
sending, runtimes that start containers at 1,024 open files, and memory
limits the kernel enforces.

The numbers the sums use are measured or stated once: the app's memory per
idle socket in the kept benchmark run (loadtest/results/bench.json, README
"Performance"), and the figures below, each with how it was found.
"""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest
from django.conf import settings

from tests.manifests import sources
from tests.manifests.documents import container, env_value, find, of_kind, pod_spec, workloads
from tests.manifests.render import KUSTOMIZATIONS, OVERLAYS, ROOT, render

pytestmark = pytest.mark.manifests

MIB = 2**20
KIB = 2**10

# A Daphne replica at rest: about 85 MiB RSS (python -m realtime.server, idle);
# stated with room for the Redis client's connections and the heap's growth.
DAPHNE_AT_REST = 128 * MIB
# nginx at rest: the master and two workers, each worker's preallocated
# worker_connections about 10.5 MiB (nginx 1.22, measured as below).
NGINX_AT_REST = 32 * MIB
# nginx's memory per proxied WebSocket: 21.9 to 22.1 KiB of worker RSS per
# socket, measured with 3,000 and 6,000 sockets through one worker of this
# template (nginx 1.22, one 100-byte frame sent on each).
NGINX_PER_SOCKET = 22 * KIB
# What the common clouds' load balancers take to stop sending to a node whose
# health check fails (interval x unhealthy threshold with their defaults for
# externalTrafficPolicy: Local); nginx must keep serving that long.
LOAD_BALANCER_DEREGISTRATION_SECONDS = 30
# Left between the last thing a shutdown waits for and SIGKILL.
SHUTDOWN_MARGIN_SECONDS = 5
# Local ports for connections to one address and port (Linux's default
# ip_local_port_range, 32768-60999): nginx reaches Daphne through one
# ClusterIP, so this bounds the sockets one nginx pod can proxy.
EPHEMERAL_PORTS = 60999 - 32768 + 1


def _quantity(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", value).groups()
    return int(number) * {"Mi": MIB, "Gi": 2**30}[unit]


def _directive(name: str) -> str:
    """A directive's value in nginx's template, which must set it once."""
    values = re.findall(rf"^\s*{name}\s+([^;]+);", sources.NGINX_TEMPLATE.read_text(), re.M)
    assert len(values) == 1, f"nginx.conf.template sets {name} {len(values)} times"
    return values[0].strip()


def _nginx_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(s|m)?", value).groups()
    return float(number) * (60 if unit == "m" else 1)


def _pre_stop_seconds(workload: dict) -> int:
    return container(workload)["lifecycle"]["preStop"]["sleep"]["seconds"]


# --- scheduling ---


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_hard_spread_rules_count_only_nodes_the_pod_may_run_on(name):
    """A DoNotSchedule spread that counts a tainted or cordoned node as an
    empty domain leaves the next pod Pending; zones are only a preference."""
    for workload in workloads(render(name)):
        for rule in pod_spec(workload).get("topologySpreadConstraints", []):
            what = f"{workload['metadata']['name']} {rule['topologyKey']}"
            if rule["whenUnsatisfiable"] == "DoNotSchedule":
                assert rule["topologyKey"] == "kubernetes.io/hostname", f"{what}: a hard rule over zones"
                assert rule.get("nodeTaintsPolicy") == "Honor", f"{what}: tainted nodes count as empty"
                assert rule.get("nodeAffinityPolicy", "Honor") == "Honor", what


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_socket_tier_spreads_over_nodes(name):
    docs = render(name)
    for role in ("daphne", "nginx"):
        keys = {r["topologyKey"] for r in pod_spec(find(docs, "Deployment", role))["topologySpreadConstraints"]}
        assert "kubernetes.io/hostname" in keys, role


# --- nginx's shutdown ---


def test_nginx_stops_gracefully_on_the_images_stop_signal():
    """SIGTERM is nginx's fast shutdown (every connection cut at once);
    SIGQUIT its graceful one, which worker_shutdown_timeout bounds."""
    signals = re.findall(r"^STOPSIGNAL\s+(\S+)", (ROOT / "nginx" / "Dockerfile").read_text(), re.M)
    assert signals == ["SIGQUIT"]
    assert _nginx_seconds(_directive("worker_shutdown_timeout")) > 0


def test_a_graceful_stop_lets_every_http_request_finish():
    """Every proxied location but the WebSockets' waits on its upstream no
    longer than worker_shutdown_timeout leaves it."""
    text = sources.NGINX_TEMPLATE.read_text()
    before_locations = re.split(r"^\s*location\s", text, maxsplit=1, flags=re.M)[0]
    server_level = _nginx_seconds(_directive_in(before_locations, "proxy_read_timeout", "60s"))  # nginx's default
    shutdown = _nginx_seconds(_directive("worker_shutdown_timeout"))
    for path, body in re.findall(r"location\s+(?:=\s*)?(\S+)\s*\{(.*?)\n\s*\}", text, re.S):
        if "proxy_pass" not in body or path == "/ws/":
            continue
        own = _directive_in(body, "proxy_read_timeout", None)
        waits = _nginx_seconds(own) if own else server_level
        assert waits <= shutdown, f"location {path} waits {waits} s, the graceful stop allows {shutdown} s"


def _directive_in(text: str, name: str, default: str | None) -> str | None:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", text, re.M)
    return found[-1].strip() if found else default


@pytest.mark.parametrize("name", OVERLAYS)
def test_nginx_outlasts_load_balancer_deregistration_then_finishes_within_its_grace(name):
    nginx = find(render(name), "Deployment", "nginx")
    pause = _pre_stop_seconds(nginx)
    shutdown = _nginx_seconds(_directive("worker_shutdown_timeout"))
    grace = pod_spec(nginx)["terminationGracePeriodSeconds"]
    assert pause >= LOAD_BALANCER_DEREGISTRATION_SECONDS, f"{name}: new connections stop only after {pause} s"
    assert grace >= pause + shutdown + SHUTDOWN_MARGIN_SECONDS, (
        f"{name}: {grace} s grace < {pause} s preStop + {shutdown} s worker_shutdown_timeout + margin"
    )


# --- file limits ---


def test_the_app_entrypoint_raises_the_soft_open_file_limit_to_the_hard_one():
    """Started as a runtime with a soft limit of 1,024 starts it; the entrypoint's
    catch-all role runs the given command with the limit it set."""
    result = subprocess.run(
        ["prlimit", "--nofile=1024:4096", "bash", str(sources.ENTRYPOINT), "sh", "-c", "ulimit -Sn"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4096"]


def test_nginx_workers_may_open_a_file_per_connection():
    limit = int(_directive("worker_rlimit_nofile"))
    assert limit > int(_directive("worker_connections"))
    assert "ulimit -S -n" in (ROOT / "nginx" / "docker-entrypoint.sh").read_text()


# --- memory: the limits add up ---


def _bench_kib_per_socket() -> float:
    """RSS per idle socket of the default configuration in the kept benchmark run."""
    bench = json.loads((ROOT / "loadtest" / "results" / "bench.json").read_text())
    return bench["summaries"]["daphne-fanout"]["rss_kib_per_socket"]


def _app_setting(docs, workload: dict, variable: str) -> int:
    try:
        return int(env_value(workload, docs, variable))
    except KeyError:
        return int(getattr(settings, variable))


def _daphne_replicas_at_most(docs) -> int:
    autoscalers = [
        h for h in of_kind(docs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "daphne"
    ]
    if autoscalers:
        return autoscalers[0]["spec"]["maxReplicas"]
    return find(docs, "Deployment", "daphne")["spec"].get("replicas", 1)


def _nginx_sockets_per_pod() -> int:
    """A WebSocket is two of a worker's connections: the client's and Daphne's."""
    workers = _directive("worker_processes")
    assert workers.isdigit(), "worker_processes auto counts the node's cores, not the pod's: nothing to size for"
    return int(workers) * int(_directive("worker_connections")) // 2


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("role", ["daphne", "nginx"])
def test_socket_tiers_request_the_memory_they_may_use(name, role):
    """Sockets stay for hours, so a pod grows to its limit: requested any lower,
    an overcommitted node kills it with every socket on it."""
    resources = container(find(render(name), "Deployment", role))["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"], f"{name} {role}: {resources}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_daphne_refuses_sockets_before_its_memory_limit_is_reached(name):
    docs = render(name)
    daphne = find(docs, "Deployment", "daphne")
    limit = _quantity(container(daphne)["resources"]["limits"]["memory"])
    sockets = _app_setting(docs, daphne, "WS_MAX_CONNECTIONS")
    # Bytes the app lets slow clients' queues and the fan-out backlog hold.
    bounds = sum(_app_setting(docs, daphne, v) for v in ("WS_MAX_PENDING_BYTES_TOTAL", "FANOUT_MAX_BACKLOG_BYTES"))
    needed = DAPHNE_AT_REST + bounds + sockets * _bench_kib_per_socket() * KIB
    assert needed <= limit, (
        f"{name}: {sockets} sockets need {needed / MIB:.0f} MiB with the queue bounds, limit {limit / MIB:.0f} MiB"
    )


@pytest.mark.parametrize("name", OVERLAYS)
def test_nginx_holds_its_share_of_every_socket_daphne_may_accept(name):
    docs = render(name)
    nginx, daphne = find(docs, "Deployment", "nginx"), find(docs, "Deployment", "daphne")
    per_pod = _nginx_sockets_per_pod()
    assert per_pod <= EPHEMERAL_PORTS, "more sockets than local ports to Daphne's Service"
    limit = _quantity(container(nginx)["resources"]["limits"]["memory"])
    needed = NGINX_AT_REST + per_pod * NGINX_PER_SOCKET
    assert needed <= limit, (
        f"{name}: nginx at {per_pod} sockets needs {needed / MIB:.0f} MiB, the limit is {limit / MIB:.0f}"
    )
    sockets = _daphne_replicas_at_most(docs) * _app_setting(docs, daphne, "WS_MAX_CONNECTIONS")
    pods = nginx["spec"].get("replicas", 1)
    assert pods * per_pod >= sockets, (
        f"{name}: Daphne may hold {sockets} sockets, {pods} nginx pods {pods * per_pod}: "
        f"run {math.ceil(sockets / per_pod)}"
    )


# --- the load test's Jobs ---


def test_the_load_test_verdict_fails_the_job_and_a_disruption_does_not():
    from loadtest.thresholds import EXIT_CODES, PASS

    docs = render("loadtest")
    for job in of_kind(docs, "Job"):
        what, spec = job["metadata"]["name"], job["spec"]
        assert pod_spec(job)["restartPolicy"] == "Never", f"{what}: podFailurePolicy needs restartPolicy Never"
        rules = spec["podFailurePolicy"]["rules"]
        ignored = [r for r in rules if r["action"] == "Ignore"]
        assert [c["type"] for r in ignored for c in r.get("onPodConditions", [])] == ["DisruptionTarget"], what
    master = find(docs, "Job", "locust-master")
    failing = [r["onExitCodes"] for r in master["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    verdicts = {code for status, code in EXIT_CODES.items() if status != PASS}
    assert [(c["containerName"], c["operator"], set(c["values"])) for c in failing] == [
        (container(master)["name"], "In", verdicts)
    ]


# --- probes ---


@pytest.mark.parametrize("name", ["dev", "staging"])
def test_exec_probes_allow_for_starting_their_processes(name):
    for workload in workloads(render(name)):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            spec = container(workload).get(probe, {})
            if "exec" in spec:
                assert spec.get("timeoutSeconds", 1) >= 3, f"{workload['metadata']['name']} {probe}"
