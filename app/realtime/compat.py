"""Every use of another library's private names, with the versions it was verified against.

The fast path (README, "Performance") reaches into channels_redis, redis-py,
Twisted, autobahn, Daphne and Channels where they promise nothing: names that
start with ``_``, attributes no documentation mentions, a lifecycle rewritten
around what Channels does inside ``AsyncConsumer.__call__``. Any release may
rename or repurpose them, and the fast path would then break, perhaps
silently. So they live here, and only here, grouped into the pieces of the
fast path that need them:

- each piece names the packages it reaches into, and the package versions it
  was verified against are ``VERIFIED`` (the versions ``requirements/app.lock``
  locks; ``tests/unit/test_compat.py`` fails when the lock moves without them);
- the first time a piece is asked for (``fast``; the replica asks for every
  piece as it starts), its packages' installed versions are compared with
  those, and the names it uses are looked up (``missing_names``). On an
  untested version, or with a name gone, the piece is off: the stock
  behaviour of channels_redis, Twisted, Daphne or Channels runs instead
  (``Piece.stock``), and the process logs one warning naming the package and
  its version;
- ``make canary`` installs the newest releases of these packages and runs
  ``python -m realtime.compat`` (the versions, what changed since the lock,
  and this check) and the fast-path tests with ``FAST_PATH=force``.

``FAST_PATH``: ``auto`` (the default), ``off`` (stock everywhere: what the
replica runs on untested versions, for tests) or ``force`` (skip the version
comparison, not the name check: the canary, trying newer releases).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels_redis import pubsub
from channels_redis.utils import _wrap_close
from twisted.internet import tcp

logger = logging.getLogger(__name__)

# The versions each package's uses below were verified against: the locked ones.
VERIFIED: dict[str, tuple[str, ...]] = {
    "channels": ("4.3.2",),
    "channels-redis": ("4.3.0",),
    "redis": ("8.1.0",),
    "daphne": ("4.2.3",),
    "twisted": ("26.10.0",),
    "autobahn": ("26.10.2",),
}

FAST_PATH_MODES = ("auto", "off", "force")


@dataclass(frozen=True)
class Piece:
    name: str
    stock: str  # what runs when the piece is off
    packages: tuple[str, ...]


LAYER = Piece(
    "the fan-out layer",
    "channels_redis' RedisPubSubChannelLayer for CHANNEL_LAYER=redis-fanout (no room history, no resume)",
    ("channels-redis", "redis"),
)
WRITES = Piece("direct socket writes", "Twisted's buffered writes", ("twisted", "autobahn"))
REPLIES = Piece("Daphne's reply short cut and input queue", "Daphne's own handle_reply and asyncio.Queue", ("daphne",))
CONSUMERS = Piece("the one-source consumer loop", "Channels' own consumer loop and dispatch", ("channels",))
PIECES = (LAYER, WRITES, REPLIES, CONSUMERS)


# --- the check ---------------------------------------------------------------


def installed_version(package: str) -> str:
    return importlib.metadata.version(package)


def _defines(cls: type, name: str) -> bool:
    """True when ``cls`` has ``name``, or a class of its library assigns ``self.<name>``
    (an attribute made in ``__init__`` or later exists on no class)."""
    if hasattr(cls, name):
        return True
    library = cls.__module__.split(".")[0]
    assignment = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=[^=]")
    # The source of each class's module, not of the class: finding a class's
    # lines parses the module with ast, which CPython 3.11 before 3.11.8 can
    # refuse (SystemError) in a process that has caught a RecursionError.
    return any(
        klass.__module__.split(".")[0] == library
        and assignment.search(inspect.getsource(sys.modules[klass.__module__]))
        for klass in cls.__mro__
    )


def _missing(owner: str, names: tuple[str, ...]) -> list[str]:
    """The names, of ``module:Class`` or of a module, that are not there."""
    module_name, _, class_name = owner.partition(":")
    try:
        target = importlib.import_module(module_name)
        if class_name:
            target = getattr(target, class_name)
    except (ImportError, AttributeError):
        return [owner]
    found = (lambda name: _defines(target, name)) if class_name else (lambda name: hasattr(target, name))
    return [f"{owner}.{name}" for name in names if not found(name)]


# What each package must still have for the uses below, by the module (and
# class) that has it. Daphne's protocol and server names are also what
# ServerCloseProtocol and the drain override, on every version.
USED_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "channels-redis": {
        "channels_redis.utils": ("_wrap_close",),
        "channels_redis.pubsub:RedisPubSubChannelLayer": ("_get_layer", "_layers", "_args", "_kwargs"),
        "channels_redis.pubsub:RedisPubSubLoopLayer": (
            "_shards",
            "_get_shard",
            "_get_group_channel_name",
            "channels",
            "groups",
            "prefix",
        ),
        "channels_redis.pubsub:RedisSingleShardConnection": (
            "_lock",
            "_redis",
            "_pubsub",
            "_subscribed_to",
            "_ensure_redis",
            "_do_receiving",
            "_receive_message",
        ),
    },
    "redis": {
        "redis.asyncio.connection:AbstractConnection": ("register_connect_callback", "deregister_connect_callback"),
        "redis.asyncio.client:PubSub": ("connection", "subscribed", "get_message", "ping"),
    },
    "twisted": {
        "twisted.internet.tcp:Server": (
            "TLS",
            "connected",
            "disconnecting",
            "socket",
            "_writeDisconnected",
            "_tempDataLen",
            "offset",
            "dataBuffer",
        ),
    },
    "autobahn": {
        "autobahn.websocket.protocol:WebSocketServerProtocol": (
            "sendData",
            "send_queue",
            "state",
            "STATE_OPEN",
            "sendCloseFrame",
            "sendPreparedMessage",
        ),
        "autobahn.websocket.protocol:WebSocketServerFactory": ("prepareMessage",),
    },
    "daphne": {
        "daphne.server:Server": (
            "create_application",
            "application",
            "handle_reply",
            "connections",
            "ws_factory",
            "listen_success",
            "protocol_disconnected",
        ),
        "daphne.ws_protocol:WebSocketProtocol": ("serverSend", "serverClose", "serverReject", "handshake_deferred"),
    },
    "channels": {
        "channels.consumer:AsyncConsumer": ("channel_receive", "base_send", "channel_name", "dispatch"),
    },
}


def missing_names(package: str) -> list[str]:
    return [name for owner, names in USED_NAMES[package].items() for name in _missing(owner, names)]


def fast_path_mode() -> str:
    mode = os.environ.get("FAST_PATH", "auto").strip().lower() or "auto"
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"FAST_PATH={mode!r} is not one of {', '.join(FAST_PATH_MODES)}")
    return mode


def why_off(piece: Piece, mode: str) -> str | None:
    """Why ``piece`` cannot run here (naming its package and version), or None."""
    if mode == "off":
        return "FAST_PATH=off, with " + ", ".join(
            f"{package} {installed_version(package)}" for package in piece.packages
        )
    for package in piece.packages:
        version = installed_version(package)
        if mode == "auto" and version not in VERIFIED[package]:
            return f"{package} {version} is untested (verified: {', '.join(VERIFIED[package])})"
        missing = missing_names(package)
        if missing:
            return f"{package} {version} lacks {', '.join(missing)}"
    return None


_decided: dict[Piece, bool] = {}


def decide(pieces: tuple[Piece, ...] = PIECES) -> None:
    """Decide each piece not decided yet; one warning for those that are off."""
    mode = fast_path_mode()
    off = []
    for piece in pieces:
        if piece not in _decided:
            reason = why_off(piece, mode)
            _decided[piece] = reason is None
            if reason is not None:
                off.append(f"{piece.name} ({reason}) -> {piece.stock}")
    if off:
        logger.warning("fast path off, stock behaviour instead: %s", "; ".join(off))


def fast(piece: Piece) -> bool:
    """Whether ``piece`` of the fast path runs in this process."""
    if piece not in _decided:
        decide((piece,))
    return _decided[piece]


# --- channels_redis: the fan-out layer's base classes -------------------------


class PubSubShard(pubsub.RedisSingleShardConnection):
    """channels_redis' shard, with its private state under names of ours.

    ``_lock`` guards subscribing; ``_ensure_redis`` makes ``_redis`` (the
    client, with its pool) and ``_pubsub`` (the subscription connection);
    ``_subscribed_to`` is every channel subscribed. channels_redis calls
    ``_do_receiving`` as the shard's receive task and ``_receive_message``
    for every message; they lead to ``receive_loop`` and ``on_message``.
    """

    @property
    def subscribe_lock(self) -> asyncio.Lock:
        return self._lock

    def client(self):
        self._ensure_redis()
        return self._redis

    @property
    def subscription(self):
        return self._pubsub

    @subscription.setter
    def subscription(self, pubsub_connection) -> None:
        self._pubsub = pubsub_connection

    @property
    def subscribed_channels(self) -> set:
        return self._subscribed_to

    async def _do_receiving(self):
        await self.receive_loop()

    async def receive_loop(self):
        await super()._do_receiving()

    def _receive_message(self, message):
        self.on_message(message)

    def on_message(self, message) -> None:
        self.queue_for_receive(message)

    def queue_for_receive(self, message) -> None:
        """channels_redis' own handling: queued to the channels read with ``receive``."""
        super()._receive_message(message)


class PubSubLoopLayer(pubsub.RedisPubSubLoopLayer):
    """channels_redis' per-event-loop layer, its shards made of ``shard_class``."""

    shard_class = PubSubShard

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shards = [self.shard_class(shard.host, self) for shard in self._shards]

    @property
    def shards(self) -> list:
        return self._shards

    def shard_for(self, channel: str):
        return self._get_shard(channel)

    def group_channel(self, group: str) -> str:
        """The Redis channel that carries ``group``."""
        return self._get_group_channel_name(group)


class PubSubChannelLayer(pubsub.RedisPubSubChannelLayer):
    """channels_redis' pub/sub layer, whose per-loop layers are ``loop_layer_class``."""

    loop_layer_class = PubSubLoopLayer

    def loop_layer(self):
        """The layer of the running event loop."""
        return self._get_layer()

    def _get_layer(self):
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = self._layers[loop] = self.loop_layer_class(*self._args, **self._kwargs, channel_layer=self)
            # Flushes the layer when the loop closes, as channels_redis does for its own.
            _wrap_close(self, loop)
            return layer


# --- Twisted: direct socket writes --------------------------------------------


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
    attributes: tests/integration/test_replica_writes.py fails if order or
    bytes suffer.
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


# --- Daphne ------------------------------------------------------------------


def daphne_connection_open(server, protocol) -> bool:
    """Whether Daphne still serves ``protocol``'s application (its reply checks, in short)."""
    connection = server.connections.get(protocol)
    return connection is not None and not connection.get("disconnected")


def daphne_create_application(server, protocol, scope, queue):
    """Daphne's ``Server.create_application`` with ``queue`` as the connection's
    input queue (Daphne makes an ``asyncio.Queue`` and offers no choice)."""
    assert "application_instance" not in server.connections[protocol]
    scope.setdefault("asgi", {"version": "3.0"})
    application_instance = server.application(
        scope=scope, receive=queue.get, send=functools.partial(server.handle_reply, protocol)
    )
    if protocol not in server.connections:
        return None
    server.connections[protocol]["application_instance"] = asyncio.ensure_future(
        application_instance, loop=asyncio.get_event_loop()
    )
    return queue


def websocket_factory(server):
    """The autobahn factory Daphne's ``Server.run`` builds for WebSockets:
    Daphne offers no option for its protocol or its protocol options."""
    factory = getattr(server, "ws_factory", None)
    if factory is None:
        raise RuntimeError(
            f"daphne {installed_version('daphne')} has no Server.ws_factory: the replica's WebSocket "
            f"protocol cannot be installed (verified: {', '.join(VERIFIED['daphne'])})"
        )
    return factory


# --- Channels: the consumer lifecycle -----------------------------------------


class ConsumerLifecycle:
    """Where the consumers step into Channels' ``AsyncConsumer`` lifecycle.

    - ``AsyncConsumer.__call__`` assigns the layer's receive for the
      consumer's channel to ``channel_receive`` and awaits it in its loop:
      the assignment is kept as ``layer_receive``, and the loop awaits
      ``receive_from_layer`` instead (which a consumer defines).
    - ``start_one_source`` then ``serve_client`` are ``AsyncConsumer.__call__``
      for a consumer whose layer messages arrive by the layer awaiting a
      handler (the fan-out layer's ``new_channel(handler=...)``): one source
      left, its client, so no second receive task and no ``asyncio.wait``
      per frame.
    - ``lean_dispatch`` is Channels' ``dispatch`` without
      ``aclose_old_connections()``: a hop to the database thread per frame,
      kept for consumers that use the ORM, and a large share of per-message
      cost on the fan-out path. Only for consumers that never touch the database.
    """

    @property
    def channel_receive(self):
        return self.receive_from_layer

    @channel_receive.setter
    def channel_receive(self, layer_receive) -> None:
        self.layer_receive = layer_receive

    async def start_one_source(self, layer, scope, send, handler) -> None:
        self.scope, self.channel_layer, self.base_send = scope, layer, send
        self.channel_name = await layer.new_channel(handler=handler)

    async def serve_client(self, receive) -> None:
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def lean_dispatch(self, message) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


# --- the report (make canary) -------------------------------------------------


def locked_versions(lock: str) -> dict[str, str]:
    with open(lock) as file:
        return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", file.read(), re.MULTILINE))


def report(lock: str | None) -> int:
    """Print every package's installed, verified (and locked) version and the
    names it lacks; 1 when a name the fast path uses is gone."""
    locked = {name.lower(): version for name, version in locked_versions(lock).items()} if lock else {}
    broken = False
    print(f"{'package':<16} {'installed':<12} {'locked':<12} {'verified':<12} names")
    for package in VERIFIED:
        version = installed_version(package)
        missing = missing_names(package)
        broken = broken or bool(missing)
        changed = " (changed)" if locked and locked.get(package) != version else ""
        print(
            f"{package:<16} {version:<12} {locked.get(package, '-'):<12} {', '.join(VERIFIED[package]):<12} "
            f"{'missing ' + ', '.join(missing) if missing else 'all present'}{changed}"
        )
    if locked:
        others = []
        for name, version in sorted(locked.items()):
            now = _installed(name)
            if name not in VERIFIED and now not in (None, version):
                others.append(f"{name} {version} -> {now}")
        print("other packages changed since the lock: " + (", ".join(others) or "none"))
    print("a replica on these versions would run:")
    for piece in PIECES:
        reason = why_off(piece, "auto")
        print(f"  {piece.name}: {'on' if reason is None else 'off, ' + reason}")
    return 1 if broken else 0


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the fast path's packages: versions and the names it uses")
    parser.add_argument("--lock", help="a lock file to compare the installed versions with")
    sys.exit(report(parser.parse_args().lock))
