"""Connecting WebsocketCommunicators to the real ASGI application."""

from __future__ import annotations

from channels.testing import WebsocketCommunicator
from config.asgi import application

ORIGIN = (b"origin", b"http://testserver")


async def connect(path: str, origin: tuple[bytes, bytes] | None = ORIGIN) -> tuple[WebsocketCommunicator, bool]:
    headers = [origin] if origin else []
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect()
    return communicator, connected


async def join(room: str) -> WebsocketCommunicator:
    """A chat member past its welcome frame."""
    communicator, connected = await connect(f"/ws/chat/{room}/")
    assert connected
    welcome = await communicator.receive_json_from()
    assert welcome["type"] == "welcome"
    return communicator
