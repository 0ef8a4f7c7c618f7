"""The chaos suite's workload: members that keep their identity, and publishers
that record every publish and whether the server acknowledged it.

Each room has ``members_per_room`` RoomMembers (they reconnect and resume from
their last position, as the chat page does), joined one at a time through
nginx, which places each on a replica it picks at random from the ones
Docker's DNS names. The room's first member also
publishes on its socket; one HTTP publisher posts to every room in turn
through the broadcast API. A publish is *acknowledged* when the server said
it was published: a 202 (with its room position) for the API, the
publisher's own copy coming back from the room for a socket. Only
acknowledged messages are owed to every member; the rest are recorded too, so
that a duplicate of any of them is still seen.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from loadtest.fanout_check import HTTP, broadcast_request
from loadtest.room_member import JoinError, Position, RoomMember, now_ms

# A publish not acknowledged by then is recorded as unknown; the publisher moves on.
PUBLISH_TIMEOUT_SECONDS = 10.0


@dataclass
class Publish:
    id: str
    room: str
    via: str  # "socket" or "http"
    sent_at: float  # time.time()
    acked_at: float | None = None  # None: refused, timed out, or not confirmed
    position: Position | None = None

    @property
    def acked(self) -> bool:
        return self.acked_at is not None


@dataclass
class Workload:
    base_url: str
    token: str
    rooms: int = 4
    members_per_room: int = 6
    socket_rate: float = 4.0  # messages per second per room, from its first member's socket
    http_rate: float = 4.0  # messages per second over all rooms, through the broadcast API
    deadline: float = 0.0  # loop.time() until which members keep reconnecting
    members: dict[str, list[RoomMember]] = field(default_factory=dict)
    publishes: list[Publish] = field(default_factory=list)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stopping: bool = False

    @property
    def all_members(self) -> list[RoomMember]:
        return [member for members in self.members.values() for member in members]

    async def start(self, run_id: str) -> None:
        """Join every member (one at a time), then start publishing."""
        loop = asyncio.get_running_loop()
        for index in range(self.rooms):
            room = f"chaos-{run_id}-{index}"
            self.members[room] = []
            for _ in range(self.members_per_room):
                member = RoomMember(self.base_url, room, backoff_cap=1.0)
                await member.start(deadline=loop.time() + 30)
                member.deadline = self.deadline
                self.members[room].append(member)
        for room in self.members:
            self._tasks.append(asyncio.ensure_future(self._publish_on_socket(room)))
        self._tasks.append(asyncio.ensure_future(self._publish_over_http()))

    async def stop_publishing(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def settle(self, seconds: float) -> bool:
        """Wait until every member is connected, caught up and holds every
        acknowledged message of its room (or ``seconds`` pass)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            if all(member.caught_up for member in self.all_members) and all(
                member.received(publish.id) or member.told_missing(publish.position) is not None
                for publish in self.publishes
                if publish.acked and publish.position
                for member in self.members[publish.room]
            ):
                return True
            await asyncio.sleep(0.2)
        return False

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.all_members), return_exceptions=True)

    async def _publish_on_socket(self, room: str) -> None:
        loop = asyncio.get_running_loop()
        publisher = self.members[room][0]
        count = 0
        while not self._stopping and publisher.running:
            started = loop.time()
            count += 1
            text = f"socket {count}"
            try:
                sent = await publisher.publish(text, deadline=loop.time() + PUBLISH_TIMEOUT_SECONDS)
            except JoinError:
                await asyncio.sleep(0.2)  # not connected: nothing was sent
                continue
            publish = Publish(sent.id, room, "socket", sent.sent_at / 1000)
            if sent.confirmed:
                chat = next((c for c in reversed(publisher.chats) if c.id == sent.id), None)
                publish.acked_at = time.time()
                publish.position = chat.position if chat else None
            self.publishes.append(publish)
            await asyncio.sleep(max(0.0, 1 / self.socket_rate - (loop.time() - started)))

    async def _publish_over_http(self) -> None:
        loop = asyncio.get_running_loop()
        rooms = list(self.members)
        count = 0
        while not self._stopping:
            started = loop.time()
            room = rooms[count % len(rooms)]
            count += 1
            publish = await asyncio.to_thread(self._post, room, f"http {count}")
            self.publishes.append(publish)
            await asyncio.sleep(max(0.0, 1 / self.http_rate - (loop.time() - started)))

    async def bulk(self, room: str, size: int, rate: float) -> None:
        """Big messages into one room at ``rate`` until cancelled (a fault's load)."""
        loop = asyncio.get_running_loop()
        count = 0
        while True:
            started = loop.time()
            count += 1
            self.publishes.append(await asyncio.to_thread(self._post, room, f"bulk {count} " + "." * size))
            await asyncio.sleep(max(0.0, 1 / rate - (loop.time() - started)))

    def _post(self, room: str, text: str) -> Publish:
        publish = Publish(uuid.uuid4().hex, room, "http", time.time())
        request = broadcast_request(
            self.base_url, room, self.token, {"message": text, "id": publish.id, "sent_at": now_ms()}
        )
        try:
            with HTTP.open(request, timeout=PUBLISH_TIMEOUT_SECONDS) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError):
            # Refused (an HTTPError is an OSError), or timed out or cut: it may
            # or may not have been published, so it is not owed to anyone.
            return publish
        publish.acked_at = time.time()
        if isinstance(answer.get("epoch"), str) and isinstance(answer.get("offset"), int):
            publish.position = Position(answer["epoch"], answer["offset"])
        return publish
