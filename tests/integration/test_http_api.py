"""The HTTP side against a real Redis: broadcast reaches sockets, refuses bad bodies, readiness follows Redis."""

import asyncio
import json
import threading
import time

import pytest
import redis
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client
from prometheus_client import REGISTRY
from realtime import views
from realtime.protocol import MAX_JSON_DEPTH
from realtime.readiness import Readiness

from tests.processes import wait_for
from tests.ws import join

pytestmark = pytest.mark.redis

AUTH = {"HTTP_AUTHORIZATION": "Bearer test-broadcast-token"}
# What nginx adds to every request it proxies: the answer is then the public one.
THROUGH_NGINX = {"headers": {"X-Forwarded-For": "203.0.113.7"}}


@pytest.fixture(autouse=True)
def fresh_readiness(monkeypatch):
    """No readiness result carried over from another test (and its Redis), and none left running after it."""
    readiness = Readiness()
    monkeypatch.setattr(views, "readiness", readiness)
    yield
    loop = readiness._loop
    if loop is not None:
        # The WSGI side's checks run on a daemon thread's loop, which outlives
        # the test: a pub/sub layer's receive task there would go on retrying
        # the test's stopped Redis, and log so, for the rest of the session.
        asyncio.run_coroutine_threadsafe(cancel_all_tasks(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        wait_for(lambda: not loop.is_running(), 10, "the readiness checks' loop to stop")
        # Closed here, where no loop runs: channels_redis closes its layer's
        # connections in the loop's close, which a garbage collection would
        # otherwise call later, in the middle of another test's running loop.
        loop.close()


async def cancel_all_tasks():
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def redis_layer(redis_server, settings):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_server.url]}}
    }
    return redis_server


@pytest.fixture
def counted_checks(monkeypatch):
    """How many channel-layer round trips readiness ran."""
    checks = []
    round_trip = Readiness._round_trip

    async def counting(self):
        checks.append(time.monotonic())
        await round_trip(self)

    monkeypatch.setattr(Readiness, "_round_trip", counting)
    return checks


def layer_errors() -> float:
    return (
        REGISTRY.get_sample_value(
            "blueprint_channel_layer_errors_total", {"replica": "pod-test", "operation": "group_send"}
        )
        or 0.0
    )


def post(room: str, body: str, **headers):
    return Client().post(f"/api/rooms/{room}/messages", data=body, content_type="application/json", **headers)


async def test_broadcast_reaches_a_websocket_member_through_redis(redis_layer):
    member = await join("news")
    response = await sync_to_async(post)("news", '{"message": "from http", "id": "h-1"}', **AUTH)
    assert response.status_code == 202
    frame = await member.receive_json_from(timeout=5)
    assert frame["message"] == "from http" and frame["id"] == "h-1"
    assert frame["origin"] == "pod-test" and frame["served_by"] == "pod-test"
    await member.disconnect()


async def test_the_202_says_where_the_message_is_in_the_rooms_history(redis_server, settings):
    """On the fan-out layer the answer carries the offset and epoch members see."""
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "realtime.layers.FanoutChannelLayer", "CONFIG": {"hosts": [redis_server.url]}}
    }
    member = await join("positions")
    answers = [
        json.loads((await sync_to_async(post)("positions", f'{{"message": "{n}"}}', **AUTH)).content) for n in range(3)
    ]
    frames = [await member.receive_json_from(timeout=5) for _ in range(3)]
    await member.disconnect()
    assert [(a["epoch"], a["offset"]) for a in answers] == [(f["epoch"], f["offset"]) for f in frames]
    assert [a["offset"] for a in answers] == [frames[0]["offset"] + n for n in range(3)]


@pytest.mark.parametrize(
    "headers,status",
    [({}, 401), ({"HTTP_AUTHORIZATION": "Bearer wrong"}, 401), ({"HTTP_AUTHORIZATION": "Basic dGVzdA=="}, 401)],
)
def test_broadcast_needs_the_bearer_token(headers, status):
    response = post("news", '{"message": "x"}', **headers)
    assert response.status_code == status
    assert response["WWW-Authenticate"] == "Bearer"


def nested(levels: int) -> str:
    return '{"message": "x", "id": ' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


BAD_BODIES = {
    "not json": ("not json", "bad_json"),
    "not an object": ("[]", "bad_json"),
    "no message": ("{}", "bad_schema"),
    "message not a string": ('{"message": 1}', "bad_schema"),
    "NaN": ('{"message": NaN}', "bad_json"),
    "Infinity": ('{"message": "x", "sent_at": Infinity}', "bad_json"),
    "-Infinity": ('{"message": "x", "sent_at": -Infinity}', "bad_json"),
    "1e400": ('{"message": "x", "sent_at": 1e400}', "bad_json"),
    "10000 levels": (nested(10_000), "bad_json"),
    "33 levels": (nested(MAX_JSON_DEPTH + 1), "bad_json"),
    "id 2**64": ('{"message": "x", "id": %d}' % 2**64, "bad_schema"),
    "id 2**53": ('{"message": "x", "id": %d}' % 2**53, "bad_schema"),
    "lone surrogate": ('{"message": "\\ud800"}', "bad_json"),
    "lone surrogate key": ('{"message": "x", "\\udfff": 1}', "bad_json"),
    "not UTF-8": (b'{"message": "\xff"}', "bad_json"),
    "UTF-8 encoded surrogate": (b'{"message": "\xed\xa0\x80"}', "bad_json"),
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_broadcast_answers_each_bad_body_400_json_with_its_code_and_never_blames_redis(name, redis_layer):
    body, code = BAD_BODIES[name]
    errors_before = layer_errors()
    response = post("news", body, **AUTH)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["status"] == "error" and response.json()["code"] == code
    assert response.json()["detail"]
    assert layer_errors() == errors_before


def test_a_valid_body_at_the_edges_of_the_rules_is_published(redis_layer):
    body = '{"message": "caf\\u00e9 \\ud83d\\ude00", "id": %d, "sent_at": [%s]}' % (
        2**53 - 1,
        "[" * (MAX_JSON_DEPTH - 3) + "]" * (MAX_JSON_DEPTH - 3),
    )
    assert post("news", body, **AUTH).status_code == 202


def test_only_a_channel_layer_failure_is_503_and_counted(redis_layer, monkeypatch):
    """A bug in the publish path is a 500 with its traceback, not a Redis outage."""
    from channels_redis.core import RedisChannelLayer

    async def broken(self, group, message):
        raise TypeError("a bug, not Redis")

    monkeypatch.setattr(RedisChannelLayer, "group_send", broken)
    errors_before = layer_errors()
    with pytest.raises(TypeError, match="a bug"):
        post("news", '{"message": "x"}', **AUTH)
    assert layer_errors() == errors_before


def test_broadcast_answers_other_methods_405_json():
    response = Client().get("/api/rooms/news/messages", **AUTH)
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert response.json()["code"] == "method_not_allowed"


def test_a_body_over_djangos_own_upload_limit_is_413_not_a_bare_400(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    settings.WS_MAX_MESSAGE_BYTES = 64 * 1024
    response = post("news", '{"message": "%s"}' % ("x" * 2000), **AUTH)
    assert response.status_code == 413 and response.json()["code"] == "too_large"


def test_broadcast_rejects_an_invalid_room_and_an_oversize_body(settings):
    assert post("bad room", '{"message": "x"}', **AUTH).status_code == 404
    settings.WS_MAX_MESSAGE_BYTES = 256
    assert post("news", '{"message": "%s"}' % ("x" * 300), **AUTH).status_code == 413


def test_broadcast_is_off_without_a_configured_token(settings):
    settings.BROADCAST_TOKEN = ""
    response = post("news", '{"message": "x"}', HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 503
    assert "BROADCAST_TOKEN" in response.json()["detail"]


def test_broadcast_answers_503_when_redis_is_down(redis_layer):
    redis_layer.stop()
    errors_before = layer_errors()
    response = post("news", '{"message": "lost?"}', **AUTH)
    assert response.status_code == 503
    assert response.json()["code"] == "unavailable"
    assert layer_errors() == errors_before + 1


def settles(answer, status: int, settings) -> dict:
    """The first answer with ``status``: readiness follows Redis within the
    cache period plus one check."""
    deadline = time.monotonic() + settings.READYZ_CACHE_SECONDS + settings.READYZ_TIMEOUT_SECONDS + 2
    while True:
        response = answer()
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.content
            return response.json()
        time.sleep(0.05)


async def settles_async(client: AsyncClient, status: int, settings) -> dict:
    deadline = time.monotonic() + settings.READYZ_CACHE_SECONDS + settings.READYZ_TIMEOUT_SECONDS + 2
    while True:
        response = await client.get("/readyz")
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.content
            return response.json()
        await asyncio.sleep(0.05)


async def test_readyz_follows_redis_without_restarting_the_app(redis_layer, settings):
    client = AsyncClient()
    assert (await client.get("/readyz")).json() == {"status": "ready", "pod": "pod-test"}
    redis_layer.stop()
    body = await settles_async(client, 503, settings)
    assert body["status"] == "unavailable" and body["reason"].startswith("channel layer:")
    public = await client.get("/readyz", **THROUGH_NGINX)
    assert public.status_code == 503 and public.json() == {"status": "unavailable", "pod": "pod-test"}
    redis_layer.start()
    await settles_async(client, 200, settings)


def test_readyz_follows_redis_from_the_wsgi_side_too(redis_layer, settings):
    """gunicorn's side: no loop per request, one checks thread per process."""
    client = Client()
    for _ in range(3):
        assert client.get("/readyz").status_code == 200
    redis_layer.stop()
    body = settles(lambda: client.get("/readyz"), 503, settings)
    assert body["reason"].startswith("channel layer:")
    assert client.get("/readyz", **THROUGH_NGINX).json() == {"status": "unavailable", "pod": "pod-test"}
    assert "reason" not in client.get("/readyz", **THROUGH_NGINX).json()


def test_draining_and_overload_are_503_at_once_without_a_check(monkeypatch, counted_checks):
    from realtime.replica import state

    client = Client()
    for flag in ("draining", "overloaded"):
        with monkeypatch.context() as patch:
            patch.setattr(state, flag, True)
            response = client.get("/readyz")
            assert response.status_code == 503 and response.json()["reason"] == flag
            assert client.get("/readyz", **THROUGH_NGINX).json() == {"status": "unavailable", "pod": "pod-test"}
    assert counted_checks == []


def test_parallel_readyz_on_the_wsgi_side_share_one_check(redis_layer, counted_checks, settings):
    settings.READYZ_CACHE_SECONDS = 30  # no second check inside the test, however slow the machine
    answers = []

    def ask():
        answers.append(Client().get("/readyz").status_code)

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * 50
    assert len(counted_checks) == 1


async def test_parallel_readyz_on_the_asgi_side_share_one_check(redis_layer, counted_checks, settings):
    settings.READYZ_CACHE_SECONDS = 30
    client = AsyncClient()
    answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
    assert [answer.status_code for answer in answers] == [200] * 50
    assert len(counted_checks) == 1


def test_a_stale_result_is_answered_at_once_and_refreshed_in_the_background(redis_layer, counted_checks, settings):
    settings.READYZ_CACHE_SECONDS = 0.2
    client = Client()
    assert client.get("/readyz").status_code == 200
    time.sleep(0.3)  # stale, still within cache + timeout: answered without waiting
    redis_layer.stop()
    started = time.monotonic()
    assert client.get("/readyz").status_code == 200
    assert time.monotonic() - started < 0.5
    # ... and the request started the refresh, which finds Redis gone.
    wait_for(lambda: len(counted_checks) == 2, 2, "the background check")
    settles(lambda: client.get("/readyz"), 503, settings)


def test_healthz_does_not_depend_on_redis(redis_layer):
    redis_layer.stop()
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json()["pod"] == "pod-test"


def test_pages_render_and_invalid_rooms_are_404():
    client = Client()
    assert client.get("/").status_code == 200
    page = client.get("/chat/lobby/")
    assert page.status_code == 200
    assert b'id="served-by"' in page.content and b"chat.js" in page.content
    assert client.get("/chat/bad%20room/").status_code == 404
    assert client.get("/?room=lobby")["Location"] == "/chat/lobby/"


def test_readiness_checks_reuse_one_channel_and_leave_no_subscriptions_behind(redis_server, settings, counted_checks):
    """The pub/sub layers keep a channel subscribed until a receive on it is cancelled."""
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [redis_server.url]}}
    }
    settings.READYZ_CACHE_SECONDS = 0.01
    settings.READYZ_TIMEOUT_SECONDS = 0.3
    client = Client()
    for _ in range(10):
        assert client.get("/readyz").status_code == 200
        time.sleep(0.35)  # past cache + timeout: the next request waits for a check of its own
    assert len(counted_checks) == 10
    assert len(redis.Redis.from_url(redis_server.url).pubsub_channels()) == 1
