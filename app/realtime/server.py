"""Daphne with a graceful drain: ``python -m realtime.server --bind HOST --port PORT``
(realtime.command_line adds the production options and the application).

Stock Daphne stops its reactor on SIGTERM and cancels every consumer, so each
client sees an abrupt 1006 and nothing leaves its groups cleanly. This server
takes SIGTERM (and SIGINT) itself and drains instead:

1. marks the replica draining: /readyz answers 503, new sockets are refused;
2. stops listening, so nginx's next handshake fails over to another replica
   at once (a refused connection is retried upstream; a 403 would not be),
   and withdraws its socket count from the deployment's (realtime.peers);
3. closes its open sockets with 1001 (going away) in batches spread over the
   drain window (realtime.rebalancing: at most max(20, N / 15 s) a second
   with the default timeout), so the other replicas' handshake rate stays
   bounded: clients reconnect, with backoff, through nginx to the remaining
   replicas, and each consumer's disconnect discards its group memberships.
   Sockets waiting for their batch are served as before;
4. exits once every consumer has run its disconnect, or at
   DRAIN_TIMEOUT_SECONDS from the signal, having added its outcome
   (completed, timed_out) to the deployment's drain count in Redis, which the
   replicas that stay export (blueprint_deployment_drains_total).

A second signal stops at once. Kubernetes' terminationGracePeriodSeconds must
exceed the preStop pause plus DRAIN_TIMEOUT_SECONDS.

The event loop is asyncio's own, not uvloop's, though uvloop measured about
8 % less CPU per delivery: under Twisted's asyncio reactor, uvloop closes the
watcher of a socket the peer reset (libuv reports POLLERR as an error, not as
readable) without telling Twisted, so the connection is never lost, its
consumer never disconnects, and every reset leaks a slot of
WS_MAX_CONNECTIONS (tests/integration/test_hostile_clients.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from daphne.cli import CommandLineInterface
from daphne.server import Server
from twisted.internet import reactor

from realtime import close_codes, command_line, compat, rebalancing, ws_protocol
from realtime.input_queue import InputQueue
from realtime.replica import state
from realtime.ws_protocol import DirectWriteProtocol, ServerCloseProtocol

logger = logging.getLogger(__name__)


def drain_timeout() -> float:
    return float(os.environ.get("DRAIN_TIMEOUT_SECONDS", "20"))


class DrainingServer(Server):
    def __init__(self, *args, **kwargs):
        # Twisted's own handlers would stop the reactor on SIGTERM (the abrupt path).
        super().__init__(*args, **{**kwargs, "signal_handlers": False})

    def run(self):
        self.ports = []
        # Every piece of the fast path is decided, and any that is off said, at start-up.
        compat.decide()
        self.daphne_short_cuts = compat.fast(compat.REPLIES)
        reactor.callWhenRunning(self._take_signals)
        super().run()

    async def handle_reply(self, protocol, message):
        # The fan-out's hot path, once per member per message: a text frame
        # for an open socket goes straight to the protocol (on a verified
        # Daphne: realtime.compat). Anything else, and every case Daphne
        # refuses, takes Daphne's own checks.
        text = message.get("text")
        if (
            self.daphne_short_cuts
            and message.get("type") == "websocket.send"
            and text is not None
            and message.get("bytes") is None
            and isinstance(protocol, ServerCloseProtocol)
            and protocol.state == ServerCloseProtocol.STATE_OPEN
            and compat.daphne_connection_open(self, protocol)
        ):
            protocol.serverSend(text)
            return
        await super().handle_reply(protocol, message)

    def create_application(self, protocol, scope):
        # Every connection's input queue, idle for most of a socket's life:
        # realtime.input_queue's instead of an asyncio.Queue (on a verified Daphne).
        if not self.daphne_short_cuts:
            return super().create_application(protocol, scope)
        return compat.daphne_create_application(self, protocol, scope, InputQueue())

    def listen_success(self, port):
        self.ports.append(port)
        super().listen_success(port)

    def _take_signals(self):
        # Runs as the reactor starts, after run() built the factory and before
        # the first connection is served.
        factory = compat.websocket_factory(self)
        factory.protocol = DirectWriteProtocol if compat.fast(compat.WRITES) else ServerCloseProtocol
        # A frame over Daphne's transport limit (1 MiB) or a protocol error is
        # answered with a close frame that says why (1009, 1002, ...), not a
        # bare TCP drop the client can only read as 1006; a client that does
        # not answer the close is dropped after autobahn's close timeout.
        factory.setProtocolOptions(failByDrop=False)
        loop = asyncio.get_event_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        # Django is set up by now (the command line loaded the application).
        from realtime import peers

        self.deployment = peers.start()

    def _on_signal(self, signum):
        if state.draining:
            logger.warning("second %s while draining: stopping now", signal.Signals(signum).name)
            self.stop()
            return
        asyncio.ensure_future(self.drain())

    def _open_sockets(self) -> list[ServerCloseProtocol]:
        return [protocol for protocol in ws_protocol.open_protocols if protocol.state == ServerCloseProtocol.STATE_OPEN]

    async def drain(self):
        loop = asyncio.get_event_loop()
        started = loop.time()
        timeout = drain_timeout()
        deadline = started + timeout
        window = rebalancing.drain_window(timeout)
        state.start_draining()
        for port in self.ports:
            port.stopListening()
        deployment = getattr(self, "deployment", None)
        withdrawn = asyncio.ensure_future(deployment.withdraw()) if deployment else None
        closed = 0
        while sockets := self._open_sockets():
            batch = rebalancing.drain_batch(len(sockets), loop.time() - started, window)
            for protocol in sockets[:batch]:
                try:
                    protocol.serverClose(code=close_codes.GOING_AWAY)
                except Exception as error:  # one broken socket must not stop the drain of the others
                    logger.warning("could not send 1001 to %s: %r", protocol, error)
            closed += batch
            if batch == len(sockets):
                break
            # The next tick on the schedule, not a tick after this one: a late tick is caught up.
            ticks = (loop.time() - started) // rebalancing.DRAIN_TICK_SECONDS + 1
            await asyncio.sleep(max(0.0, started + ticks * rebalancing.DRAIN_TICK_SECONDS - loop.time()))
        # Done when every consumer has run its disconnect (memberships
        # discarded). Daphne's own shutdown then cancels what is left of them.
        while state.open_sockets and loop.time() < deadline:
            await asyncio.sleep(0.05)
        still_open = state.open_sockets
        logger.info("drained %d sockets; %d still open at exit", closed, still_open)
        if deployment:
            from realtime import peers

            await withdrawn
            await deployment.record_drain(peers.COMPLETED if still_open == 0 else peers.TIMED_OUT)
        self.stop()


class DrainingCommandLine(CommandLineInterface):
    server_class = DrainingServer


if __name__ == "__main__":
    DrainingCommandLine().run(command_line.complete(sys.argv[1:]))
