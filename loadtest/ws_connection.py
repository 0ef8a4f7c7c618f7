"""One WebSocket to the target, for locust users under gevent.

websocket-client is a blocking client; locust monkey-patches sockets, so a
blocking ``recv`` only parks its own greenlet. Each connection therefore gets
exactly one receive greenlet that hands every decoded frame to a callback and
is killed when the connection is closed. (asyncio clients would need their own
event loop and do not mix with locust's gevent hub.)
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import gevent
import websocket

# No close frame: the network, or a server that died, ended the socket.
ABNORMAL_CLOSURE = 1006


class ConnectionLost(Exception):
    """The server closed the socket, or the network did, while we still wanted it.

    ``code`` is the server's close code (1001 draining, 1012 lost Redis, 4000
    fell behind, ...), or 1006 when the socket ended without a close frame.
    """

    def __init__(self, message: str, code: int = ABNORMAL_CLOSURE):
        super().__init__(message)
        self.code = code


class BadFrame(Exception):
    """The server sent something that is not a JSON object."""


def ws_url(base_url: str, path: str) -> str:
    """``http://host:port`` + ``/ws/echo/`` -> ``ws://host:port/ws/echo/``."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the target must be an http:// or https:// URL, got {base_url!r}")
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{path}"


def origin_of(base_url: str) -> str:
    """The Origin header a browser on the target's own page would send."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


class WsConnection:
    """A connected socket plus its receive greenlet.

    ``on_frame(frame)`` gets every JSON object the server sends;
    ``on_error(error)`` gets ``BadFrame`` (reading goes on) or ``ConnectionLost``
    (reading stops). Neither is called after ``close()``.
    """

    def __init__(
        self,
        base_url: str,
        path: str,
        on_frame: Callable[[dict], None],
        on_error: Callable[[Exception], None],
        timeout: float,
    ):
        self.on_frame = on_frame
        self.on_error = on_error
        self.closing = False
        started = time.perf_counter()
        self.sock = websocket.create_connection(ws_url(base_url, path), timeout=timeout, origin=origin_of(base_url))
        #: time from TCP connect to the server's 101, in milliseconds
        self.handshake_ms = (time.perf_counter() - started) * 1000
        # The handshake timeout must not turn a quiet room into a read error;
        # Daphne's pings (answered inside recv) keep an idle socket alive.
        self.sock.settimeout(None)
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            try:
                # recv_data, not recv: recv turns the server's close frame into
                # "" and drops its code, which says why (and the code is what a
                # client that reconnects reports).
                with self.sock.readlock:
                    opcode, data = self.sock.recv_data()
            except (websocket.WebSocketException, OSError) as error:
                if not self.closing:
                    self.on_error(ConnectionLost(f"{type(error).__name__}: {error}"))
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                if not self.closing:
                    reason = data[2:].decode("utf-8", "replace")
                    self.on_error(ConnectionLost(f"closed by the server with {code} {reason}".rstrip(), code=code))
                return
            try:
                text = None
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    text = data if isinstance(data, str) else data.decode("utf-8")
                frame = json.loads(text) if text is not None else None
            except ValueError:
                frame = None
            if not isinstance(frame, dict):
                self.on_error(BadFrame(f"not a JSON object: {str(data)[:80]!r}"))
                continue
            self.on_frame(frame)

    def send(self, frame: dict) -> None:
        try:
            self.sock.send(json.dumps(frame, separators=(",", ":")))
        except (websocket.WebSocketException, OSError) as error:
            raise ConnectionLost(f"{type(error).__name__}: {error}") from None

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.reader.kill(block=True, timeout=1)
        try:
            self.sock.close(timeout=1)
        except (websocket.WebSocketException, OSError):
            pass  # already gone: nothing left to release
