"""The raw baseline: chat fan-out with nothing but ``websockets`` and Redis pub/sub.

    POD_NAME=raw-1 REDIS_URL=redis://... python -m loadtest.bench.raw_server --port 8000

It speaks the blueprint's chat protocol (the app's own ``realtime.protocol``
shapes and validates every frame: welcome, chat.message with origin and
served_by, error frames) on ``/ws/chat/<room>/``, and answers ``/healthz`` and
``/readyz`` like a replica, so the local stack runs three of them behind the
same nginx. What it leaves out is what the benchmark weighs: no ASGI, no
Django, no Channels consumer per socket, no Twisted. A replica subscribes once
per room that has local members, encodes each delivery once and writes it to
every local member. This is the practical limit of Python on the machine.
"""

from __future__ import annotations

import asyncio
import json
import re

from realtime import protocol
from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from loadtest.bench import reference_server
from loadtest.bench.reference_server import server_settings, stop_on_signals

CHAT_PATH = re.compile(r"/ws/chat/([^/]+)/")
# The same keepalive the Daphne replicas run with.
PING_INTERVAL = 20
PING_TIMEOUT = 30


class RawFanoutServer:
    def __init__(self, pod: str, redis: Redis, prefix: str, max_message_bytes: int):
        self.pod = pod
        self.redis = redis
        self.prefix = prefix
        self.max_message_bytes = max_message_bytes
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.rooms: dict[str, set[ServerConnection]] = {}
        self._listener: asyncio.Task | None = None
        # redis-py's PubSub creates its connection on first use: two rooms
        # subscribing at once would each make one, and the subscriptions made
        # on the orphaned one would never be read (a steady share of lost
        # deliveries). One subscribe at a time.
        self._subscribing = asyncio.Lock()

    def channel(self, room: str) -> str:
        return f"{self.prefix}:raw:{room}"

    async def process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(200, json.dumps({"status": "ok", "pod": self.pod}))
        if request.path == "/readyz":
            try:
                await asyncio.wait_for(self.redis.ping(), 2.0)
            except (TimeoutError, OSError, RedisError) as error:
                return connection.respond(
                    503, json.dumps({"status": "unavailable", "pod": self.pod, "reason": repr(error)})
                )
            return connection.respond(200, json.dumps({"status": "ok", "pod": self.pod}))
        match = CHAT_PATH.fullmatch(request.path)
        if not match or not protocol.is_valid_room(match.group(1)):
            return connection.respond(403, "no such WebSocket path\n")
        return None

    async def handle(self, connection: ServerConnection) -> None:
        room = CHAT_PATH.fullmatch(connection.request.path).group(1)
        # Welcome after joining, as the Channels consumer does: a member that
        # was welcomed is subscribed, so it misses nothing published next.
        await self.join(room, connection)
        await connection.send(protocol.dumps(protocol.welcome(room, self.pod)))
        try:
            async for text in connection:
                await self.on_frame(room, connection, text)
        except ConnectionClosed:
            pass
        finally:
            self.leave(room, connection)

    async def on_frame(self, room: str, connection: ServerConnection, text) -> None:
        try:
            payload = protocol.decode_text_frame(
                text if isinstance(text, str) else None,
                text if isinstance(text, bytes) else None,
                self.max_message_bytes,
            )
            event = protocol.chat_event(payload, origin=self.pod)
        except protocol.FrameError as error:
            await connection.send(protocol.dumps(protocol.error_frame(error)))
            return
        await self.redis.publish(self.channel(room), json.dumps(event))

    async def join(self, room: str, connection: ServerConnection) -> None:
        async with self._subscribing:
            if room not in self.rooms:
                await self.pubsub.subscribe(self.channel(room))
                self.rooms[room] = set()
                if self._listener is None or self._listener.done():
                    self._listener = asyncio.create_task(self.listen())
        self.rooms[room].add(connection)

    def leave(self, room: str, connection: ServerConnection) -> None:
        # The room's subscription stays for the life of the process: a
        # baseline, not a product, and no unsubscribe can race a new member.
        self.rooms[room].discard(connection)

    async def listen(self) -> None:
        prefix = len(self.channel(""))
        async for message in self.pubsub.listen():
            room = message["channel"].decode()[prefix:]
            members = self.rooms.get(room)
            if members:
                # Encoded once per replica, written to every local member.
                frame = protocol.chat_delivery(json.loads(message["data"]), served_by=self.pod)
                broadcast(members, protocol.dumps(frame))


async def serve_forever(host: str, port: int) -> None:
    server_state = RawFanoutServer(**server_settings("raw"))
    stop = stop_on_signals()
    async with serve(
        server_state.handle,
        host,
        port,
        process_request=server_state.process_request,
        compression=None,
        max_size=server_state.max_message_bytes,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
    ):
        await stop


def main(argv: list[str] | None = None) -> None:
    reference_server.main(__doc__.splitlines()[0], serve_forever, asyncio.run, argv)


if __name__ == "__main__":
    main()
