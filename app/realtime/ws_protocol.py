"""The replicas' WebSocket protocol: Daphne's, with the server's close codes and a lean write path.

Every fan-out delivery passes through here once per member socket, so the
per-frame work is cut to what a frame needs: the frame is built once for every
socket it goes to, and written to the socket at once.
"""
from __future__ import annotations

from autobahn.websocket.protocol import PreparedMessage
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import tcp


class ServerCloseProtocol(WebSocketProtocol):
    """Daphne's WebSocket protocol, able to send the server's own close codes.

    autobahn's sendClose takes only 1000 and 3000-4999, the codes an
    application picks; the RFC 6455 codes a server means here (1001 going
    away, 1008 policy violation, 1011, 1013 try again later) would raise
    inside Daphne instead of reaching the client. sendCloseFrame sends them.
    """

    SERVER_CODES = {1001, 1008, 1011, 1013}

    def serverClose(self, code=None):
        if code in self.SERVER_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            super().serverClose(code)

    # The last text sent and its frame, shared by every socket of the replica:
    # the fan-out layer sends the same str to each member of a room, and
    # autobahn's prepared messages frame it once for all of them.
    _prepared: tuple[str | None, PreparedMessage | None] = (None, None)

    def serverSend(self, content, binary=False):
        if binary or self.state != self.STATE_OPEN:
            super().serverSend(content, binary)
            return
        text, prepared = ServerCloseProtocol._prepared
        if text is not content:
            prepared = self.factory.prepareMessage(content.encode("utf8"))
            ServerCloseProtocol._prepared = (content, prepared)
        self.sendPreparedMessage(prepared)

    def sendData(self, data, sync=False, chopsize=None):
        # Only frames of an open socket: the handshake response keeps
        # Twisted's own path.
        if (
            sync or chopsize or self.send_queue or self.state != self.STATE_OPEN
            or not write_now(self.transport, data)
        ):
            super().sendData(data, sync, chopsize)


def write_now(transport, data: bytes) -> bool:
    """Write ``data`` to the socket at once when nothing is queued before it.

    Twisted's TCP transport only buffers on ``write``: the bytes go out on the
    reactor's next turn, after two epoll_ctl calls (watch for writable, then
    stop) and a dispatch of the writable event, for every frame on every
    socket. That is most of a fan-out delivery's cost after the send itself.
    asyncio's transports try the send first; so does this. What the socket
    does not take is handed to the transport, which sends it in order.
    False (nothing written) leaves the frame to Twisted: TLS, a backlog, a
    closing connection, an error to report. It reads the transport's buffer
    attributes, which Twisted does not promise to keep:
    tests/integration/test_replica_writes.py fails if order or bytes suffer.
    """
    if (
        type(transport) is not tcp.Server
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
    ):
        return False
    try:
        sent = transport.socket.send(data)
    except OSError:
        return False
    if sent < len(data):
        transport.write(data[sent:])
    return True
