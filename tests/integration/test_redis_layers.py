"""Two "pods": independently constructed Redis layers sharing one prefix.

A group_send on pod B must reach a member whose channel lives on pod A,
through a real redis-server, for both channels_redis backends and the
blueprint's fan-out layer built on the pub/sub one.
"""

import asyncio

import pytest
from channels_redis.core import RedisChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer
from realtime import protocol
from realtime.layers import FanoutChannelLayer

from tests.ws import join

pytestmark = pytest.mark.redis

BACKENDS = {"redis": RedisChannelLayer, "redis-pubsub": RedisPubSubChannelLayer, "redis-fanout": FanoutChannelLayer}


@pytest.mark.parametrize("kind", BACKENDS)
async def test_group_send_on_one_pod_reaches_a_member_on_another(redis_server, kind):
    pod_a = BACKENDS[kind](hosts=[redis_server.url], prefix="blueprint-test")
    pod_b = BACKENDS[kind](hosts=[redis_server.url], prefix="blueprint-test")
    try:
        member = await pod_a.new_channel()
        await pod_a.group_add("chat.cross", member)
        if kind != "redis":
            await asyncio.sleep(0.1)  # SUBSCRIBE is asynchronous in Redis pub/sub
        event = protocol.chat_event({"message": "across pods", "id": 7}, origin="pod-b")
        await pod_b.group_send("chat.cross", event)
        received = await asyncio.wait_for(pod_a.receive(member), timeout=5)
        assert received == event
        await pod_a.group_discard("chat.cross", member)
    finally:
        await pod_a.flush()
        await pod_b.flush()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_chat_consumer_receives_what_another_pod_publishes(redis_server, settings, kind):
    backend = f"{BACKENDS[kind].__module__}.{BACKENDS[kind].__name__}"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": backend, "CONFIG": {"hosts": [redis_server.url], "prefix": "bp"}}}
    member = await join("shared")
    other_pod = BACKENDS[kind](hosts=[redis_server.url], prefix="bp")
    try:
        await other_pod.group_send(
            protocol.group_name("shared"), protocol.chat_event({"message": "from b", "sent_at": 1.5}, origin="pod-b")
        )
        frame = await member.receive_json_from(timeout=5)
        # The fan-out layer's room history adds the message's place in the room.
        position = {"offset": 1, "epoch": frame.get("epoch")} if kind == "redis-fanout" else {}
        assert frame == {
            "type": "chat.message",
            "message": "from b",
            "sent_at": 1.5,
            "origin": "pod-b",
            "served_by": "pod-test",
            **position,
        }
    finally:
        await member.disconnect()
        await other_pod.flush()
