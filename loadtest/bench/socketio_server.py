"""The peer a Python team picks instead of Channels: python-socketio with its Redis manager.

    POD_NAME=socketio-1 REDIS_URL=redis://... python -m loadtest.bench.socketio_server --port 8000

A stock ``socketio.AsyncServer`` with ``socketio.AsyncRedisManager`` (every
server publishes each emit to one Redis channel and delivers it to its own
members of the room), served by uvicorn as python-socketio's ASGI docs show,
with uvicorn's defaults (uvloop when installed, as it is here, and the
``websockets`` protocol implementation). Three of them run behind the same
nginx as the Daphne replicas, on the same path ``/ws/chat/<room>/`` (the
Engine.IO path; nginx proxies ``/ws/`` to the replicas), and answer
``/healthz`` and ``/readyz`` with their POD_NAME.

**Protocol choice: the generator speaks Socket.IO** (Engine.IO 4 over its
WebSocket transport, a thin adapter in ``loadgen.SocketIOMember``), rather
than this server speaking the blueprint's JSON frames. Socket.IO's framing
cannot be turned off: every WebSocket message is an Engine.IO packet and
every event a Socket.IO packet inside it, so "the same JSON protocol over its
plain WebSocket transport" would mean bypassing python-socketio's packet
layer, rooms and Redis manager, and measuring something nobody deploys. The
adapter costs the generator a two-byte prefix and a JSON array per frame;
the events carry the blueprint's own frames (``realtime.protocol`` shapes
and validates them, as in the other servers): the client emits ``message``
with ``{"message", "id", "sent_at"}``, the server emits ``welcome`` to the
new member and ``chat.message`` to the room. Two differences, both in
python-socketio's favour and stated so: clients connect straight to the
WebSocket transport (no long-polling first, which ops teams turn on for
old proxies only), and a delivery has no ``served_by`` (the manager sends
one payload to every server): the generator takes it from the member's
welcome, which names the replica that serves the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re

import socketio
import uvicorn
from realtime import protocol
from redis.asyncio import Redis
from redis.exceptions import RedisError

CHAT_PATH = re.compile(r"/ws/chat/([^/]+)/")
ENGINEIO_PATH = "ws/chat"
# Engine.IO's keepalive, near the Daphne replicas' 20 s ping.
PING_INTERVAL = 20
PING_TIMEOUT = 30


def build_app(pod: str, redis_url: str, prefix: str, max_message_bytes: int):
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=socketio.AsyncRedisManager(redis_url, channel=f"{prefix}:socketio"),
        # The generator's Origin is nginx's address; the Daphne replicas check
        # it against DJANGO_ALLOWED_HOSTS, which this benchmark sets to it anyway.
        cors_allowed_origins="*",
        transports=["websocket"],
        always_connect=True,
        max_http_buffer_size=max_message_bytes,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
    )
    rooms: dict[str, str] = {}
    health = Redis.from_url(redis_url)

    @sio.event
    async def connect(sid, environ, auth=None):
        match = CHAT_PATH.fullmatch(environ.get("PATH_INFO", ""))
        if not match or not protocol.is_valid_room(match.group(1)):
            return False
        room = match.group(1)
        rooms[sid] = room
        await sio.enter_room(sid, room)
        # Welcome after joining, as the Channels consumer does.
        await sio.emit("welcome", protocol.welcome(room, pod), to=sid)

    @sio.event
    async def disconnect(sid, reason=None):
        rooms.pop(sid, None)

    @sio.event
    async def message(sid, data):
        room = rooms.get(sid)
        if room is None:
            return
        try:
            if not isinstance(data, dict):
                raise protocol.FrameError("bad_json", "the message must be a JSON object")
            protocol.check_portable(data)
            event = protocol.chat_event(data, origin=pod)
        except protocol.FrameError as error:
            await sio.emit("error", protocol.error_frame(error), to=sid)
            return
        frame = protocol.chat_delivery(event, served_by=None)
        del frame["served_by"]
        await sio.emit("chat.message", frame, room=room)

    async def health_app(scope, receive, send):
        if scope["type"] == "lifespan":
            return
        status, body = 404, {"status": "not found", "pod": pod}
        if scope["path"] == "/healthz":
            status, body = 200, {"status": "ok", "pod": pod}
        elif scope["path"] == "/readyz":
            try:
                await asyncio.wait_for(health.ping(), 2.0)
                status, body = 200, {"status": "ok", "pod": pod}
            except (TimeoutError, OSError, RedisError) as error:
                status, body = 503, {"status": "unavailable", "pod": pod, "reason": repr(error)}
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    return socketio.ASGIApp(sio, other_asgi_app=health_app, socketio_path=ENGINEIO_PATH)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = build_app(
        pod=os.environ.get("POD_NAME", "socketio"),
        redis_url=os.environ["REDIS_URL"],
        prefix=os.environ.get("CHANNEL_LAYER_PREFIX", "asgi"),
        max_message_bytes=int(os.environ.get("WS_MAX_MESSAGE_BYTES", 64 * 1024)),
    )
    uvicorn.run(app, host=args.host, port=args.port, lifespan="off", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
