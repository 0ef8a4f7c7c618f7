"""A replica through SIGTERM, a Redis restart and a SIGKILLed neighbour, as real processes."""

import asyncio
import json
import signal
import time

import pytest
import redis
import websockets
from channels_redis.core import RedisChannelLayer
from realtime import protocol

from tests.processes import Daphne, status_of, wait_for

pytestmark = pytest.mark.redis


async def join(daphne: Daphne, room: str):
    socket = await websockets.connect(daphne.ws(f"/ws/chat/{room}/"), origin=daphne.origin)
    welcome = json.loads(await socket.recv())
    assert welcome["type"] == "welcome"
    return socket


async def next_chat(socket, timeout: float):
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), timeout))
        if frame.get("type") == "chat.message":
            return frame


def members(redis_server, room: str) -> int:
    return redis.Redis.from_url(redis_server.url).zcard(f"asgi:group:{protocol.group_name(room)}")


def test_sigterm_closes_sockets_with_1001_leaves_groups_and_exits(redis_server):
    async def scenario(daphne):
        sockets = [await join(daphne, "drain") for _ in range(5)]
        assert members(redis_server, "drain") == 5
        daphne.process.send_signal(signal.SIGTERM)
        codes = []
        for socket in sockets:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), 5)
            codes.append(socket.close_code)
        return codes

    with Daphne(redis_server.url, DRAIN_TIMEOUT_SECONDS="5") as daphne:
        started = time.monotonic()
        codes = asyncio.run(scenario(daphne))
        assert codes == [1001] * 5
        daphne.process.wait(timeout=10)
        exited_after = time.monotonic() - started
    assert daphne.process.returncode == 0, daphne.output
    assert "drained 5 sockets; 0 still open at exit" in daphne.output
    assert exited_after < 5, f"drain took {exited_after:.1f} s"
    assert members(redis_server, "drain") == 0, "the drained replica left members behind"


def test_a_socket_older_than_group_expiry_still_receives(redis_server):
    """The membership keeper refreshes live members; without it they expire."""

    async def scenario(daphne):
        member = await join(daphne, "longlived")
        await asyncio.sleep(7)  # more than twice CHANNEL_GROUP_EXPIRY
        other_pod = RedisChannelLayer(hosts=[redis_server.url], group_expiry=3)
        await other_pod.group_send("chat.longlived", protocol.chat_event({"message": "still there?"}, origin="other"))
        frame = await next_chat(member, 5)
        await other_pod.flush()
        await member.close()
        return frame

    with Daphne(redis_server.url, CHANNEL_GROUP_EXPIRY="3") as daphne:
        assert asyncio.run(scenario(daphne))["message"] == "still there?"


def test_a_killed_replicas_members_expire_within_group_expiry(redis_server):
    async def scenario(doomed, survivor):
        dead = [await join(doomed, "stale") for _ in range(30)]
        alive = await join(survivor, "stale")
        assert members(redis_server, "stale") == 31
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=5)
        await asyncio.sleep(5)  # past CHANNEL_GROUP_EXPIRY=3, and the survivor keeps refreshing its own member
        publisher = await join(survivor, "stale")
        await publisher.send(json.dumps({"message": "after the kill"}))
        assert (await next_chat(alive, 5))["message"] == "after the kill"
        for socket in dead:
            socket.transport.abort()
        await publisher.close()
        await alive.close()

    with (
        Daphne(redis_server.url, name="doomed", CHANNEL_GROUP_EXPIRY="3") as doomed,
        Daphne(redis_server.url, name="survivor", CHANNEL_GROUP_EXPIRY="3") as survivor,
    ):
        asyncio.run(scenario(doomed, survivor))
        # group_send pruned the dead members: later sends write to 2 channels, not 32.
        assert members(redis_server, "stale") <= 2


LAYERS = ["redis", "redis-pubsub", "redis-fanout"]


@pytest.mark.parametrize("layer", LAYERS)
def test_the_replica_stays_ready_while_sockets_are_open(redis_server, layer):
    """Readiness is a layer round trip; it must not wait behind the open sockets' own receives."""

    async def scenario(daphne):
        sockets = [await join(daphne, "steady") for _ in range(3)]
        statuses = []
        for _ in range(8):
            statuses.append(await asyncio.to_thread(status_of, f"http://{daphne.base}/readyz"))
            await asyncio.sleep(0.2)
        for socket in sockets:
            await socket.close()
        return statuses

    with Daphne(redis_server.url, CHANNEL_LAYER=layer) as daphne:
        assert asyncio.run(scenario(daphne)) == [200] * 8


@pytest.mark.parametrize("layer", LAYERS)
def test_fanout_resumes_within_10_s_after_a_redis_restart(redis_server, layer):
    async def scenario(daphne):
        member = await join(daphne, "outage")
        redis_server.stop()
        await asyncio.sleep(1)
        try:
            await member.send(json.dumps({"message": "during the outage"}))
            error = json.loads(await asyncio.wait_for(member.recv(), 10))
            assert error["type"] == "error" and error["code"] == "unavailable"
        except websockets.ConnectionClosed:
            # The fan-out layer watches its link: a broken one sends the
            # replica's room members to resume elsewhere (1012), here once
            # Redis is back.
            assert layer == "redis-fanout" and member.close_code == 1012, member.close_code
            member = None
        # Readiness answers from a cached check: it follows within the cache
        # period plus one check.
        await asyncio.to_thread(wait_for, lambda: status_of(f"http://{daphne.base}/readyz") == 503, 5, "not ready")

        redis_server.start()
        back = time.monotonic()
        publisher = None
        while time.monotonic() - back < 10:
            try:
                member = member or await join(daphne, "outage")
                publisher = publisher or await join(daphne, "outage")
                await publisher.send(json.dumps({"message": "probe"}))
                await next_chat(member, 0.5)
                await publisher.close()
                await member.close()
                return time.monotonic() - back
            except (TimeoutError, OSError, websockets.InvalidStatus):
                continue
        raise AssertionError("the member received nothing for 10 s after Redis came back")

    with Daphne(redis_server.url, CHANNEL_LAYER=layer) as daphne:
        resumed_after = asyncio.run(scenario(daphne))
        print(f"{layer}: fan-out resumed {resumed_after:.1f} s after Redis came back")
        assert daphne.process.poll() is None
        wait_for(lambda: status_of(f"http://{daphne.base}/readyz") == 200, 5, "ready again")
