"""One WebSocket to the target, for locust users under gevent.

websocket-client is a blocking client; locust monkey-patches sockets, so a
blocking ``recv`` only parks its own greenlet. Each connection therefore gets
exactly one receive greenlet that hands every decoded frame to a callback and
is killed when the connection is closed. (asyncio clients would need their own
event loop and do not mix with locust's gevent hub.)
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import gevent
import websocket


class ConnectionLost(Exception):
    """The server closed the socket, or the network did, while we still wanted it."""


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
                text = self.sock.recv()
            except (websocket.WebSocketException, OSError) as error:
                if not self.closing:
                    self.on_error(ConnectionLost(f"{type(error).__name__}: {error}"))
                return
            if text == "":
                # websocket-client returns "" for the server's close frame.
                if not self.closing:
                    self.on_error(ConnectionLost("closed by the server"))
                return
            try:
                frame = json.loads(text)
            except ValueError:
                frame = None
            if not isinstance(frame, dict):
                self.on_error(BadFrame(f"not a JSON object: {str(text)[:80]!r}"))
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
