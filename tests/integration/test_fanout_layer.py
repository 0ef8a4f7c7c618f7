"""The fan-out layer (``CHANNEL_LAYER=redis-fanout``) on a real redis-server.

Two "pods" are two layers sharing a prefix: what one publishes, the other's
members with handlers get, once each, in order, whatever one handler does.
"""

import asyncio
import logging

import pytest
import redis
from prometheus_client import REGISTRY
from realtime.layers import FanoutChannelLayer

pytestmark = pytest.mark.redis

PREFIX = "fanout-test"


class Recorder:
    """A consumer's stand-in: records what the layer hands its handler."""

    def __init__(self, fail_on: int | None = None):
        self.messages: list[dict] = []
        self.fail_on = fail_on
        self.got = asyncio.Event()

    async def __call__(self, message: dict) -> None:
        self.messages.append(message)
        self.got.set()
        if message.get("n") == self.fail_on:
            raise RuntimeError("this member's socket is broken")


async def settle(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def pods(redis_server):
    pod_a = FanoutChannelLayer(hosts=[redis_server.url], prefix=PREFIX)
    pod_b = FanoutChannelLayer(hosts=[redis_server.url], prefix=PREFIX)
    yield pod_a, pod_b
    await pod_a.flush()
    await pod_b.flush()


async def join(layer, group: str, handler=None) -> str:
    channel = await layer.new_channel(handler=handler) if handler else await layer.new_channel()
    await layer.group_add(group, channel)
    return channel


async def test_every_member_gets_every_message_once_in_order_and_decoded_once(pods):
    pod_a, pod_b = pods
    members = [Recorder() for _ in range(3)]
    for member in members:
        await join(pod_a, "room", member)
    await asyncio.sleep(0.1)  # SUBSCRIBE is asynchronous in Redis pub/sub
    for n in range(200):
        await pod_b.group_send("room", {"type": "chat.message", "n": n})
    await settle(lambda: all(len(member.messages) == 200 for member in members))
    await asyncio.sleep(0.1)
    for member in members:
        assert [message["n"] for message in member.messages] == list(range(200))
        # Room history: each message carries its place, counted from 1 with no gap.
        assert [message["offset"] for message in member.messages] == list(range(1, 201))
        assert len({message["epoch"] for message in member.messages}) == 1
    # One decode per replica: every member was handed the same object.
    assert all(members[0].messages[n] is members[2].messages[n] for n in range(200))


async def test_a_failing_handler_is_logged_and_the_others_still_get_everything(pods, caplog):
    pod_a, pod_b = pods
    broken, healthy = Recorder(fail_on=1), Recorder()
    await join(pod_a, "room", broken)
    await join(pod_a, "room", healthy)
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.ERROR, logger="realtime.layers"):
        for n in range(3):
            await pod_b.group_send("room", {"type": "chat.message", "n": n})
        await settle(lambda: len(healthy.messages) == 3 and len(broken.messages) == 3)
    assert [message["n"] for message in healthy.messages] == [0, 1, 2]
    assert "this member's socket is broken" in caplog.text


async def test_members_without_a_handler_still_receive_through_their_queue(pods):
    pod_a, pod_b = pods
    attached = Recorder()
    await join(pod_a, "room", attached)
    queued = await join(pod_a, "room")
    await asyncio.sleep(0.1)
    await pod_b.group_send("room", {"type": "chat.message", "n": 1})
    # A stock consumer gets the message as it was sent; one with a handler, its place in history too.
    assert await asyncio.wait_for(pod_a.receive(queued), 5) == {"type": "chat.message", "n": 1}
    await settle(lambda: [(m["n"], m["offset"]) for m in attached.messages] == [(1, 1)])


async def test_a_message_to_one_channel_reaches_its_handler(pods):
    pod_a, pod_b = pods
    member = Recorder()
    channel = await pod_a.new_channel(handler=member)
    await asyncio.sleep(0.1)
    await pod_b.send(channel, {"type": "chat.message", "n": 9})
    await settle(lambda: member.messages == [{"type": "chat.message", "n": 9}])


async def test_release_forgets_the_channel_and_unsubscribes_it_in_redis(pods, redis_server):
    pod_a, pod_b = pods
    gone, staying = Recorder(), Recorder()
    gone_channel = await join(pod_a, "room", gone)
    await join(pod_a, "room", staying)
    await pod_a.group_discard("room", gone_channel)
    await pod_a.release(gone_channel)
    client = redis.Redis.from_url(redis_server.url)
    # Unsubscribed in the background, as it was subscribed.
    await settle(lambda: dict(client.pubsub_numsub(gone_channel)) == {gone_channel.encode(): 0})
    await asyncio.sleep(0.1)
    await pod_b.group_send("room", {"type": "chat.message", "n": 1})
    await settle(lambda: len(staying.messages) == 1)
    await asyncio.sleep(0.1)
    assert gone.messages == []


async def test_messages_past_capacity_wait_and_the_backlog_gauge_counts_them(pods):
    pod_a, pod_b = pods
    gate = asyncio.Event()
    delivered = []

    async def slow_member(message):
        delivered.append(message["n"])
        await gate.wait()  # a replica busy elsewhere

    await join(pod_a, "room", slow_member)
    await asyncio.sleep(0.1)
    for n in range(5):
        await pod_b.group_send("room", {"type": "chat.message", "n": n})
    await settle(lambda: delivered == [0] and backlog() == 4)
    gate.set()
    await settle(lambda: delivered == [0, 1, 2, 3, 4])
    assert backlog() == 0


async def test_past_its_bound_the_backlog_sheds_tells_the_members_and_the_replica_is_not_ready(pods, settings):
    """A replica that cannot keep up must not grow without bound: a message
    that would take the backlog past FANOUT_MAX_BACKLOG_BYTES is dropped, each
    member that misses it is told (fanout.shed) and handed nothing after it,
    and the replica reports overloaded until the backlog is under half."""
    from realtime.replica import state

    pod_a, pod_b = pods
    payload = "x" * 1000
    settings.FANOUT_MAX_BACKLOG_BYTES = 5_500  # room for five messages of about 1 KB
    gate = asyncio.Event()
    stuck, shed = [], []

    async def busy_member(message):
        if message["type"] == "fanout.shed":
            shed.append(message)
            return
        stuck.append(message["n"])
        await gate.wait()  # the first message holds the replica's fan-out

    await join(pod_a, "room", busy_member)
    await asyncio.sleep(0.1)
    for n in range(10):
        await pod_b.group_send("room", {"type": "chat.message", "n": n, "text": payload})
    await settle(lambda: shed and stuck == [0])
    assert state.overloaded
    assert backlog() <= 5
    gate.set()
    # Nothing after the first, not even what was queued before the cut:
    await settle(lambda: backlog() == 0)
    await asyncio.sleep(0.1)
    # the member resumes from its last message and history fills the gap.
    assert stuck == [0]
    assert len(shed) == 1
    assert not state.overloaded
    await pod_b.group_send("room", {"type": "chat.message", "n": 99, "text": payload})
    await asyncio.sleep(0.2)
    assert 99 not in stuck, "a member that missed a message got a later one"


def backlog() -> float:
    return REGISTRY.get_sample_value("blueprint_fanout_backlog", {"replica": "pod-test"})


async def test_a_burst_of_publishes_past_the_connection_pool_all_arrive(pods):
    """Publishes run side by side, but never more at once than the pool holds:
    300 at once (redis-py's pool refuses past 100) wait their turn, none fails."""
    pod_a, pod_b = pods
    member = Recorder()
    await join(pod_a, "room", member)
    await asyncio.sleep(0.1)
    await asyncio.gather(*(pod_b.group_send("room", {"type": "chat.message", "n": n}) for n in range(300)))
    await settle(lambda: len(member.messages) == 300)
    assert sorted(message["n"] for message in member.messages) == list(range(300))


async def test_a_message_that_cannot_be_decoded_is_logged_and_the_next_ones_arrive(pods, redis_server, caplog):
    pod_a, pod_b = pods
    member = Recorder()
    await join(pod_a, "room", member)
    await asyncio.sleep(0.1)
    group_channel = f"{PREFIX}__group__room"
    with caplog.at_level(logging.ERROR, logger="realtime.layers"):
        await asyncio.to_thread(redis.Redis.from_url(redis_server.url).publish, group_channel, b"\xc1 not msgpack")
        await pod_b.group_send("room", {"type": "chat.message", "n": 1})
        await settle(lambda: [message["n"] for message in member.messages] == [1])
    assert "could not be decoded" in caplog.text
