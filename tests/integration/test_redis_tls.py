"""A replica on a password-protected Redis reached over TLS (rediss://)."""

import asyncio
import json
import subprocess

import pytest
import websockets

from deploy.ports import free_port
from tests.certificates import self_signed
from tests.processes import Daphne, status_of

pytestmark = pytest.mark.redis


@pytest.fixture
def tls_redis(tmp_path):
    cert, key = self_signed(tmp_path, "redis")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", "tls-test-password", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"rediss://:tls-test-password@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_replica_serves_chat_over_tls_redis(tls_redis):
    async def chat(daphne):
        async with (
            websockets.connect(daphne.ws("/ws/chat/tls/"), origin=daphne.origin) as a,
            websockets.connect(daphne.ws("/ws/chat/tls/"), origin=daphne.origin) as b,
        ):
            await a.recv(), await b.recv()
            await a.send(json.dumps({"message": "encrypted in transit"}))
            return json.loads(await asyncio.wait_for(b.recv(), 5))

    with Daphne(tls_redis) as daphne:
        assert asyncio.run(chat(daphne))["message"] == "encrypted in transit"


def test_a_wrong_certificate_authority_keeps_the_replica_up_but_unready(tls_redis, tmp_path):
    other_ca, _ = self_signed(tmp_path, "other", common_name="other")
    untrusting = tls_redis.split("?")[0] + f"?ssl_ca_certs={other_ca}"
    with Daphne(untrusting, wait_path="/healthz") as daphne:
        response = status_of(f"http://{daphne.base}/readyz")
    assert response == 503
