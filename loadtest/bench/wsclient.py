"""A bare WebSocket client for the benchmark: frames are parsed where bytes arrive.

A general client (``websockets``) spends tens of microseconds per received
frame on its parser coroutine, its queue and a task wake-up; at tens of
thousands of deliveries a second that is the load generator's whole core, and
the benchmark would measure itself. Here a frame costs a few slices of one
bytearray: ``data_received`` splits every complete frame out of the buffer and
hands each text payload, with the time the bytes were read, to a callback.

Scope, on purpose: text frames out (masked, as RFC 6455 requires of clients),
text frames in, pings answered, close handled; no extensions (nothing is
offered, so no server compresses), no binary messages.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable

from websockets.utils import accept_key, apply_mask, generate_key

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
NORMAL_CLOSURE = 1000
# A server's handshake answer bigger than this is not one.
MAX_RESPONSE_HEAD = 16 * 1024


class HandshakeRefused(Exception):
    def __init__(self, status: int, head: str):
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status
        self.head = head


class ProtocolError(Exception):
    """The server broke RFC 6455 (masked frames, a bad accept key, garbage)."""


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame with a fresh mask."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    # The mask protects proxies' caches from crafted payloads, not secrets:
    # Python's fast PRNG is what a load generator can afford per frame.
    mask = random.randbytes(4)
    return header + mask + apply_mask(payload, mask)


class WsClient(asyncio.Protocol):
    """One socket. ``on_text(payload: bytes, received_at: float)`` gets every
    text message; ``on_close(client)`` runs once when the connection ends."""

    def __init__(
        self,
        host: str,
        path: str,
        origin: str,
        on_text: Callable[[bytes, float], None],
        on_close: Callable[[WsClient], None] | None = None,
    ):
        self.host = host
        self.path = path
        self.origin = origin
        self.on_text = on_text
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.fragments: list[bytes] | None = None
        self.open = False
        self.closing = False
        #: the close code the server sent, if it sent one
        self.close_code: int | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._key = generate_key()

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Origin: {self.origin}\r\n"
            "\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open:
            if not self._read_handshake():
                return
        self._read_frames(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"connection closed during the handshake: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)
            if self.on_close:
                self.on_close(self)

    # --- frames -----------------------------------------------------------

    def _read_handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_RESPONSE_HEAD:
                self._fail(ProtocolError("no end to the handshake response"))
            return False
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101:
            self._fail(HandshakeRefused(status, head))
            return False
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != accept_key(self._key):
            self._fail(ProtocolError("wrong Sec-WebSocket-Accept"))
            return False
        self.open = True
        self.handshake.set_result(None)
        return True

    def _read_frames(self, received_at: float) -> None:
        buffer = self.buffer
        size = len(buffer)
        position = 0
        while size - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            if second & 0x80:
                self._fail(ProtocolError("the server masked a frame"))
                return
            length = second & 0x7F
            start = position + 2
            if length == 126:
                if size - start < 2:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            self._frame(first & 0x80, first & 0x0F, bytes(buffer[start:end]), received_at)
            position = end
        if position:
            del buffer[:position]

    def _frame(self, final: int, opcode: int, payload: bytes, received_at: float) -> None:
        if opcode in (TEXT, CONTINUATION):
            if not final:
                self.fragments = (self.fragments or []) + [payload]
                return
            if self.fragments is not None:
                payload = b"".join(self.fragments + [payload])
                self.fragments = None
            self.on_text(payload, received_at)
        elif opcode == PING:
            self._write(PONG, payload)
        elif opcode == CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if not self.closing:
                self.closing = True
                self._write(CLOSE, payload[:2])
            self.transport.close()
        elif opcode == BINARY:
            self._fail(ProtocolError("the chat protocol has no binary frames"))

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload))

    def _fail(self, error: Exception) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    # --- what callers use -------------------------------------------------

    def send_text(self, text: str) -> None:
        if not self.open or self.closing:
            raise ConnectionError(f"socket to {self.path} is closed")
        self._write(TEXT, text.encode())

    def close(self) -> None:
        """Start the closing handshake; ``closed`` resolves when the server has closed."""
        if self.open and not self.closing:
            self.closing = True
            self._write(CLOSE, struct.pack("!H", NORMAL_CLOSURE))
        elif self.transport is not None and not self.open:
            self.transport.close()


async def connect(
    host: str,
    port: int,
    path: str,
    *,
    origin: str,
    on_text: Callable[[bytes, float], None],
    on_close: Callable[[WsClient], None] | None = None,
    source: str | None = None,
    timeout: float = 10.0,
) -> WsClient:
    """Open a socket to ``ws://host:port/path``, from the local address ``source`` when given."""
    loop = asyncio.get_running_loop()

    def factory() -> WsClient:
        return WsClient(f"{host}:{port}", path, origin, on_text, on_close)

    async def opening() -> WsClient:
        _, client = await loop.create_connection(factory, host, port, local_addr=(source, 0) if source else None)
        try:
            await client.handshake
        except BaseException:
            client.transport.abort()
            raise
        return client

    return await asyncio.wait_for(opening(), timeout)
