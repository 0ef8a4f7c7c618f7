"""Nothing lost, nothing twice, nothing out of order, while replicas come and go.

The local stack (3 replicas behind nginx, real Redis); members of four rooms on
every replica, each a ``RoomMember`` that resumes by itself; about 200
messages a second published into the rooms from sockets; meanwhile the
replicas are drained (SIGTERM) and killed (SIGKILL) one after another, each
restarted before the next. Afterwards every member holds every message of its
room from the one it joined at, exactly once, in offset order, and every
message a publisher saw confirmed is among them.
"""

import asyncio
import signal
import time

import pytest

from loadtest.room_member import RoomMember
from tests.integration.running_stack import checked_stack

pytestmark = [pytest.mark.stack, pytest.mark.redis]

ROOMS = ["steady-a", "steady-b", "steady-c", "steady-d"]
MEMBERS_PER_ROOM = 6  # two on each replica
RATE = 200  # messages a second over all rooms
FAULTS = [("daphne-1", signal.SIGTERM), ("daphne-2", signal.SIGKILL), ("daphne-3", signal.SIGTERM)]
# Publishers send faster than one socket's default token bucket allows.
FAST = {"WS_RATE_LIMIT_PER_SECOND": "500", "WS_RATE_LIMIT_BURST": "500"}


def problems_of(member: RoomMember, published: dict[int, str]) -> list[str]:
    """What is wrong with what one member received, against the room's history."""
    found = []
    live = [chat for chat in member.chats if chat.position is not None]
    epochs = {chat.position.epoch for chat in live}
    if len(epochs) > 1:
        return [f"{member.room}: messages from {len(epochs)} epochs (history was lost?)"]
    offsets = [chat.position.offset for chat in live]
    if not offsets:
        return [f"{member.room}: received nothing"]
    duplicates = len(offsets) - len(set(offsets))
    if duplicates:
        found.append(f"{member.room}: {duplicates} duplicates")
    if offsets != sorted(offsets):
        found.append(f"{member.room}: out of order")
    first = member.welcomes[0].offset + 1
    missing = sorted(set(range(first, max(published) + 1)) - set(offsets))
    if missing:
        found.append(f"{member.room}: missing offsets {missing[:10]}{' …' if len(missing) > 10 else ''}")
    for chat in live:
        if published.get(chat.position.offset, chat.id) != chat.id:
            found.append(f"{member.room}: offset {chat.position.offset} is another message for this member")
            break
    return found


def test_every_member_gets_every_message_once_in_order_through_drains_and_kills():
    async def scenario(stack):
        loop = asyncio.get_running_loop()
        members = []
        for _ in range(MEMBERS_PER_ROOM):
            for room in ROOMS:  # one at a time: least_conn deals them out over the replicas
                member = RoomMember(stack.url, room, backoff_cap=1.0)
                await member.start(deadline=loop.time() + 20)
                members.append(member)
        assert len({member.pod for member in members}) == len(stack.replica_names)
        publishers = {room: [m for m in members if m.room == room][:2] for room in ROOMS}
        for member in members:
            member.deadline = loop.time() + 120  # keep coming back through the faults
        stop = asyncio.Event()

        async def publish(member: RoomMember, interval: float):
            n = 0
            while not stop.is_set():
                await member.publish(f"{member.room}-{id(member)}-{n}", confirm=False)
                n += 1
                await asyncio.sleep(interval)

        interval = len(ROOMS) * 2 / RATE
        load = [asyncio.ensure_future(publish(m, interval)) for pair in publishers.values() for m in pair]
        await asyncio.sleep(2)
        for name, sig in FAULTS:
            stack.kill_replica(name, sig)
            await asyncio.sleep(2)  # the room goes on while its members come back elsewhere
            stack.start_replica(name)
            await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*load)
        # Whatever is still on its way arrives, and every member is back.
        await asyncio.sleep(3)
        deadline = loop.time() + 20
        while loop.time() < deadline and not all(member.caught_up for member in members):
            await asyncio.sleep(0.1)
        await asyncio.gather(*(member.stop() for member in members))
        return members

    with checked_stack(replicas=3, env=FAST) as stack:
        started = time.monotonic()
        members = asyncio.run(scenario(stack))
        elapsed = time.monotonic() - started

    problems, published = [], {}
    for room in ROOMS:
        history: dict[int, str] = {}
        for member in (m for m in members if m.room == room):
            for chat in member.chats:
                if chat.position is not None:
                    history.setdefault(chat.position.offset, chat.id)
        published[room] = history
    for member in members:
        problems += problems_of(member, published[member.room])
        confirmed = {sent.id for sent in member.sent if sent.confirmed}
        problems += [
            f"{member.room}: confirmed message {i} never delivered"
            for i in confirmed - set(published[member.room].values())
        ]
    total = sum(len(history) for history in published.values())
    reconnects = sum(len(member.reconnects) for member in members)
    told = sum(1 for member in members for welcome in member.welcomes if welcome.recovered is False)
    print(
        f"{total} messages in {len(ROOMS)} rooms over {elapsed:.0f} s; {len(members)} members reconnected "
        f"{reconnects} times through {len(FAULTS)} faults; told recovered:false {told} times"
    )
    assert total > RATE * 5
    assert reconnects >= len(members) // len(FAULTS), "the faults did not move the members"
    assert told == 0, "history covered every gap here: nobody should be told it missed messages"
    assert problems == [], problems[:20]
