"""TLS and the hop in front, on the real local nginx: what Django, Daphne and
the handshake limit believe about the client's scheme and address.

- nginx's own TLS listener (NGINX_TLS_*): a wss:// socket works end to end,
  and Django sees https (its CSRF check then demands a Referer, as for every
  HTTPS site); a client that writes X-Forwarded-Proto itself is not believed.
- A trusted proxy in front (NGINX_REAL_IP_FROM): its X-Forwarded-For is the
  client, so each client behind it has its own handshake budget; the same
  header from an untrusted peer changes nothing. Its X-Forwarded-Proto counts.
- PROXY protocol on the TLS listener (an L4 load balancer): the address in
  the PROXY header is the client's, in nginx's log and upstream.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import websockets

from deploy.ports import free_port
from tests.certificates import self_signed
from tests.integration.running_stack import checked_stack

pytestmark = pytest.mark.stack

TRUSTED_PROXY = "127.0.0.1"
UNTRUSTED_PEER = "127.0.0.2"
# What Django's CSRF failure page says, by what it believed about the request.
SAYS_HTTPS = "HTTPS site requires a"  # ... "Referer header": only asked of secure requests
SAYS_HTTP = "requires a CSRF cookie"  # the check an http request fails first


def tls_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def post_home(port: int, *, source: str = TRUSTED_PROXY, context=None, headers: dict | None = None) -> str:
    """POST / without a CSRF token: Django's 403 page tells which scheme it saw."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("POST", "/", body=b"", headers={"Host": "localhost", **(headers or {})})
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 403, body[:300]
    assert (SAYS_HTTPS in body) != (SAYS_HTTP in body), body[:600]
    return "https" if SAYS_HTTPS in body else "http"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def tls_listener(certificate: tuple[Path, Path]) -> tuple[int, dict[str, str]]:
    """A free port, and nginx's inputs for a TLS listener there with this certificate."""
    port = free_port()
    cert, key = certificate
    return port, {
        "NGINX_TLS_PORT": str(port),
        "NGINX_TLS_CERTIFICATE": str(cert),
        "NGINX_TLS_CERTIFICATE_KEY": str(key),
    }


@pytest.fixture(scope="module")
def tls_stack(certificate):
    tls_port, nginx_env = tls_listener(certificate)
    with checked_stack(replicas=2, nginx_env=nginx_env) as stack:
        yield stack, tls_port


def test_a_socket_over_nginxs_tls_listener_chats(tls_stack, certificate):
    stack, tls_port = tls_stack

    async def chat():
        url = f"wss://127.0.0.1:{tls_port}/ws/chat/tls-edge/"
        context = tls_context(certificate[0])
        async with (
            websockets.connect(url, ssl=context, origin="https://localhost") as a,
            websockets.connect(url, ssl=context, origin="https://localhost") as b,
        ):
            await a.recv(), await b.recv()
            await a.send(json.dumps({"message": "over TLS"}))
            return json.loads(await asyncio.wait_for(b.recv(), 5))

    assert asyncio.run(chat())["message"] == "over TLS"


def test_django_sees_https_on_the_tls_listener_and_no_client_can_claim_it(tls_stack, certificate):
    stack, tls_port = tls_stack
    assert post_home(tls_port, context=tls_context(certificate[0])) == "https"
    assert post_home(stack.port) == "http"
    # Nobody in front is trusted: a client's own X-Forwarded-Proto is replaced.
    assert post_home(stack.port, headers={"X-Forwarded-Proto": "https"}) == "http"


def statuses(port: int, source: str, client: str, count: int) -> list[int]:
    """``count`` requests on /ws/ (each one counts against the handshake
    limit), from ``source``, claiming X-Forwarded-For ``client``."""

    def some(n: int) -> list[int]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
        found = []
        try:
            for _ in range(n):
                connection.request("GET", "/ws/limit/", headers={"Host": "localhost", "X-Forwarded-For": client})
                response = connection.getresponse()
                response.read()
                found.append(response.status)
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
        finally:
            connection.close()
        return found

    with ThreadPoolExecutor(8) as pool:
        return [status for part in pool.map(some, [count // 8] * 8) for status in part]


def flood_until_limited(port: int, source: str, client: str, seconds: float = 40) -> None:
    """Spend a client's budget: 100/s with a burst of 500 (nginx.conf.template),
    so it takes a few seconds faster than 100/s, however busy the machine is."""
    deadline = time.monotonic() + seconds
    while 429 not in statuses(port, source, client, 400):
        assert time.monotonic() < deadline, f"{client} from {source} was never limited in {seconds} s"


@pytest.fixture(scope="module")
def proxied_stack():
    with checked_stack(replicas=2, nginx_env={"NGINX_REAL_IP_FROM": f"{TRUSTED_PROXY}/32"}) as stack:
        yield stack


def test_each_client_behind_a_trusted_proxy_has_its_own_handshake_budget(proxied_stack):
    port = proxied_stack.port
    flood_until_limited(port, TRUSTED_PROXY, "198.51.100.1")
    # Another client behind the same proxy is not limited by the first one's flood...
    assert 429 not in statuses(port, TRUSTED_PROXY, "198.51.100.2", 16)
    # ...and the flooding client still is.
    assert 429 in statuses(port, TRUSTED_PROXY, "198.51.100.1", 16)


def test_an_untrusted_peer_cannot_pick_its_address_or_scheme(proxied_stack):
    port = proxied_stack.port
    flood_until_limited(port, UNTRUSTED_PEER, "198.51.100.3")
    # Claiming another address does not buy a new budget: the peer is the
    # client, and its budget refills only at 100/s.
    claimed = statuses(port, UNTRUSTED_PEER, "198.51.100.4", 16)
    assert claimed.count(429) >= 8, claimed
    assert post_home(port, source=UNTRUSTED_PEER, headers={"X-Forwarded-Proto": "https"}) == "http"
    # The trusted proxy terminated TLS and says so: Django believes it.
    assert post_home(port, source=TRUSTED_PROXY, headers={"X-Forwarded-Proto": "https"}) == "https"


def test_proxy_protocol_on_the_tls_listener_names_the_client(certificate, tmp_path, monkeypatch):
    tls_port, nginx_env = tls_listener(certificate)
    nginx_env |= {"NGINX_REAL_IP_FROM": f"{TRUSTED_PROXY}/32", "NGINX_REAL_IP_HEADER": "proxy_protocol"}
    log_path = tmp_path / "stack.log"
    monkeypatch.setenv("LOG_ACCESS", "1")  # the stack shows nginx's access log
    with log_path.open("w") as log, checked_stack(replicas=1, nginx_env=nginx_env, log=log):
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            # What an L4 load balancer prepends before the client's TLS bytes.
            raw.sendall(f"PROXY TCP4 203.0.113.9 127.0.0.1 40000 {tls_port}\r\n".encode())
            with tls_context(certificate[0]).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    nginx_lines = [line for line in log_path.read_text().splitlines() if line.startswith("[nginx] ")]
    assert any(line.startswith("[nginx] 203.0.113.9 ") and "/healthz" in line for line in nginx_lines), nginx_lines
