"""Room history and resume on real replicas and a real Redis: nothing lost, nothing silent.

A member that reconnects with the last ``epoch`` and ``offset`` it saw gets
every message it missed, once, in order, and then the live stream; when
history cannot cover the gap it is told ``recovered: false``.
"""

import asyncio
import json
import signal
import time

import pytest
import websockets

from loadtest.fanout_check import HTTP, broadcast_request
from tests.integration.test_replica_writes import small_buffer_socket
from tests.processes import Daphne, status_of, wait_for
from tests.tcp_proxy import Proxy

pytestmark = pytest.mark.redis

FANOUT = {"CHANNEL_LAYER": "redis-fanout"}


async def join(daphne: Daphne, room: str, resume: dict | None = None):
    query = f"?epoch={resume['epoch']}&offset={resume['offset']}" if resume else ""
    socket = await websockets.connect(daphne.ws(f"/ws/chat/{room}/{query}"), origin=daphne.origin)
    welcome = json.loads(await socket.recv())
    assert welcome["type"] == "welcome"
    return socket, welcome


async def chats(socket, count: int, timeout: float = 5) -> list[dict]:
    frames = []
    while len(frames) < count:
        frame = json.loads(await asyncio.wait_for(socket.recv(), timeout))
        if frame.get("type") == "chat.message":
            frames.append(frame)
    return frames


async def nothing_more(socket, timeout: float = 0.3) -> bool:
    """True when nothing else arrives (a duplicate would)."""
    try:
        await asyncio.wait_for(socket.recv(), timeout)
    except TimeoutError:
        return True
    return False


async def publish(socket, texts):
    for text in texts:
        await socket.send(json.dumps({"message": text}))


def test_a_member_that_reconnects_gets_what_it_missed_once_in_order_then_live(redis_server):
    async def scenario(daphne):
        member, welcome = await join(daphne, "resume")
        publisher, _ = await join(daphne, "resume")
        assert welcome["offset"] == 0 and welcome["epoch"]
        await publish(publisher, ["a", "b"])
        seen = await chats(member, 2)
        assert [(f["message"], f["offset"]) for f in seen] == [("a", 1), ("b", 2)]
        await member.close()
        await publish(publisher, ["c", "d", "e"])
        await chats(publisher, 5)  # all five are in history
        back, welcome = await join(daphne, "resume", {"epoch": seen[-1]["epoch"], "offset": seen[-1]["offset"]})
        assert welcome["recovered"] is True and welcome["replayed"] == 3 and welcome["offset"] == 5
        replayed = await chats(back, 3)
        await publish(publisher, ["f"])
        live = await chats(back, 1)
        assert await nothing_more(back)
        return replayed + live

    with Daphne(redis_server.url, **FANOUT) as daphne:
        frames = asyncio.run(scenario(daphne))
    assert [(f["message"], f["offset"]) for f in frames] == [("c", 3), ("d", 4), ("e", 5), ("f", 6)]
    assert len({f["epoch"] for f in frames}) == 1


def test_a_message_sent_again_with_its_id_is_published_once(redis_server):
    """A client that lost its socket cannot tell whether its last message was
    published, so it sends it again with the same id (the chat page and
    RoomMember do): the room's history knows the id, and members get it once.
    The chaos suite found this: a publish delayed by a 5 s cut from Redis
    reached Redis after its publisher had resumed elsewhere and sent it again."""

    async def scenario(daphne):
        member, _ = await join(daphne, "idempotent")
        publisher, _ = await join(daphne, "idempotent")
        for text, message_id in (("first", "m-1"), ("first again", "m-1"), ("second", "m-2"), ("no id", None)):
            await publisher.send(json.dumps({"message": text, **({"id": message_id} if message_id else {})}))
        seen = await chats(member, 3)
        assert await nothing_more(member)
        return seen

    def broadcast(daphne: Daphne, body: dict) -> dict:
        request = broadcast_request(daphne.origin, "idempotent", "history-token", body)
        with HTTP.open(request, timeout=10) as response:
            return json.loads(response.read())

    with Daphne(redis_server.url, BROADCAST_TOKEN="history-token", **FANOUT) as daphne:
        frames = asyncio.run(scenario(daphne))
        # The HTTP API answers a repeat with the first one's position.
        first = broadcast(daphne, {"message": "over http", "id": "h-1"})
        again = broadcast(daphne, {"message": "over http", "id": "h-1"})
    assert [(f["message"], f.get("id"), f["offset"]) for f in frames] == [
        ("first", "m-1", 1),
        ("second", "m-2", 2),
        ("no id", None, 3),
    ]
    assert (again["offset"], again.get("repeated")) == (first["offset"], True) and "repeated" not in first


def test_a_gap_longer_than_the_history_is_told_recovered_false(redis_server):
    async def scenario(daphne):
        member, welcome = await join(daphne, "trimmed")
        publisher, _ = await join(daphne, "trimmed")
        await member.close()
        await publish(publisher, [str(n) for n in range(5)])
        await chats(publisher, 5)
        back, welcome = await join(daphne, "trimmed", welcome)
        return welcome, await chats(back, 3)

    with Daphne(redis_server.url, ROOM_HISTORY_SIZE="3", **FANOUT) as daphne:
        welcome, frames = asyncio.run(scenario(daphne))
    assert welcome["recovered"] is False and welcome["replayed"] == 3
    assert [f["offset"] for f in frames] == [3, 4, 5]


def test_after_a_redis_restart_a_member_is_told_recovered_false_and_gets_nothing_twice(redis_server):
    """The restart forgets every history. The member is sent to resume: by its
    replica, which saw its subscription connection break (1012), or, had that
    gone unnoticed, by the first message of the new epoch, out of sequence for
    it (4000). Resuming, it is told."""

    async def scenario(daphne):
        member, _ = await join(daphne, "restart")
        await publish(member, ["before"])
        (before,) = await chats(member, 1)
        redis_server.stop()
        redis_server.start()
        try:  # the replica notices the broken connection at once
            await chats(member, 1, timeout=3)
        except (TimeoutError, websockets.ConnectionClosed):
            pass
        wait_for(lambda: status_of(f"http://{daphne.base}/readyz") == 200, 10, "ready again")
        publisher, _ = await join(daphne, "restart")
        await publish(publisher, ["after"])
        with pytest.raises(websockets.ConnectionClosed):
            await chats(member, 1, timeout=10)
        assert member.close_code in (1012, 4000)
        back, welcome = await join(daphne, "restart", before)
        frames = await chats(back, 1)
        assert await nothing_more(back)
        return before, welcome, frames

    with Daphne(redis_server.url, **FANOUT) as daphne:
        before, welcome, frames = asyncio.run(scenario(daphne))
    assert welcome["recovered"] is False and welcome["replayed"] == 1
    assert welcome["epoch"] != before["epoch"]
    assert [(f["message"], f["offset"], f["epoch"]) for f in frames] == [("after", 1, welcome["epoch"])]


def test_a_replica_cut_from_redis_closes_its_members_with_1012_and_recovers_after_the_heal(redis_server):
    proxy = Proxy(redis_server.port)
    url = redis_server.url.replace(f":{redis_server.port}/", f":{proxy.port}/")

    async def scenario(daphne):
        member, _ = await join(daphne, "cut")
        await publish(member, ["before"])
        (before,) = await chats(member, 1)
        proxy.cut()
        cut_at = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            await chats(member, 1, timeout=15)
        closed_after = time.monotonic() - cut_at
        assert member.close_code == 1012
        assert status_of(f"http://{daphne.base}/readyz") == 503
        with pytest.raises(websockets.InvalidStatus) as refused:
            await join(daphne, "cut")
        assert refused.value.response.status_code == 503
        await asyncio.sleep(3)  # a cut that lasts
        proxy.heal()
        healed_at = time.monotonic()
        wait_for(lambda: status_of(f"http://{daphne.base}/readyz") == 200, 10, "ready after the heal")
        ready_after = time.monotonic() - healed_at
        back, welcome = await join(daphne, "cut", before)
        await publish(back, ["after"])
        (after,) = await chats(back, 1)
        return closed_after, ready_after, welcome, after

    try:
        with Daphne(url, REDIS_LINK_TIMEOUT_SECONDS="2", READYZ_CACHE_SECONDS="0.2", **FANOUT) as daphne:
            closed_after, ready_after, welcome, after = asyncio.run(scenario(daphne))
    finally:
        proxy.close()
    print(f"members closed {closed_after:.1f} s after the cut; ready {ready_after:.1f} s after the heal")
    assert closed_after < 2 + 2, "members of a cut replica must be closed within the link timeout"
    assert welcome["recovered"] is True
    assert after["offset"] == 2


async def collect(socket, into: list, stop: asyncio.Event) -> None:
    """Record chat frames until the socket closes or ``stop`` is set."""
    while not stop.is_set():
        try:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 0.2))
        except TimeoutError:
            continue
        except websockets.ConnectionClosed:
            return
        if frame.get("type") == "chat.message":
            into.append(frame)


@pytest.mark.parametrize("fault", ["drain", "kill -9"])
def test_a_member_whose_replica_goes_resumes_on_another_with_nothing_lost_or_twice(redis_server, fault):
    """200 messages a second from a publisher on replica B; the member's replica
    A is drained or killed; it resumes on B from its last offset."""

    async def scenario(a, b):
        member, _ = await join(a, "failover")
        publisher, _ = await join(b, "failover")
        stop, frames = asyncio.Event(), []
        sent = 0

        async def publish_steadily():
            nonlocal sent
            while not stop.is_set():
                await publisher.send(json.dumps({"message": str(sent)}))
                sent += 1
                await asyncio.sleep(0.005)

        publishing = asyncio.ensure_future(publish_steadily())
        reading = asyncio.ensure_future(collect(member, frames, stop))
        await asyncio.sleep(1)
        a.process.send_signal(signal.SIGTERM if fault == "drain" else signal.SIGKILL)
        await reading  # the socket closed
        await asyncio.sleep(0.5)  # messages go on while the member is away
        last = frames[-1]
        back, welcome = await join(b, "failover", {"epoch": last["epoch"], "offset": last["offset"]})
        reading = asyncio.ensure_future(collect(back, frames, stop))
        await asyncio.sleep(1)
        stop.set()
        await publishing
        await reading
        return member.close_code, welcome, frames, sent

    fast = {**FANOUT, "WS_RATE_LIMIT_PER_SECOND": "1000", "WS_RATE_LIMIT_BURST": "1000"}
    with (
        Daphne(redis_server.url, name="replica-a", **fast) as a,
        Daphne(redis_server.url, name="replica-b", **fast) as b,
    ):
        close_code, welcome, frames, sent = asyncio.run(scenario(a, b))
    assert close_code == (1001 if fault == "drain" else 1006)
    assert welcome["recovered"] is True and welcome["replayed"] > 0
    offsets = [frame["offset"] for frame in frames]
    assert offsets == list(range(1, len(offsets) + 1)), "a gap, a duplicate or a reordering"
    assert [frame["message"] for frame in frames] == [str(n) for n in range(len(frames))]
    assert len(frames) >= sent - 50  # all but the last few in flight when it stopped reading


def test_a_member_closed_for_falling_behind_resumes_with_everything(redis_server):
    async def scenario(daphne):
        # A small receive buffer: the replica's queue, not the kernel's, holds the backlog.
        member = await websockets.connect(
            daphne.ws("/ws/chat/behind/"), origin=daphne.origin, sock=small_buffer_socket(daphne.port), max_queue=1
        )
        assert json.loads(await member.recv())["type"] == "welcome"
        publisher, _ = await join(daphne, "behind")
        seen: list[dict] = []
        await publish(publisher, ["first"])
        seen += await chats(member, 1)
        # The member stops reading while 10 MB are sent to it: more than the
        # kernel's socket buffers take, and over its 1 MiB bound in the replica.
        big = "x" * 40_000
        for n in range(250):
            await publisher.send(json.dumps({"message": f"{n}:{big}"}))
        await chats(publisher, 251, timeout=10)
        frames = []
        while True:  # read what reached it before the close
            try:
                frame = json.loads(await asyncio.wait_for(member.recv(), 5))
            except websockets.ConnectionClosed:
                break
            if frame.get("type") == "chat.message":
                frames.append(frame)
        seen += frames
        back, welcome = await join(daphne, "behind", {"epoch": seen[-1]["epoch"], "offset": seen[-1]["offset"]})
        seen += await chats(back, welcome["replayed"])
        return member.close_code, welcome, seen

    fast_publisher = {"WS_RATE_LIMIT_PER_SECOND": "1000", "WS_RATE_LIMIT_BURST": "1000"}
    with Daphne(redis_server.url, **FANOUT, **fast_publisher) as daphne:
        close_code, welcome, seen = asyncio.run(scenario(daphne))
    # 4000 when the reader gets to the close frame within the close handshake's
    # second; 1006 when it is dropped first for not answering it (README, Limits).
    assert close_code in (4000, 1006)
    assert welcome["recovered"] is True
    assert [frame["offset"] for frame in seen] == list(range(1, 252))


def test_a_quiet_room_keeps_its_epoch_while_it_has_members(redis_server):
    """The history forgets a room ROOM_HISTORY_TTL_SECONDS after its last
    publish, but not the epoch of a room with members: a message after a quiet
    spell is in sequence, and nobody is told for nothing that it missed some."""

    async def scenario(daphne):
        member, _ = await join(daphne, "quiet")
        await publish(member, ["before"])
        (before,) = await chats(member, 1)
        await asyncio.sleep(5)  # over twice the TTL
        await publish(member, ["after"])
        (after,) = await chats(member, 1, timeout=5)
        return before, after

    with Daphne(redis_server.url, ROOM_HISTORY_TTL_SECONDS="2", **FANOUT) as daphne:
        before, after = asyncio.run(scenario(daphne))
    assert (after["epoch"], after["offset"]) == (before["epoch"], before["offset"] + 1)
