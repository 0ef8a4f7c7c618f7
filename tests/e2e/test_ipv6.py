"""The images on a dual-stack network: Daphne, gunicorn and nginx answer on
IPv6 and IPv4 alike, and nginx reaches both pools by the names Docker's DNS
answers with, as in an IPv6 or dual-stack Kubernetes cluster.

Docker's default networks have no IPv6 (the other container tests run
there, on the images' IPv4-only path); this test makes a network that does.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request

import pytest

from loadtest.compose_stack import APP_IMAGE, NGINX_APP_IMAGE, run
from loadtest.fanout_check import HTTP

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


def status(url: str) -> int:
    try:
        with HTTP.open(urllib.request.Request(url, headers={"Host": "localhost"}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def addresses(container: str) -> tuple[str, str]:
    """The container's IPv4 and IPv6 addresses on its one network."""
    template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}"
    out = run(["docker", "inspect", "--format", template, container], 30).stdout.split()
    assert len(out) == 2, f"{container} has no IPv6 address: {out}"
    return out[0], out[1]


def wait_for_status(url: str, wanted: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            last = status(url)
            if last == wanted:
                return
        except OSError as error:
            last = error
        time.sleep(0.5)
    raise AssertionError(f"{url} answered {last}, not {wanted}, within {seconds} s")


@pytest.fixture
def dual_stack_network(offline_images):
    name = f"blueprint-v6-{secrets.token_hex(3)}"
    prefix = f"fd00:{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}::"
    run(["docker", "network", "create", "--ipv6", "--subnet", f"{prefix}/64", name], 60)
    containers: list[str] = []
    try:
        yield name, containers
    finally:
        if containers:
            run(["docker", "rm", "--force", *containers], 60)
        run(["docker", "network", "rm", name], 60)


def test_every_server_answers_on_ipv6_and_ipv4(dual_stack_network):
    network, containers = dual_stack_network
    app_env = [
        "-e", f"DJANGO_SECRET_KEY={secrets.token_urlsafe(50)}",
        "-e", "DJANGO_ALLOWED_HOSTS=localhost",
        # No Redis: liveness and routing are what this test is about.
        "-e", "REDIS_URL=redis://:unused@redis.invalid:6379/0",
    ]  # fmt: skip

    def start(name: str, *args: str) -> str:
        full = f"{network}-{name}"
        run(["docker", "run", "--detach", "--name", full, "--network", network, "--network-alias", name,
             "--read-only", "--tmpfs", "/tmp", *args], 60)  # fmt: skip
        containers.append(full)
        return full

    daphne = start("daphne", *app_env, APP_IMAGE, "daphne")
    gunicorn = start("gunicorn", *app_env, APP_IMAGE, "gunicorn")
    nginx = start(
        "nginx", "-e", "DAPHNE_DNS_NAME=daphne:8000", "-e", "GUNICORN_ADDRESSES=gunicorn:8001", NGINX_APP_IMAGE
    )

    for container, port, path in (
        (daphne, 8000, "/healthz"),
        (gunicorn, 8001, "/healthz"),
        (nginx, 8080, "/nginx-health"),
    ):
        ipv4, ipv6 = addresses(container)
        wait_for_status(f"http://[{ipv6}]:{port}{path}", 200)
        assert status(f"http://{ipv4}:{port}{path}") == 200
    ipv4, ipv6 = addresses(nginx)
    for base in (f"http://[{ipv6}]:8080", f"http://{ipv4}:8080"):
        # Through nginx to gunicorn, and to the Daphne pool resolved by name:
        # Django answers (404 for a path it has no route for), not nginx's 502.
        assert status(f"{base}/healthz") == 200
        assert status(f"{base}/ws/no-such-route/") == 404
