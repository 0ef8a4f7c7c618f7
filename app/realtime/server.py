"""Daphne with a graceful drain: ``python -m realtime.server <daphne args>``.

Stock Daphne stops its reactor on SIGTERM and cancels every consumer, so each
client sees an abrupt 1006 and nothing leaves its groups cleanly. This server
takes SIGTERM (and SIGINT) itself and drains instead:

1. marks the replica draining: /readyz answers 503, new sockets are refused;
2. stops listening, so nginx's next handshake fails over to another replica
   at once (a refused connection is retried upstream; a 403 would not be);
3. closes every open socket with 1001 (going away): clients reconnect, with
   backoff, through nginx to the remaining replicas; each consumer's
   disconnect discards its group memberships;
4. exits once every consumer has run its disconnect, or after
   DRAIN_TIMEOUT_SECONDS.

A second signal stops at once. Kubernetes' terminationGracePeriodSeconds must
exceed the preStop pause plus DRAIN_TIMEOUT_SECONDS.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import reactor

from realtime.replica import state

logger = logging.getLogger(__name__)

GOING_AWAY = 1001


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


def drain_timeout() -> float:
    return float(os.environ.get("DRAIN_TIMEOUT_SECONDS", "20"))


class DrainingServer(Server):
    def run(self):
        self.ports = []
        # Twisted's own handlers would stop the reactor on SIGTERM (the abrupt path).
        self.signal_handlers = False
        reactor.callWhenRunning(self._take_signals)
        super().run()

    def listen_success(self, port):
        self.ports.append(port)
        super().listen_success(port)

    def _take_signals(self):
        # Runs as the reactor starts, after run() built the factory and before
        # the first connection is served.
        self.ws_factory.protocol = ServerCloseProtocol
        loop = asyncio.get_event_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum):
        if state.draining:
            logger.warning("second %s while draining: stopping now", signal.Signals(signum).name)
            self.stop()
            return
        asyncio.ensure_future(self.drain())

    def _open_sockets(self) -> list[WebSocketProtocol]:
        return [
            protocol
            for protocol in self.connections
            if isinstance(protocol, WebSocketProtocol) and protocol.state == WebSocketProtocol.STATE_OPEN
        ]

    async def drain(self):
        state.start_draining()
        for port in self.ports:
            port.stopListening()
        sockets = self._open_sockets()
        for protocol in sockets:
            protocol.serverClose(code=GOING_AWAY)
        # Done when every consumer has run its disconnect (memberships
        # discarded). Daphne's own shutdown then cancels what is left of them.
        loop = asyncio.get_event_loop()
        deadline = loop.time() + drain_timeout()
        while state.open_sockets and loop.time() < deadline:
            await asyncio.sleep(0.05)
        logger.info("drained %d sockets; %d still open at exit", len(sockets), state.open_sockets)
        self.stop()


class DrainingCommandLine(CommandLineInterface):
    server_class = DrainingServer


if __name__ == "__main__":
    DrainingCommandLine.entrypoint()
