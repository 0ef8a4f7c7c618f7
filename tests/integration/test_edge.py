"""The public edge, as real processes: nginx in front of Daphne and gunicorn.

No header or path a client writes reaches /metrics or a page through a root
path, public /readyz says no more than ready or not, and readiness is cheap
enough that a burst of probes leaves the broadcast API alone.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings

from tests.integration.running_stack import checked_stack
from tests.processes import wait_for

pytestmark = pytest.mark.stack

METRICS_MARK = "blueprint_ws_open_sockets"
# The oldest readiness result a process may still answer from (the stack runs the defaults).
RESULT_LIFETIME = settings.READYZ_CACHE_SECONDS + settings.READYZ_TIMEOUT_SECONDS + 0.5
TRICK_PATHS = [
    "/metrics",
    "/metrics/",
    "//metrics",
    "/./metrics",
    "/%6Detrics",
    "/%6detrics",
    "/metrics?x=1",
    "/metrics;x",
    "/metrics%3Bx",
    "/static/../metrics",
    "/ws/metrics",
    "/ws/../metrics",
    "/ws/%2e%2e/metrics",
    "/ws/..%2Fmetrics",
    "/ws//metrics",
    "/ws/./metrics",
    "/ws/%6Detrics",
    "/ws/metrics?x=1",
    "/ws/metrics;x",
    "/ws/ws/metrics",
    "/METRICS",
    "http://127.0.0.1/metrics",
    "http://127.0.0.1/ws/metrics",
    "http://127.0.0.1/ws/../metrics",
]
TRICK_HEADERS = [
    {},
    {"Daphne-Root-Path": "/ws"},
    {"Daphne-Root-Path": "/ws/"},
    {"Daphne-Root-Path": "/ws/ws"},
    {"X-Forwarded-Prefix": "/ws"},
    {"X-Forwarded-Host": "metrics.internal", "X-Forwarded-Port": "9100", "X-Forwarded-Proto": "https"},
    {"SCRIPT_NAME": "/ws", "PATH_INFO": "/metrics"},
    {"Daphne-Root-Path": "/ws", "X-Forwarded-Prefix": "/ws", "X-Forwarded-Host": "evil", "X-Forwarded-For": "10.0.0.1"},
]


def raw_get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, str]:
    """(status, body) of a request sent exactly as written: no client normalizes the path.
    HTTP/1.0, so no server answers in chunks."""
    lines = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def post_json(port: int, path: str, body: str, token: str) -> int:
    data = body.encode()
    request = (
        f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return int(sock.recv(64).split()[1])


@pytest.fixture(scope="module")
def stack():
    with checked_stack(replicas=2) as running:
        yield running


@pytest.mark.parametrize("headers", TRICK_HEADERS, ids=lambda headers: ",".join(headers) or "no-headers")
def test_no_path_or_header_trick_reaches_metrics_through_nginx(stack, headers):
    for path in TRICK_PATHS:
        status, body = raw_get(stack.port, path, headers)
        assert METRICS_MARK not in body, f"{path} with {headers} served the metrics ({status})"
        assert status in {400, 404}, f"{path} with {headers}: {status} {body[:200]}"


@pytest.mark.parametrize("path", ["/ws/", "/ws/chat/lobby/", "/ws/healthz", "/ws/readyz", "/ws/api/rooms/x/messages"])
def test_no_root_path_makes_daphne_serve_pages_through_nginx(stack, path):
    for root in ("/ws", "/ws/"):
        status, body = raw_get(stack.port, path, {"Daphne-Root-Path": root})
        assert status == 404, f"{path} with root path {root}: {status} {body[:200]}"
        assert "chat.js" not in body and '"pod"' not in body


def test_the_replicas_and_gunicorn_refuse_a_root_path_themselves(stack):
    """Defence in depth: straight to the pod ports, where nginx cannot clear the headers."""
    for name, port in stack.replica_ports.items():
        assert METRICS_MARK in raw_get(port, "/metrics")[1], f"{name} no longer serves its scrapes"
        for path, headers in [
            ("/ws/metrics", {"Daphne-Root-Path": "/ws"}),
            ("/ws/", {"Daphne-Root-Path": "/ws"}),
            ("/ws/readyz", {"Daphne-Root-Path": "/ws"}),
            ("/metrics", {"Daphne-Root-Path": "/metrics"}),
        ]:
            status, body = raw_get(port, path, headers)
            assert (status, json.loads(body)["code"]) == (404, "not_found"), f"{name} {path}: {status} {body[:200]}"
    # gunicorn takes SCRIPT_NAME from a peer in its forwarded_allow_ips (127.0.0.1).
    status, body = raw_get(stack.gunicorn_port, "/ws/metrics", {"SCRIPT_NAME": "/ws"})
    assert status == 404 and METRICS_MARK not in body


def test_a_burst_of_readyz_leaves_the_broadcast_api_latency_alone(stack):
    """Each round fires 50 /readyz at once through nginx to gunicorn's two
    workers, and a broadcast among them. With a round trip per probe (about
    105 ms each under gunicorn) the broadcast waited seconds behind them."""

    def broadcast_seconds() -> float:
        started = time.perf_counter()
        assert post_json(stack.port, "/api/rooms/edge/messages", '{"message": "m"}', stack.broadcast_token) == 202
        return time.perf_counter() - started

    for _ in range(5):
        broadcast_seconds()  # warm connections and the layer
    idle = statistics.median(broadcast_seconds() for _ in range(20))
    busy_times, probes = [], []
    with ThreadPoolExecutor(50) as pool:
        for _ in range(20):
            burst = [pool.submit(raw_get, stack.port, "/readyz") for _ in range(50)]
            busy_times.append(broadcast_seconds())
            probes += [probe.result()[0] for probe in burst]
    busy = statistics.median(busy_times)
    assert probes == [200] * 1000
    report = f"broadcast p50 {idle * 1000:.1f} ms idle, {busy * 1000:.1f} ms among bursts of 50 /readyz"
    print(report)
    assert busy < max(5 * idle, 0.1), report


def test_public_readyz_is_reason_less_and_the_pod_port_says_why_during_an_outage(stack):
    assert json.loads(raw_get(stack.port, "/readyz")[1]) == {"status": "ready", "pod": "gunicorn"}
    stack.redis.stop()
    try:
        wait_for(lambda: raw_get(stack.port, "/readyz")[0] == 503, 10, "public /readyz to follow Redis")
        # Each gunicorn worker keeps its own result; by now none is from before the outage.
        time.sleep(RESULT_LIFETIME)
        for headers in TRICK_HEADERS:
            status, body = raw_get(stack.port, "/readyz", headers)
            assert status == 503 and json.loads(body) == {"status": "unavailable", "pod": "gunicorn"}, headers
            assert str(stack.redis.port) not in body and stack.redis.password not in body
        pods = {"gunicorn": stack.gunicorn_port, **stack.replica_ports}
        for name, port in pods.items():
            wait_for(lambda port=port: raw_get(port, "/readyz")[0] == 503, 10, f"{name} /readyz to follow Redis")
            answer = json.loads(raw_get(port, "/readyz")[1])
            # Its round trip fails, or its subscription link says so first.
            reason = answer["reason"]
            assert answer["pod"] == name and (reason.startswith("channel layer:") or "Redis" in reason), answer
    finally:
        stack.redis.start()
    for name, port in {"nginx": stack.port, **stack.replica_ports}.items():
        wait_for(lambda port=port: raw_get(port, "/readyz")[0] == 200, 20, f"{name} /readyz after Redis is back")
