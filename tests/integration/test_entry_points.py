"""The two ways the app is started by hand, as real processes.

* ``DJANGO_DEBUG=1 python app/manage.py runserver`` alone: echo and chat work.
* ``CHANNEL_LAYER=redis daphne config.asgi:application``: chat works, and
  /readyz follows Redis (503 within 5 s of it stopping, 200 when it is back)
  while Daphne stays up.
"""

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
import websockets

from deploy.ports import free_port
from tests.processes import start, status_of, stop, wait_for

pytestmark = pytest.mark.redis


async def chat_and_echo(base: str) -> None:
    origin = base.replace("ws://", "http://")
    async with websockets.connect(f"{base}/ws/echo/", origin=origin) as echo:
        await echo.send(json.dumps({"message": "hello"}))
        assert json.loads(await echo.recv())["message"] == "hello"
    async with (
        websockets.connect(f"{base}/ws/chat/x/", origin=origin) as a,
        websockets.connect(f"{base}/ws/chat/x/", origin=origin) as b,
    ):
        assert json.loads(await a.recv())["type"] == "welcome"
        assert json.loads(await b.recv())["type"] == "welcome"
        await a.send(json.dumps({"message": "to the room"}))
        assert json.loads(await asyncio.wait_for(b.recv(), 5))["message"] == "to the room"


def test_runserver_alone_serves_echo_and_chat():
    port = free_port()
    process = start(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], {"DJANGO_DEBUG": "1"}
    )
    try:
        wait_for(lambda: status_of(f"http://127.0.0.1:{port}/healthz") == 200, 30, "runserver")
        asyncio.run(chat_and_echo(f"ws://127.0.0.1:{port}"))
    finally:
        stop(process)


def test_daphne_on_redis_follows_redis_readiness_and_stays_up(redis_server):
    port = free_port()
    daphne = str(Path(sys.executable).with_name("daphne"))
    env = {
        "CHANNEL_LAYER": "redis",
        "REDIS_URL": redis_server.url,
        "DJANGO_SECRET_KEY": "entry-point-test-key",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "POD_NAME": "daphne-entry",
    }
    process = start([daphne, "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"], env)
    readyz = f"http://127.0.0.1:{port}/readyz"
    try:
        wait_for(lambda: status_of(readyz) == 200, 30, "daphne ready")
        asyncio.run(chat_and_echo(f"ws://127.0.0.1:{port}"))

        stopped_at = time.monotonic()
        redis_server.stop()
        unready_at = wait_for(lambda: status_of(readyz) == 503, 5, "503 after Redis stopped")
        print(f"/readyz turned 503 {unready_at - stopped_at:.2f} s after Redis stopped")
        assert process.poll() is None, "daphne exited when Redis stopped"
        assert status_of(f"http://127.0.0.1:{port}/healthz") == 200

        redis_server.start()
        wait_for(lambda: status_of(readyz) == 200, 10, "200 after Redis came back")
        asyncio.run(chat_and_echo(f"ws://127.0.0.1:{port}"))
    finally:
        output = stop(process)
    assert "Traceback" not in output, output
