"""The pub/sub channel layer with one fan-out per replica (``CHANNEL_LAYER=redis-fanout``).

channels_redis' ``RedisPubSubChannelLayer`` already receives a group message
once per replica (one Redis subscription per group), then queues it to every
local member's channel. Each member consumer then wakes on its own: one task
to receive, ``asyncio.wait`` in Channels' dispatch loop, one msgpack decode and
one JSON encode per socket. On the fan-out path that bookkeeping costs more
than the socket write itself. It also sends a replica's publishes to Redis one
at a time.

This layer keeps the wire, the group names and the API of the pub/sub layer.
What changes is local delivery, for channels made with
``new_channel(handler=...)``: a message for them, sent to the channel or to a
group it is in, is decoded once, and one task per replica awaits
``handler(message)`` for each of them in turn, in the order Redis delivered
the messages. ``release(channel)`` forgets such a channel. Channels made
without a handler are queued and read with ``receive`` as before, so a stock
consumer works unchanged on this layer. Publishes run side by side.

Every member on the replica is handed the same decoded message, a read-only
``SharedEvent`` (``realtime.events``): a handler that tries to change it
raises, and what it would have changed its roommates never see. A handler
that raises is logged and skipped: one broken socket must not stop a room's
delivery on the replica. Past capacity, messages wait in memory and
are delivered late; ``blueprint_fanout_backlog`` counts them. The wait is
bounded (``FANOUT_MAX_BACKLOG_BYTES``): a message that would take the backlog
past it is dropped, never silently: each member that would have had it gets
``{"type": "fanout.shed"}`` out of band (the consumers close with 4000, fell
behind, and the client resumes) and nothing more after it, and the replica
reports itself overloaded (``/readyz`` 503) until the backlog is back under
half the bound.
A handler must not wait on its client (a slow socket would hold up the whole
replica); a Channels consumer's ``send`` does not: the replica's WebSocket
protocol queues what the socket cannot take yet, up to its own bound.

Room history (``realtime.history``): with ``ROOM_HISTORY_SIZE`` above zero a
group message is appended to the group's history and published in one step,
and every member gets it with its ``offset`` and ``epoch``; ``publish``
returns that position and ``history_since`` what a member that resumes missed.

The link to Redis is watched: each shard PINGs on its subscription
connection, and when it has heard nothing for ``REDIS_LINK_TIMEOUT_SECONDS``
of its own running time (a network cut that drops packets sends no RST, so
reads just wait; a replica that was itself stopped has not been ignored) it calls
the link lost: every member of a group on that shard gets
``{"type": "fanout.link_lost"}`` out of band (the consumers close with 1012)
and nothing after it, the replica reports not ready, and the shard replaces
its subscription connection and resubscribes until Redis answers again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable

from channels_redis import pubsub
from django.conf import settings
from redis.exceptions import RedisError

from realtime import compat, history, metrics
from realtime.events import SharedEvent
from realtime.replica import state

logger = logging.getLogger(__name__)

Handler = Callable[[dict], Awaitable[None]]

# What a channel-layer operation (any of the Redis layers) raises when Redis is
# unreachable or too slow: the caller answers "unavailable". Anything else is
# a bug, and must surface as one.
LAYER_ERRORS = (OSError, asyncio.TimeoutError, RedisError)

# Below redis-py's default pool limit of 100 connections per shard, one of
# which the shard's subscriptions hold.
PUBLISHES_IN_FLIGHT = 50

# What a member that missed a message, or may miss them, is told, out of band.
SHED = SharedEvent(type="fanout.shed")
LINK_LOST = SharedEvent(type="fanout.link_lost")
# Pings per link timeout: a lost PONG or two is not yet a lost link.
PINGS_PER_LINK_TIMEOUT = 5

# Past capacity a replica delivers late: the messages wait in memory, and the
# backlog gauge (read when scraped, free per message) shows it.
_live_layers: weakref.WeakSet = weakref.WeakSet()
metrics.FANOUT_BACKLOG.labels(metrics.REPLICA).set_function(
    lambda: sum(len(layer._pending) for layer in list(_live_layers))
)
FANOUT_SHED = metrics.FANOUT_SHED.labels(metrics.REPLICA)
HISTORY_APPENDS = metrics.HISTORY_APPENDS.labels(metrics.REPLICA)
HISTORY_REPEATS = metrics.HISTORY_REPEATS.labels(metrics.REPLICA)


class FanoutShard(compat.PubSubShard):
    """One Redis shard: publishes that run side by side, a receiver that
    hands messages for channels with a handler to the fan-out, and a watch
    on the subscription link."""

    def __init__(self, host, channel_layer):
        super().__init__(host, channel_layer)
        self._publishing = asyncio.Semaphore(PUBLISHES_IN_FLIGHT)
        # Logged and reported by index: the host's address carries the password.
        self.name = "redis shard"
        self.link_up = True
        # Seconds of this replica's own running time with nothing from Redis.
        self._silent = 0.0
        # Set when redis-py reconnected the subscription connection by itself.
        self._reconnected = False
        self._watched = None  # the subscription connection whose reconnects are watched

    async def publish(self, channel, message):
        # channels_redis holds the shard's lock, which also guards subscribing,
        # across each PUBLISH round trip: a replica's publishes go to Redis one
        # at a time, and under load they queue behind each other. A publish
        # touches no subscription state, so here they only wait for a free
        # connection, up to PUBLISHES_IN_FLIGHT at once (redis-py's pool
        # refuses, rather than waits, past its own limit).
        async with self._publishing:
            # Bounded: on a cut link a write waits for TCP to give up, and the
            # publisher must hear "unavailable" long before that.
            await asyncio.wait_for(self.client().publish(channel, message), settings.REDIS_LINK_TIMEOUT_SECONDS)

    async def publish_with_history(
        self, group: str, channel: str, message: bytes, message_id: object = None
    ) -> history.Position:
        async with self._publishing:
            position = await asyncio.wait_for(
                history.publish(
                    self.client(),
                    self.channel_layer.prefix,
                    group,
                    channel,
                    message,
                    settings.ROOM_HISTORY_SIZE,
                    settings.ROOM_HISTORY_TTL_SECONDS,
                    message_id,
                ),
                settings.REDIS_LINK_TIMEOUT_SECONDS,
            )
        (HISTORY_REPEATS if position.repeated else HISTORY_APPENDS).inc()
        return position

    async def keep_epochs(self, metas: list[str], ttl: int) -> None:
        async with self.client().pipeline(transaction=False) as pipe:
            for meta in metas:
                pipe.expire(meta, ttl)
            await asyncio.wait_for(pipe.execute(), settings.REDIS_LINK_TIMEOUT_SECONDS)

    async def read_history(self, read, group: str, *args):
        return await asyncio.wait_for(
            read(self.client(), self.channel_layer.prefix, group, settings.ROOM_HISTORY_TTL_SECONDS, *args),
            settings.REDIS_LINK_TIMEOUT_SECONDS,
        )

    # --- the subscription link ----------------------------------------------

    async def subscribe(self, channel):
        await super().subscribe(channel)
        self._watch_reconnects()

    def _watch_reconnects(self) -> None:
        """redis-py reconnects a broken subscription connection and resubscribes
        by itself. Whatever was published meanwhile never reached this replica,
        and a resubscribe that raced another subscribe was seen to lose a group
        for good. So a reconnect counts as a lost link (members resume, and a
        new connection subscribes everything under the shard's lock)."""
        connection = self.subscription.connection if self.subscription is not None else None
        if connection is not None and connection is not self._watched:
            connection.register_connect_callback(self._on_reconnect)
            self._watched = connection

    def _on_reconnect(self, connection) -> None:
        if connection is self._watched:
            self._reconnected = True

    async def receive_loop(self):
        """channels_redis' receive loop, with a link watch: what breaks the
        subscription connection, or silences it, gets a new one."""
        loop = asyncio.get_running_loop()
        self._silent = 0.0
        looked = loop.time()
        pinging = asyncio.ensure_future(self._ping())
        try:
            while True:
                if self._reconnected:
                    await self._relink("redis-py reconnected the subscription connection")
                    continue
                if not (self.subscription and self.subscription.subscribed):
                    self._silent = 0.0
                    await asyncio.sleep(0.1)
                    continue
                try:
                    message = await self.subscription.get_message(ignore_subscribe_messages=True, timeout=0.1)
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as error:
                    await self._relink(f"{type(error).__name__}: {error}")
                    continue
                # Silence counts only while this replica was running. A gap
                # between two looks longer than a ping interval is its own
                # stall (CPU throttled to its limit, a long collection, a
                # paused VM), during which it sent no PINGs and read nothing:
                # it counts as one interval. Redis's answers wait in the intact
                # connection; calling the link lost then would send every member
                # to reconnect at once, to a replica already short of time.
                now = loop.time()
                self._silent += min(now - looked, settings.REDIS_LINK_TIMEOUT_SECONDS / PINGS_PER_LINK_TIMEOUT)
                looked = now
                if message is not None:
                    self._silent = 0.0
                    if message["type"] != "pong":
                        self.on_message(message)
                elif self._silent > settings.REDIS_LINK_TIMEOUT_SECONDS:
                    await self._relink(f"no answer from Redis for {settings.REDIS_LINK_TIMEOUT_SECONDS:g} s")
        finally:
            pinging.cancel()

    async def _ping(self):
        while True:
            await asyncio.sleep(settings.REDIS_LINK_TIMEOUT_SECONDS / PINGS_PER_LINK_TIMEOUT)
            pubsub_connection = self.subscription
            if self.link_up and pubsub_connection is not None and pubsub_connection.subscribed:
                try:
                    # The PONG arrives through the receive loop, as messages do.
                    await asyncio.wait_for(pubsub_connection.ping(), 1)
                except Exception as error:  # the receive loop sees the same fault
                    logger.debug("link ping failed: %r", error)

    async def _relink(self, why: str) -> None:
        if self.link_up:
            self.link_up = False
            logger.warning("lost the Redis subscription link of %s (%s): closing its members with 1012", self.name, why)
            state.redis_links_down.add(self.name)
            self.channel_layer.link_lost(self)
        delay = 0.1
        while True:
            try:
                await self._resubscribe()
                break
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as error:
                logger.debug("resubscribing to %s failed: %r", self.name, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._silent = 0.0
        self.link_up = True
        state.redis_links_down.discard(self.name)
        logger.warning("the Redis subscription link of %s is back: resubscribed", self.name)

    async def _resubscribe(self) -> None:
        """A new subscription connection, with every channel of the old one.

        The old one is dropped, not reused: after a cut its parser state is
        unknown (reused, it once spun at full CPU reading a dead socket).
        """
        async with self.subscribe_lock:
            client = self.client()  # first: a new client comes with a subscription connection of its own
            old = self.subscription
            self.subscription = client.pubsub()
            if self._watched is not None:
                # Back in the pool it serves publishes, whose reconnects are no concern here.
                self._watched.deregister_connect_callback(self._on_reconnect)
                self._watched = None
            self._reconnected = False
            if old is not None:
                try:
                    await asyncio.wait_for(old.aclose(), 1)
                except Exception as error:
                    logger.debug("closing the old subscription connection: %r", error)
            if self.subscribed_channels:
                await asyncio.wait_for(
                    self.subscription.subscribe(*self.subscribed_channels), settings.REDIS_LINK_TIMEOUT_SECONDS
                )
                self._watch_reconnects()

    def on_message(self, message):
        if message is None:
            return
        name = message["channel"]
        if isinstance(name, bytes):
            name = name.decode()
        layer = self.channel_layer
        handler = layer.handlers.get(name)
        if handler is not None:
            layer.fan_out([handler], message["data"])
            return
        members = layer.groups.get(name)
        if members is None:
            self.queue_for_receive(message)
            return
        attached = []
        for channel in members:
            handler = layer.handlers.get(channel)
            if handler is not None:
                attached.append(handler)
            elif channel in layer.channels:
                # A stock consumer's receive decodes the payload alone.
                envelope = history.open_envelope(message["data"])
                layer.channels[channel].put_nowait(envelope[2] if envelope else message["data"])
        if attached:
            layer.fan_out(attached, message["data"])


class FanoutLoopLayer(compat.PubSubLoopLayer):
    """The per-event-loop half of the layer: groups, channels, shards, and the fan-out task."""

    shard_class = FanoutShard

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for index, shard in enumerate(self.shards):
            shard.name = f"redis shard {index}"
        self.handlers: dict[str, Handler] = {}
        self._pending: collections.deque[tuple[list[Handler], bytes]] = collections.deque()
        self._pending_bytes = 0
        # Handlers that missed a message: they get nothing after it.
        self._cut: set[Handler] = set()
        self._fan_out_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._epochs_task: asyncio.Task | None = None
        _live_layers.add(self)

    async def new_channel(self, prefix="specific.", handler: Handler | None = None):
        """A channel of this process; with ``handler``, every message for it is
        delivered by awaiting ``handler(message)`` instead of through ``receive``.

        A channel with a handler is subscribed in the background: a socket's
        handshake does not wait for a Redis round trip (nor hang while the
        link to Redis is down), and a message sent to it from another process
        reaches it once the subscription is in place.
        """
        if handler is None:
            return await super().new_channel(prefix)
        channel = f"{self.prefix}{prefix}{uuid.uuid4().hex}"
        self.handlers[channel] = handler
        self._in_background(self.shard_for(channel).subscribe(channel), "subscribe")
        return channel

    async def release(self, channel: str) -> None:
        """Forget a channel: made with a handler, or one whose ``receive`` is done with."""
        handler = self.handlers.pop(channel, None)
        if handler is not None:
            self._cut.discard(handler)
            # After its subscribe: the shard's lock serves them in order.
            self._in_background(self.shard_for(channel).unsubscribe(channel), "unsubscribe")
        elif self.channels.pop(channel, None) is not None:
            await self.shard_for(channel).unsubscribe(channel)

    async def group_add(self, group: str, channel: str) -> None:
        if channel not in self.handlers:
            await super().group_add(group, channel)
            return
        # The stock check wants the channel among those read with receive.
        group_channel = self.group_channel(group)
        self.groups.setdefault(group_channel, set()).add(channel)
        if self._epochs_task is None or self._epochs_task.done():
            self._epochs_task = asyncio.ensure_future(self._keep_epochs())
        await self.shard_for(group_channel).subscribe(group_channel)

    async def _keep_epochs(self) -> None:
        """A room's epoch lives ROOM_HISTORY_TTL_SECONDS after its last publish
        or join, so a quiet room with members here would lose it, and its next
        message, in a new epoch, would send every member to resume and be told
        ``recovered: false`` for nothing. Refreshed every third of the TTL."""
        group_prefix = len(self.group_channel(""))
        while self.groups:
            ttl = settings.ROOM_HISTORY_TTL_SECONDS
            await asyncio.sleep(max(ttl / 3, 1.0))
            if settings.ROOM_HISTORY_SIZE <= 0 or ttl <= 0:
                continue
            metas: dict[FanoutShard, list[str]] = collections.defaultdict(list)
            for group_channel, members in list(self.groups.items()):
                if any(channel in self.handlers for channel in members):
                    meta = history.keys(self.prefix, group_channel[group_prefix:])[1]
                    metas[self.shard_for(group_channel)].append(meta)
            for shard, keys in metas.items():
                try:
                    await shard.keep_epochs(keys, ttl)
                except Exception as error:  # the next round tries again; a lost epoch is reported anyway
                    logger.warning("could not refresh the epochs of %d rooms: %r", len(keys), error)

    def _in_background(self, operation: Awaitable, what: str) -> None:
        def report(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("background %s failed: %r", what, task.exception())

        task = asyncio.ensure_future(operation)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(report)

    async def publish(self, group: str, message: dict) -> history.Position | None:
        """group_send that returns the message's position in the room's history (None: no history)."""
        channel = self.group_channel(group)
        shard = self.shard_for(channel)
        data = self.channel_layer.serialize(message)
        if settings.ROOM_HISTORY_SIZE <= 0:
            await shard.publish(channel, data)
            return None
        return await shard.publish_with_history(group, channel, data, message.get("id"))

    async def group_send(self, group: str, message: dict) -> None:
        await self.publish(group, message)

    async def history_position(self, group: str) -> history.Position:
        return await self._history_shard(group).read_history(history.position, group)

    async def history_since(self, group: str, resume: history.Position) -> tuple[history.Recovery, list[dict]]:
        """What a member at ``resume`` missed, decoded: each message carries its offset and epoch."""
        recovery = await self._history_shard(group).read_history(history.since, group, resume)
        deserialize = self.channel_layer.deserialize
        messages = [
            {**deserialize(data), "offset": offset, "epoch": recovery.position.epoch}
            for offset, data in recovery.messages
        ]
        return recovery, messages

    def _history_shard(self, group: str) -> FanoutShard:
        # The history lives on the shard that carries the group's messages.
        return self.shard_for(self.group_channel(group))

    def link_lost(self, shard: FanoutShard) -> None:
        """Members of groups on ``shard`` may miss messages from now on: tell them, and cut them."""
        handlers = [
            self.handlers[channel]
            for group_channel, members in self.groups.items()
            if self.shard_for(group_channel) is shard
            for channel in members
            if channel in self.handlers
        ]
        told = self._cut_and_tell(handlers, LINK_LOST)
        logger.warning("told %d members that the link to Redis is lost", told)

    def _cut_and_tell(self, handlers: list[Handler], notice: dict) -> int:
        """Hand these members nothing more, and tell each, once, why (out of
        band). Cut synchronously: a member must not get a later message before
        it hears that it may have missed one. Returns how many were told."""
        told = 0
        for handler in handlers:
            if handler not in self._cut:
                self._cut.add(handler)
                asyncio.ensure_future(handler(notice))
                told += 1
        return told

    def fan_out(self, handlers: list[Handler], data: bytes) -> None:
        if self._pending_bytes + len(data) > settings.FANOUT_MAX_BACKLOG_BYTES:
            self._shed(handlers)
            return
        self._pending.append((handlers, data))
        self._pending_bytes += len(data)
        # The task runs until the queue is empty; there is no await between its
        # last look at the queue and its end, so nothing appended is missed.
        if self._fan_out_task is None or self._fan_out_task.done():
            self._fan_out_task = asyncio.ensure_future(self._deliver_pending())

    def _shed(self, handlers: list[Handler]) -> None:
        """Drop a message the backlog has no room for, and tell its members."""
        FANOUT_SHED.inc()
        if not state.overloaded:
            logger.warning(
                "fan-out backlog over FANOUT_MAX_BACKLOG_BYTES (%d bytes): shedding, members that miss messages "
                "are closed with 4000 and the replica reports not ready",
                self._pending_bytes,
            )
            state.overloaded = True
        self._cut_and_tell(handlers, SHED)

    async def _deliver_pending(self) -> None:
        deserialize = self.channel_layer.deserialize
        cut = self._cut
        while self._pending:
            handlers, data = self._pending.popleft()
            self._pending_bytes -= len(data)
            if state.overloaded and self._pending_bytes * 2 < settings.FANOUT_MAX_BACKLOG_BYTES:
                logger.warning("fan-out backlog back under half its bound: ready again")
                state.overloaded = False
            try:
                envelope = history.open_envelope(data)
                # One decoded message for every member, read-only.
                if envelope is None:
                    message = SharedEvent.frozen(deserialize(data))
                else:
                    offset, epoch, payload = envelope
                    message = SharedEvent.frozen(deserialize(payload), offset=offset, epoch=epoch)
            except Exception:
                logger.exception("a message from Redis could not be decoded; dropped")
                continue
            for handler in handlers:
                if cut and handler in cut:
                    continue
                try:
                    await handler(message)
                except Exception:
                    logger.exception("fan-out handler %r failed; delivery goes on to the others", handler)

    async def flush(self):
        if self._epochs_task is not None:
            self._epochs_task.cancel()
            self._epochs_task = None
        if self._fan_out_task is not None:
            self._fan_out_task.cancel()
            self._fan_out_task = None
        self._pending.clear()
        self._pending_bytes = 0
        self._cut.clear()
        self.handlers = {}
        await super().flush()


class FanoutChannelLayer(compat.PubSubChannelLayer):
    """``RedisPubSubChannelLayer`` whose replicas fan out once to consumers with a handler."""

    loop_layer_class = FanoutLoopLayer

    async def release(self, channel: str) -> None:
        await self.loop_layer().release(channel)

    async def publish(self, group: str, message: dict) -> history.Position | None:
        return await self.loop_layer().publish(group, message)

    async def history_position(self, group: str) -> history.Position:
        return await self.loop_layer().history_position(group)

    async def history_since(self, group: str, resume: history.Position):
        return await self.loop_layer().history_since(group, resume)


def fanout_or_stock(**config):
    """The layer ``CHANNEL_LAYER=redis-fanout`` names: this one, or, where the
    channels_redis internals it builds on are untested (``realtime.compat``),
    channels_redis' own pub/sub layer, which shares its wire and groups."""
    if compat.fast(compat.LAYER):
        return FanoutChannelLayer(**config)
    return pubsub.RedisPubSubChannelLayer(**config)
