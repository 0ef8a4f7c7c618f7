"""The HTTP side against a real Redis: broadcast reaches sockets, readiness follows Redis."""
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, Client

from tests.ws import join

pytestmark = pytest.mark.redis

AUTH = {"HTTP_AUTHORIZATION": "Bearer test-broadcast-token"}


@pytest.fixture
def redis_layer(redis_server, settings):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_server.url]}}
    }
    return redis_server


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


@pytest.mark.parametrize(
    "headers,status",
    [({}, 401), ({"HTTP_AUTHORIZATION": "Bearer wrong"}, 401), ({"HTTP_AUTHORIZATION": "Basic dGVzdA=="}, 401)],
)
def test_broadcast_needs_the_bearer_token(headers, status):
    response = post("news", '{"message": "x"}', **headers)
    assert response.status_code == status
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "body,code", [("not json", "bad_json"), ("[]", "bad_json"), ("{}", "bad_schema"), ('{"message": 1}', "bad_schema")]
)
def test_broadcast_rejects_a_bad_body_with_400(body, code):
    response = post("news", body, **AUTH)
    assert response.status_code == 400
    assert response.json()["code"] == code


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
    response = post("news", '{"message": "lost?"}', **AUTH)
    assert response.status_code == 503
    assert response.json()["code"] == "unavailable"


async def test_readyz_follows_redis_without_restarting_the_app(redis_layer):
    client = AsyncClient()
    assert (await client.get("/readyz")).status_code == 200
    redis_layer.stop()
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reason"].startswith("channel layer:")
    redis_layer.start()
    assert (await client.get("/readyz")).status_code == 200


def test_readyz_works_from_the_wsgi_side_too(redis_layer):
    """gunicorn serves the async view through async_to_sync, a new loop per request."""
    client = Client()
    for _ in range(3):
        assert client.get("/readyz").status_code == 200
    redis_layer.stop()
    assert client.get("/readyz").status_code == 503


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
