"""The generator's WebSocket client: picows' client under the small interface the fleet uses.

A general client (``websockets``) spends tens of microseconds per received
frame on its parser coroutine, its queue and a task wake-up; at tens of
thousands of deliveries a second that is the load generator's whole core, and
the benchmark would measure itself. picows (Cython) parses frames in the
protocol's ``data_received`` and calls ``on_ws_frame`` for each, with no task
or queue in between, so it replaced the hand-written frame parser this module
used to hold. What is left here is glue: a handshake refusal as its HTTP
status, the time the bytes were read, messages split over continuation frames
joined, the server's close answered and its code kept.

Scope, on purpose: text messages out and in (the chat protocol has no binary
frames), pings answered by picows, no extensions offered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from picows import WSCloseCode, WSFrame, WSHandshakeError, WSListener, WSMsgType, WSTransport, ws_connect

NORMAL_CLOSURE = 1000


class HandshakeRefused(Exception):
    def __init__(self, status: int, head: str):
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status
        self.head = head


class ProtocolError(Exception):
    """The server sent what the chat protocol never does (binary frames)."""


class WsClient(WSListener):
    """One socket. ``on_text(payload: bytes, received_at: float)`` gets every
    text message; ``on_open(client)`` runs when the handshake is done, before
    the first frame; ``on_close(client)`` runs once when the connection ends."""

    def __init__(
        self,
        path: str,
        on_text: Callable[[bytes, float], None],
        on_close: Callable[[WsClient], None] | None = None,
        on_open: Callable[[WsClient], None] | None = None,
    ):
        self.path = path
        self.on_open = on_open
        self.on_text = on_text
        self.on_close = on_close
        self.transport: WSTransport | None = None
        self.fragments: list[bytes] | None = None
        self.open = False
        self.closing = False
        #: the close code the server sent, if it sent one
        self.close_code: int | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- picows.WSListener ---------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.open = True
        if self.on_open:
            self.on_open(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.CONTINUATION:
            payload = frame.get_payload_as_bytes()
            if not frame.fin:
                self.fragments = (self.fragments or []) + [payload]
                return
            if self.fragments is not None:
                payload = b"".join(self.fragments + [payload])
                self.fragments = None
            self.on_text(payload, time.monotonic())
        elif kind is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = None if code is WSCloseCode.NO_INFO else int(code.value)
            if not self.closing:
                self.closing = True
                transport.send_close(code if self.close_code else WSCloseCode.OK)
            transport.disconnect()
        elif kind is WSMsgType.BINARY:
            raise ProtocolError("the chat protocol has no binary frames")  # picows disconnects

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.open = False
        if not self.closed.done():
            self.closed.set_result(None)
            if self.on_close:
                self.on_close(self)

    # --- what callers use ----------------------------------------------------

    def send_text(self, text: str) -> None:
        if not self.open or self.closing:
            raise ConnectionError(f"socket to {self.path} is closed")
        self.transport.send(WSMsgType.TEXT, text.encode())

    def close(self) -> None:
        """Start the closing handshake; ``closed`` resolves when the server has closed."""
        if self.open and not self.closing:
            self.closing = True
            self.transport.send_close(WSCloseCode.OK)
        elif self.transport is not None and not self.open:
            self.transport.disconnect(graceful=False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)


async def connect(
    host: str,
    port: int,
    path: str,
    *,
    origin: str,
    on_text: Callable[[bytes, float], None],
    on_close: Callable[[WsClient], None] | None = None,
    on_open: Callable[[WsClient], None] | None = None,
    source: str | None = None,
    timeout: float = 10.0,
) -> WsClient:
    """Open a socket to ``ws://host:port/path``, from the local address ``source`` when given."""
    try:
        _, client = await ws_connect(
            lambda: WsClient(path, on_text, on_close, on_open),
            f"ws://{host}:{port}{path}",
            websocket_handshake_timeout=timeout,
            extra_headers={"Origin": origin},
            max_redirects=0,
            local_addr=(source, 0) if source else None,
        )
    except WSHandshakeError as error:
        response = error.response
        if response is None:
            raise ConnectionError(f"bad handshake answer: {error}") from None
        raise HandshakeRefused(int(response.status), (error.raw_header or b"").decode("latin-1")) from None
    return client
