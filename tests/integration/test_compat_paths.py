"""Both paths of realtime.compat on real replicas and a real Redis.

On the versions it was verified against, a replica runs the fast path: the
fan-out layer (positions in every message) and says nothing about it. Off
them (FAST_PATH=off stands in for an untested version: the same decision,
made without installing one) it runs stock channels_redis, Channels, Daphne
and Twisted behaviour, says so in one warning, and still fans out across
replicas and drains with 1001. ``make canary`` runs these on the newest
releases, with FAST_PATH=force.
"""

import asyncio
import json
import signal

import pytest
import websockets

from tests.processes import Daphne

pytestmark = pytest.mark.redis

FANOUT = {"CHANNEL_LAYER": "redis-fanout"}
FALLBACK = "fast path off"


async def join(daphne: Daphne, room: str):
    socket = await websockets.connect(daphne.ws(f"/ws/chat/{room}/"), origin=daphne.origin)
    welcome = json.loads(await asyncio.wait_for(socket.recv(), 5))
    assert welcome["type"] == "welcome"
    return socket, welcome


async def across(replicas: list[Daphne]) -> tuple[list[dict], list[dict]]:
    """A member on each replica; each publishes once. Their welcomes, and what the first received."""
    joined = [await join(daphne, "compat") for daphne in replicas]
    await asyncio.sleep(0.2)  # SUBSCRIBE is asynchronous in Redis pub/sub
    for n, (socket, _) in enumerate(joined):
        await socket.send(json.dumps({"message": f"from {n}"}))
    received = [json.loads(await asyncio.wait_for(joined[0][0].recv(), 5)) for _ in joined]
    for socket, _ in joined:
        await socket.close()
    return [welcome for _, welcome in joined], received


def test_on_the_verified_versions_the_replicas_run_the_fast_path(redis_server):
    with Daphne(redis_server.url, "daphne-a", **FANOUT) as a, Daphne(redis_server.url, "daphne-b", **FANOUT) as b:
        welcomes, received = asyncio.run(across([a, b]))
    assert all("epoch" in welcome for welcome in welcomes)  # room history: the fan-out layer's
    assert sorted((frame["message"], frame["origin"]) for frame in received) == [
        ("from 0", "daphne-a"),
        ("from 1", "daphne-b"),
    ]
    assert sorted(frame["offset"] for frame in received) == [1, 2]
    assert FALLBACK not in a.output + b.output


def test_off_them_the_replicas_run_stock_say_so_once_and_still_fan_out_and_drain(redis_server):
    stock = {**FANOUT, "FAST_PATH": "off", "DRAIN_TIMEOUT_SECONDS": "5"}
    with Daphne(redis_server.url, "daphne-a", **stock) as a, Daphne(redis_server.url, "daphne-b", **stock) as b:
        welcomes, received = asyncio.run(across([a, b]))

        async def drained() -> int:
            socket, _ = await join(a, "drain")
            a.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), 5)
            return socket.close_code

        assert asyncio.run(drained()) == 1001
    # channels_redis' own pub/sub layer: no history, no positions.
    assert not any("epoch" in welcome for welcome in welcomes)
    assert sorted((frame["message"], frame["origin"], "offset" in frame) for frame in received) == [
        ("from 0", "daphne-a", False),
        ("from 1", "daphne-b", False),
    ]
    for replica in (a, b):
        [warning] = [line for line in replica.output.splitlines() if FALLBACK in line]
        assert all(
            name in warning for name in ("channels-redis", "RedisPubSubChannelLayer", "Daphne's own handle_reply")
        )
