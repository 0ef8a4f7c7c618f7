"""The Python limit: chat fan-out on picows (Cython WebSockets) and ``redis.asyncio`` pub/sub.

    POD_NAME=picows-1 REDIS_URL=redis://... python -m loadtest.bench.picows_server --port 8000

The same protocol and structure as ``raw_server`` (the ``websockets``
reference): the app's own ``realtime.protocol`` shapes and validates every
frame on ``/ws/chat/<room>/``, a replica subscribes once per room with local
members, encodes each delivery once and writes it to every local member; it
answers ``/healthz`` and ``/readyz`` with its POD_NAME, so the local stack
runs three of them behind the same nginx. What differs is the WebSocket
stack: picows parses frames in its protocol's ``data_received`` and calls the
listener for each, with no task, queue or coroutine per socket, and it runs on
uvloop as picows recommends. Nothing faster is written in Python for this job:
what remains is redis-py's pub/sub parser and JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus

import uvloop
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)
from realtime import protocol
from redis.asyncio import Redis
from redis.exceptions import RedisError

from loadtest.bench import reference_server
from loadtest.bench.reference_server import server_settings, stop_on_signals

CHAT_PATH = re.compile(r"/ws/chat/([^/]+)/")
# The Daphne replicas' keepalive (ping after 20 s, 30 s for the pong), as near
# as picows allows: its pong timeout may not exceed its ping interval.
PING_INTERVAL = 20
PING_TIMEOUT = 20


class Member(WSListener):
    __slots__ = ("server", "room", "transport")

    def __init__(self, server: PicowsFanoutServer, room: str):
        self.server = server
        self.room = room
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server.spawn(self.server.join(self))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT and frame.fin:
            self.server.on_text(self, frame.get_payload_as_utf8_text())
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif kind is not WSMsgType.PONG and kind is not WSMsgType.PING:
            # No binary frames and no fragmented messages in the chat protocol.
            transport.send_close(WSCloseCode.UNSUPPORTED_DATA)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.server.leave(self)

    def send(self, text: str) -> None:
        self.transport.send(WSMsgType.TEXT, text.encode())


class PicowsFanoutServer:
    def __init__(self, pod: str, redis: Redis, prefix: str, max_message_bytes: int):
        self.pod = pod
        self.redis = redis
        self.prefix = prefix
        self.max_message_bytes = max_message_bytes
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.rooms: dict[str, set[Member]] = {}
        self._listener: asyncio.Task | None = None
        # One subscribe at a time: redis-py's PubSub makes its connection on
        # first use (raw_server says what two at once did).
        self._subscribing = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._ready = (json.dumps({"status": "ok", "pod": pod})).encode()

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def channel(self, room: str) -> str:
        return f"{self.prefix}:raw:{room}"

    # --- HTTP and the handshake ---------------------------------------------

    def route(self, request: WSUpgradeRequest):
        path = request.path.decode("latin-1") if isinstance(request.path, bytes) else request.path
        if path == "/healthz":
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(self._ready), None)
        if path == "/readyz":
            # The router cannot wait for a Redis round trip: Redis answered at
            # the start, and the pub/sub reader must still be alive.
            if self._listener is not None and self._listener.done():
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_error_response(HTTPStatus.SERVICE_UNAVAILABLE, b"pub/sub reader ended\n"),
                    None,
                )
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(self._ready), None)
        match = CHAT_PATH.fullmatch(path.split("?", 1)[0])
        if not match or not protocol.is_valid_room(match.group(1)):
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(HTTPStatus.FORBIDDEN, b"no such WebSocket path\n"), None
            )
        return Member(self, match.group(1))

    # --- rooms ---------------------------------------------------------------

    async def join(self, member: Member) -> None:
        room = member.room
        async with self._subscribing:
            if room not in self.rooms:
                await self.pubsub.subscribe(self.channel(room))
                self.rooms[room] = set()
                if self._listener is None or self._listener.done():
                    self._listener = asyncio.get_running_loop().create_task(self.listen())
        if member.transport.is_disconnected:
            return
        # Welcome after joining, as the Channels consumer does.
        self.rooms[room].add(member)
        member.send(protocol.dumps(protocol.welcome(room, self.pod)))

    def leave(self, member: Member) -> None:
        members = self.rooms.get(member.room)
        if members is not None:
            members.discard(member)

    def on_text(self, member: Member, text: str) -> None:
        try:
            decoded = protocol.decode_text_frame(text, None, self.max_message_bytes)
            event = protocol.chat_event(decoded, origin=self.pod)
        except protocol.FrameError as error:
            member.send(protocol.dumps(protocol.error_frame(error)))
            return
        self.spawn(self.redis.publish(self.channel(member.room), json.dumps(event)))

    async def listen(self) -> None:
        prefix = len(self.channel(""))
        async for message in self.pubsub.listen():
            members = self.rooms.get(message["channel"].decode()[prefix:])
            if members:
                # Encoded once per replica, written to every local member.
                data = protocol.dumps(protocol.chat_delivery(json.loads(message["data"]), served_by=self.pod)).encode()
                for member in members:
                    member.transport.send(WSMsgType.TEXT, data)


async def serve_forever(host: str, port: int) -> None:
    server_state = PicowsFanoutServer(**server_settings("picows"))
    try:
        await asyncio.wait_for(server_state.redis.ping(), 10.0)
    except (TimeoutError, OSError, RedisError) as error:
        raise SystemExit(f"Redis does not answer: {error!r}") from None
    stop = stop_on_signals()
    server = await ws_create_server(
        server_state.route,
        host,
        port,
        max_frame_size=server_state.max_message_bytes,
        enable_auto_ping=True,
        auto_ping_idle_timeout=PING_INTERVAL,
        auto_ping_reply_timeout=PING_TIMEOUT,
    )
    async with server:
        await stop


def main(argv: list[str] | None = None) -> None:
    reference_server.main(__doc__.splitlines()[0], serve_forever, uvloop.run, argv)


if __name__ == "__main__":
    main()
