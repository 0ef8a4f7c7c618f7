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

A handler that raises is logged and skipped: one broken socket must not stop
a room's delivery on the replica. Past capacity, messages wait in memory and
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
"""
from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Awaitable, Callable

from channels_redis import pubsub
from channels_redis.utils import _wrap_close

from django.conf import settings

from realtime import metrics
from realtime.replica import state

logger = logging.getLogger(__name__)

Handler = Callable[[dict], Awaitable[None]]

# Below redis-py's default pool limit of 100 connections per shard, one of
# which the shard's subscriptions hold.
PUBLISHES_IN_FLIGHT = 50

# What a member that missed a message is told, out of band.
SHED = {"type": "fanout.shed"}

# Past capacity a replica delivers late: the messages wait in memory, and the
# backlog gauge (read when scraped, free per message) shows it.
_live_layers: weakref.WeakSet = weakref.WeakSet()
metrics.FANOUT_BACKLOG.labels(metrics.REPLICA).set_function(lambda: sum(len(layer._pending) for layer in list(_live_layers)))
FANOUT_SHED = metrics.FANOUT_SHED.labels(metrics.REPLICA)


class FanoutShard(pubsub.RedisSingleShardConnection):
    """One Redis shard: publishes that run side by side, and a receiver that
    hands messages for channels with a handler to the fan-out."""

    def __init__(self, host, channel_layer):
        super().__init__(host, channel_layer)
        self._publishing = asyncio.Semaphore(PUBLISHES_IN_FLIGHT)

    async def publish(self, channel, message):
        # channels_redis holds the shard's lock, which also guards subscribing,
        # across each PUBLISH round trip: a replica's publishes go to Redis one
        # at a time, and under load they queue behind each other. A publish
        # touches no subscription state, so here they only wait for a free
        # connection, up to PUBLISHES_IN_FLIGHT at once (redis-py's pool
        # refuses, rather than waits, past its own limit).
        async with self._publishing:
            self._ensure_redis()
            await self._redis.publish(channel, message)

    def _receive_message(self, message):
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
            super()._receive_message(message)
            return
        attached = []
        for channel in members:
            handler = layer.handlers.get(channel)
            if handler is not None:
                attached.append(handler)
            elif channel in layer.channels:
                layer.channels[channel].put_nowait(message["data"])
        if attached:
            layer.fan_out(attached, message["data"])


class FanoutLoopLayer(pubsub.RedisPubSubLoopLayer):
    """The per-event-loop half of the layer: groups, channels, shards, and the fan-out task."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shards = [FanoutShard(shard.host, self) for shard in self._shards]
        self.handlers: dict[str, Handler] = {}
        self._pending: collections.deque[tuple[list[Handler], bytes]] = collections.deque()
        self._pending_bytes = 0
        # Handlers that missed a message: they get nothing after it.
        self._cut: set[Handler] = set()
        self._fan_out_task: asyncio.Task | None = None
        _live_layers.add(self)

    async def new_channel(self, prefix="specific.", handler: Handler | None = None):
        """A channel of this process; with ``handler``, every message for it is
        delivered by awaiting ``handler(message)`` instead of through ``receive``."""
        channel = await super().new_channel(prefix)
        if handler is not None:
            self.handlers[channel] = handler
        return channel

    async def release(self, channel: str) -> None:
        """Forget a channel made with a handler (what ``receive`` does when its consumer is cancelled)."""
        handler = self.handlers.pop(channel, None)
        self._cut.discard(handler)
        if self.channels.pop(channel, None) is not None:
            await self._get_shard(channel).unsubscribe(channel)

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
        for handler in handlers:
            if handler not in self._cut:
                # Synchronously cut: the member must not get a later message
                # before it hears that it missed this one.
                self._cut.add(handler)
                asyncio.ensure_future(handler(SHED))

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
                # One decoded message shared by every member: handlers must not change it.
                message = deserialize(data)
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
        if self._fan_out_task is not None:
            self._fan_out_task.cancel()
            self._fan_out_task = None
        self._pending.clear()
        self._pending_bytes = 0
        self._cut.clear()
        self.handlers = {}
        await super().flush()


class FanoutChannelLayer(pubsub.RedisPubSubChannelLayer):
    """``RedisPubSubChannelLayer`` whose replicas fan out once to consumers with a handler."""

    async def release(self, channel: str) -> None:
        await self._get_layer().release(channel)

    def _get_layer(self):
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = self._layers[loop] = FanoutLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
            return layer
