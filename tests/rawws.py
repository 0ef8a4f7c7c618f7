"""A raw WebSocket client over a plain TCP socket, for hostile tests.

Unlike a real client library it sends whatever it is told: any opcode, RSV
bits, masked or not, a length header that lies, fragments, control frames with
big payloads, text frames that are not UTF-8, bytes that are not frames at all.
It can stop reading (a small SO_RCVBUF and no recv calls: the server's writes
back up), and it can keep sending after the server closed.

Blocking sockets with timeouts: a test runs it in a thread (asyncio.to_thread)
when it needs to do other things meanwhile.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from dataclasses import dataclass

# Opcodes (RFC 6455 section 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
    length: int | None = None,
    length_form: str | None = None,
) -> bytes:
    """One frame's bytes. ``length`` overrides the payload length the header
    declares (a lie, when it differs from len(payload)); ``length_form`` forces
    the 7-bit, 16-bit or 64-bit encoding ("7", "16", "64") even where another
    is the minimal one. ``rsv`` is the three RSV bits as 0-7."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    mask_bit = 0x80 if mask else 0
    form = length_form or ("7" if declared < 126 else "16" if declared < 65536 else "64")
    if form == "7":
        header = struct.pack("!BB", first, mask_bit | (declared & 0x7F))
    elif form == "16":
        header = struct.pack("!BBH", first, mask_bit | 126, declared & 0xFFFF)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, declared & 0xFFFFFFFFFFFFFFFF)
    if not mask:
        return header + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return header + key + apply_mask(payload, key)


def apply_mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != CLOSE:
            return None
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else 1005

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")


class HandshakeRefused(Exception):
    def __init__(self, status_line: str):
        super().__init__(status_line)
        self.status_line = status_line


class RawWebSocket:
    """One client connection. ``closed_by_server`` is the close code the server
    sent (None until one is read), ``eof`` whether the TCP connection ended."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        origin: str | None = None,
        rcvbuf: int | None = None,
        timeout: float = 5.0,
        extra_headers: list[tuple[str, str]] | None = None,
    ):
        self.host, self.port, self.path = host, port, path
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect: the window the client advertises is fixed then.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buffer = b""
        self.close_code: int | None = None
        self.eof = False
        # Duplex: one thread reads while another sends. Reads then keep the
        # socket's own timeout (settimeout would change the sender's too).
        self.duplex = False
        self._handshake(origin or f"http://{host}:{port}", extra_headers or [])

    def _handshake(self, origin: str, extra_headers: list[tuple[str, str]]) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Origin: {origin}",
            *(f"{name}: {value}" for name, value in extra_headers),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise HandshakeRefused(self.buffer.decode(errors="replace").split("\r\n", 1)[0] or "connection closed")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status + " ":
            raise HandshakeRefused(status)

    # --- sending ---------------------------------------------------------

    def send_raw(self, data: bytes) -> bool:
        """Write bytes as they are; False when the connection is gone (reset, broken pipe)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def send_frame(self, opcode: int, payload: bytes = b"", **options) -> bool:
        return self.send_raw(frame(opcode, payload, **options))

    def send_text(self, text: str | bytes) -> bool:
        return self.send_frame(TEXT, text.encode() if isinstance(text, str) else text)

    def send_binary(self, data: bytes) -> bool:
        return self.send_frame(BINARY, data)

    def send_close(self, code: int = 1000) -> bool:
        return self.send_frame(CLOSE, close_payload(code))

    # --- reading -----------------------------------------------------------

    def _fill(self, need: int, deadline: float) -> bool:
        while len(self.buffer) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not self.duplex:
                self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if self.duplex:
                    continue
                return False
            except OSError:  # reset by the server
                self.eof = True
                return False
            if not chunk:
                self.eof = True
                return False
            self.buffer += chunk
        return True

    def recv_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next whole frame, or None on timeout or end of connection.
        Server frames are never masked; a mask is honoured anyway."""
        deadline = time.monotonic() + timeout
        if not self._fill(2, deadline):
            return None
        first, second = self.buffer[0], self.buffer[1]
        length, offset = second & 0x7F, 2
        if length == 126:
            if not self._fill(4, deadline):
                return None
            length, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif length == 127:
            if not self._fill(10, deadline):
                return None
            length, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
        key = None
        if second & 0x80:
            if not self._fill(offset + 4, deadline):
                return None
            key, offset = self.buffer[offset : offset + 4], offset + 4
        if not self._fill(offset + length, deadline):
            return None
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        if key:
            payload = apply_mask(payload, key)
        received = Frame(bool(first & 0x80), first & 0x0F, payload)
        if received.opcode == CLOSE and self.close_code is None:
            self.close_code = received.close_code
        return received

    def frames_until_close(self, timeout: float = 5.0) -> list[Frame]:
        """Every frame until the server's close frame (included), EOF or timeout."""
        deadline = time.monotonic() + timeout
        frames = []
        while time.monotonic() < deadline:
            received = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if received is None:
                break
            frames.append(received)
            if received.opcode == CLOSE:
                break
        return frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
