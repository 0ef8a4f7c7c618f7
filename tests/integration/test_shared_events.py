"""A room's members on one replica share one decoded event (the fan-out
layer), so a consumer that tries to change it must fail, alone and loudly,
and its roommates must get the event as it was published."""

import logging

import pytest
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import re_path
from realtime.consumers import ChatConsumer

pytestmark = pytest.mark.redis


class MeddlingChatConsumer(ChatConsumer):
    """A member whose handler rewrites the event it is handed, as a careless new feature might."""

    async def chat_message(self, event: dict) -> None:
        event["message"] = event["message"].upper()
        await super().chat_message(event)


application = URLRouter(
    [
        re_path(r"^ws/chat/(?P<room>[^/]+)/$", ChatConsumer.as_asgi()),
        re_path(r"^ws/meddle/(?P<room>[^/]+)/$", MeddlingChatConsumer.as_asgi()),
    ]
)


async def member(path: str) -> WebsocketCommunicator:
    socket = WebsocketCommunicator(application, path)
    connected, _ = await socket.connect()
    assert connected
    assert (await socket.receive_json_from(timeout=5))["type"] == "welcome"
    return socket


@pytest.fixture
def fanout_layer(redis_server, settings):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "realtime.layers.FanoutChannelLayer", "CONFIG": {"hosts": [redis_server.url]}}
    }


async def test_a_consumer_that_changes_a_shared_event_fails_alone_and_its_roommates_get_it_unchanged(
    fanout_layer, caplog
):
    # Meddlers before and after the others: whatever order the layer hands
    # the event out in, one of them comes before a roommate.
    meddler = await member("/ws/meddle/shared/")
    roommates = [await member("/ws/chat/shared/") for _ in range(3)]
    late_meddler = await member("/ws/meddle/shared/")
    with caplog.at_level(logging.ERROR, logger="realtime.consumers"):
        await roommates[0].send_json_to({"message": "hello", "id": ["a", 1]})
        frames = [await roommate.receive_json_from(timeout=5) for roommate in roommates]
        for socket in (meddler, late_meddler):
            assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": 1011}
    assert [(frame["message"], frame["id"]) for frame in frames] == [("hello", ["a", 1])] * 3
    assert caplog.text.count("is read-only") == 2, caplog.text
    # The room goes on for the others.
    await roommates[1].send_json_to({"message": "still here"})
    assert [(await roommate.receive_json_from(timeout=5))["message"] for roommate in roommates] == ["still here"] * 3
    for socket in roommates:
        await socket.disconnect()
