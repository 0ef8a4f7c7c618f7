"""The replicas' WebSocket protocol: Daphne's, with the server's close codes,
a bounded queue per client, and a lean write path.

Every fan-out delivery passes through here once per member socket, so the
per-frame work is cut to what a frame needs: the frame is built once for every
socket it goes to (``realtime.events.SharedFrame``), and, where Twisted's
version is one the fast path was verified against (``realtime.compat``),
written to the socket at once (``DirectWriteProtocol``).

A client that stops reading must not grow the replica's memory. Twisted's
transport buffers without limit; here the protocol is the transport's
streaming producer instead, so the transport holds at most its own
``bufferSize`` (64 KiB) and says when it has drained. Data frames that do not
fit wait in this protocol's queue, in order, up to ``WS_MAX_PENDING_BYTES``
per socket and ``WS_MAX_PENDING_BYTES_TOTAL`` over the replica; past either,
the socket is closed with 4000 (fell behind: reconnect and resume) and its
queue dropped. Control frames (pings, pongs, close) never wait in the queue:
a slow client still gets its pings, and the drain's 1001 or the 4000, behind
at most what the transport already holds.
"""

from __future__ import annotations

import collections
import logging

from autobahn.websocket.types import ConnectionDeny
from daphne.ws_protocol import WebSocketProtocol
from django.conf import settings

from realtime import close_codes, compat
from realtime.events import SharedFrame
from realtime.replica import state

logger = logging.getLogger(__name__)

# The opcode bit that marks a control frame (close 0x8, ping 0x9, pong 0xA),
# in the first byte of a frame this server sends.
CONTROL_FRAME = 0x08
# A socket's backlog while nothing waits in it: falsy and shared, so an idle
# socket holds no queue of its own.
NO_BACKLOG: tuple[()] = ()

# Every connection of the replica, for the drain to close (Daphne's own list
# is no public API).
open_protocols: set[ServerCloseProtocol] = set()


def _metrics():
    # Imported when first needed: the drain server imports this module before
    # Django's settings are loaded, and the metrics module reads them.
    from realtime import metrics

    return metrics


class ServerCloseProtocol(WebSocketProtocol):
    """Daphne's WebSocket protocol, able to send the server's own close codes,
    with a bounded queue for a client that reads slower than it is sent to.

    autobahn's sendClose takes only 1000 and 3000-4999, the codes an
    application picks; the RFC 6455 codes a server means here (1001 going
    away, 1008 policy violation, 1011, 1012, 1013) would raise inside Daphne
    instead of reaching the client. sendCloseFrame sends them.
    """

    SERVER_CODES = {
        close_codes.GOING_AWAY,
        close_codes.POLICY_VIOLATION,
        close_codes.SERVER_ERROR,
        close_codes.SERVICE_RESTART,
        close_codes.TRY_AGAIN_LATER,
        close_codes.FELL_BEHIND,
    }

    def connectionMade(self):
        super().connectionMade()
        open_protocols.add(self)
        # A deque only while frames wait (an empty one is about 600 bytes, on
        # every idle socket); NO_BACKLOG otherwise.
        self._backlog: collections.deque[bytes] | tuple[()] = NO_BACKLOG
        self._backlog_bytes = 0
        self._paused = False
        # The HTTP channel that upgraded this connection is still the
        # transport's producer; this protocol writes now, so it is told when
        # the transport is full and when it has drained.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    # --- IPushProducer: called by the transport -----------------------------

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        while self._backlog and not self._paused:
            data = self._backlog.popleft()
            self._backlog_bytes -= len(data)
            state.pending_bytes -= len(data)
            self.transport.write(data)  # may pause again
        if not self._backlog:
            self._backlog = NO_BACKLOG

    def stopProducing(self):
        self._drop_backlog()

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in this socket's queue for a client that has not read them yet."""
        return self._backlog_bytes

    def _drop_backlog(self):
        state.pending_bytes -= self._backlog_bytes
        self._backlog_bytes = 0
        self._backlog = NO_BACKLOG

    # --- sending -----------------------------------------------------------

    def serverClose(self, code=None):
        if code in self.SERVER_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            super().serverClose(code)

    def serverReject(self):
        # A handshake refused because the replica cannot serve (it lost Redis)
        # or should not (it holds well above the deployment's mean socket
        # count) answers 503, which nginx retries on another replica, not 403.
        if state.redis_links_down or state.above_mean:
            self.handshake_deferred.errback(ConnectionDeny(code=503, reason="Service Unavailable"))
            del self.handshake_deferred
            self.server.protocol_disconnected(self)
            return
        super().serverReject()

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        # Nothing may follow a close frame, so what is queued will never be sent.
        self._drop_backlog()
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)

    def serverSend(self, content, binary=False):
        if self.state != self.STATE_OPEN:
            # Closing or closed: the client learns why from the close code;
            # a frame for it is dropped and counted, not an error per message.
            metrics = _metrics()
            metrics.DELIVERIES_DROPPED.labels(metrics.REPLICA, "closing").inc()
            return
        if binary:
            super().serverSend(content, binary)
            return
        if type(content) is SharedFrame:
            prepared = content.prepared(self.factory)
        else:
            prepared = self.factory.prepareMessage(content.encode("utf8"))
        self.sendPreparedMessage(prepared)

    def sendData(self, data, sync=False, chopsize=None):
        # The handshake response and autobahn's own queued writes keep
        # Twisted's path; so does everything once the socket is closing.
        if sync or chopsize or self.send_queue or self.state != self.STATE_OPEN:
            super().sendData(data, sync, chopsize)
        elif data[0] & CONTROL_FRAME:
            self.transport.write(data)
        elif self._paused or self._backlog:
            self._queue(data)
        else:
            self.write_frame(data)

    def write_frame(self, data: bytes) -> None:
        self.transport.write(data)

    def _queue(self, data: bytes) -> None:
        if self._backlog is NO_BACKLOG:
            self._backlog = collections.deque()
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        state.pending_bytes += len(data)
        if self._backlog_bytes > settings.WS_MAX_PENDING_BYTES:
            self._fell_behind("over WS_MAX_PENDING_BYTES")
        elif state.pending_bytes > settings.WS_MAX_PENDING_BYTES_TOTAL:
            self._fell_behind("the replica is over WS_MAX_PENDING_BYTES_TOTAL")

    def _fell_behind(self, why: str) -> None:
        metrics = _metrics()
        metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "slow_consumer").inc()
        logger.info("closing a socket that stopped reading (%d bytes queued, %s): 4000", self._backlog_bytes, why)
        # autobahn drops the connection if the close is not answered within
        # its closeHandshakeTimeout: a client that reads nothing is gone then.
        self.sendCloseFrame(code=close_codes.FELL_BEHIND, reasonUtf8=b"fell behind: reconnect and resume")

    def connectionLost(self, reason):
        open_protocols.discard(self)
        self._drop_backlog()
        super().connectionLost(reason)


class DirectWriteProtocol(ServerCloseProtocol):
    """A frame with nothing queued before it goes to the socket at once
    (``compat.write_now``) instead of waiting in Twisted's buffer for the
    reactor's next turn."""

    def write_frame(self, data: bytes) -> None:
        if not compat.write_now(self.transport, data):
            self.transport.write(data)
