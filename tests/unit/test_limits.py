"""Per-socket and per-replica limits, the drain flag, metrics and log format."""

import asyncio
import json
import logging

from config.logging import JsonFormatter
from django.test import Client
from realtime.limits import TokenBucket
from realtime.replica import state

from tests.ws import connect, join


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back at 2 a second
    assert bucket.take() and not bucket.take()


async def test_a_flood_gets_rate_limited_frames_then_close_1008(settings):
    settings.WS_RATE_LIMIT_PER_SECOND = 1
    settings.WS_RATE_LIMIT_BURST = 3
    settings.WS_RATE_LIMIT_CLOSE_AFTER_SECONDS = 0.3
    socket, _ = await connect("/ws/echo/")
    replies = []
    for index in range(20):
        await socket.send_json_to({"message": index})
        output = await socket.receive_output()
        if output["type"] == "websocket.close":
            break
        replies.append(json.loads(output["text"]))
        await asyncio.sleep(0.05)
    assert output == {"type": "websocket.close", "code": 1008}
    assert [r.get("message") for r in replies[:3]] == [0, 1, 2]
    assert all(r.get("code") == "rate_limited" for r in replies[3:])
    # Refused for 0.3 s at 20 frames a second: closed after about 6 refusals, not 20.
    assert 4 <= len(replies) - 3 <= 9


async def test_a_flood_that_interleaves_accepted_frames_is_still_closed(settings):
    """Just over the rate, every other frame is accepted; a count of refusals
    in a row never grows, but the time spent over the rate does."""
    settings.WS_RATE_LIMIT_PER_SECOND = 10
    settings.WS_RATE_LIMIT_BURST = 1
    settings.WS_RATE_LIMIT_CLOSE_AFTER_SECONDS = 0.5
    socket, _ = await connect("/ws/api/")
    statuses = []
    for index in range(40):
        await socket.send_json_to({"request": index})
        output = await socket.receive_output()
        if output["type"] == "websocket.close":
            break
        statuses.append(json.loads(output["text"])["status"])
        await asyncio.sleep(0.05)  # 20 a second against a rate of 10
    assert output == {"type": "websocket.close", "code": 1008}
    assert "OK" in statuses[1:] and "error" in statuses
    assert len(statuses) < 20


async def test_a_short_burst_is_refused_but_not_closed(settings):
    settings.WS_RATE_LIMIT_PER_SECOND = 1
    settings.WS_RATE_LIMIT_BURST = 1
    settings.WS_RATE_LIMIT_CLOSE_AFTER_SECONDS = 5
    socket, _ = await connect("/ws/api/")
    await socket.send_json_to({"request": 1})
    await socket.send_json_to({"request": 2})
    assert (await socket.receive_json_from())["status"] == "OK"
    assert "rate_limited" in (await socket.receive_json_from())["error"]
    assert await socket.receive_nothing(timeout=0.1)
    await socket.disconnect()


async def test_sockets_beyond_the_replica_limit_are_closed_with_1013(settings):
    settings.WS_MAX_CONNECTIONS = state.open_sockets + 1
    first = await join("full")
    extra, accepted = await connect("/ws/chat/full/")
    assert accepted
    assert await extra.receive_output() == {"type": "websocket.close", "code": 1013}
    await first.disconnect()
    again = await join("full")  # room again once the first one left
    await again.disconnect()


async def test_a_draining_replica_refuses_new_sockets(monkeypatch):
    monkeypatch.setattr(state, "draining", True)
    _, connected = await connect("/ws/echo/")
    assert not connected


def test_readyz_reports_draining(monkeypatch):
    monkeypatch.setattr(state, "draining", True)
    response = Client().get("/readyz")
    assert response.status_code == 503 and response.json()["reason"] == "draining"


def test_operational_endpoints_answer_any_host_header():
    """Probes and scrapes address pods by IP; the app must not answer them 400."""
    client = Client(HTTP_HOST="10.1.2.3:8000")
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/").status_code == 400  # everything else still checks Host


async def test_metrics_count_sockets_messages_and_refusals():
    socket = await join("metered")
    await socket.send_to(text_data="not json")
    await socket.receive_json_from()
    await socket.send_json_to({"message": "counted"})
    await socket.receive_json_from()
    body = Client().get("/metrics").content.decode()
    assert 'blueprint_ws_open_sockets{endpoint="chat",replica="pod-test"}' in body
    assert 'blueprint_ws_frames_refused_total{code="bad_json",replica="pod-test"}' in body
    assert "blueprint_group_send_seconds_bucket" in body
    await socket.disconnect()


def test_json_logs_carry_the_replica():
    record = logging.LogRecord("realtime", logging.WARNING, __file__, 1, "group_send to %s failed", ("chat.x",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "group_send to chat.x failed"
    assert entry["level"] == "warning" and entry["logger"] == "realtime"
    assert entry["replica"]
