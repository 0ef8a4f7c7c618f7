"""The three consumers the Channels tutorials teach, hardened for production.

Every frame goes through ``protocol``; whatever a client sends, the answer is
a frame (a reply or an error), never a dead consumer.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from realtime import close_codes, compat, history, metrics, protocol
from realtime.events import SharedEvent, SharedFrame
from realtime.layers import LAYER_ERRORS, FanoutChannelLayer
from realtime.limits import TokenBucket
from realtime.membership import keeper
from realtime.protocol import FrameError
from realtime.replica import state

logger = logging.getLogger(__name__)

# A refusal within this long of the one before continues a flood.
FLOOD_GAP_SECONDS = 1.0
GROUP_SEND_SECONDS = metrics.GROUP_SEND_SECONDS.labels(metrics.REPLICA)


def _report_failed_close(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("could not close a failed consumer's socket: %r", task.exception())


class JsonFrameConsumer(compat.ConsumerLifecycle, AsyncWebsocketConsumer):
    """Decodes client frames, enforces the per-socket limits and turns every
    refusal into an error frame."""

    endpoint = "base"
    # Channels' loop awaits the layer's receive for this consumer's channel,
    # and a raised error there kills the consumer, closing the socket with
    # 1011. During a Redis outage that would drop every socket of the
    # replica; instead the socket stays open and the receive is retried with
    # backoff until Redis is back.
    RECEIVE_RETRY_MAX_DELAY = 2.0

    async def receive_from_layer(self):
        delay = 0.05
        while True:
            try:
                return await self.layer_receive()
            except LAYER_ERRORS as error:
                # Once per outage per socket at warning level, not once per retry.
                log = logger.warning if delay == 0.05 else logger.debug
                log("channel layer receive failed for %s, retrying: %r", self.channel_name, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RECEIVE_RETRY_MAX_DELAY)

    # Defaults for a consumer that fails before connect() ran.
    counted = False
    has_left = False
    closing = False
    # Served by the fan-out layer awaiting its handler (see __call__).
    one_source = False

    async def __call__(self, scope, receive, send):
        """Run the consumer; whatever ends it (a close from either side, a
        handler that raises, cancellation, a drain), leave() runs: the socket
        is uncounted and its memberships are discarded exactly once."""
        try:
            lifecycle_verified = compat.fast(compat.CONSUMERS)
            if lifecycle_verified:
                # These consumers never touch the database.
                self.dispatch = self.lean_dispatch
            layer = get_channel_layer(self.channel_layer_alias)
            if lifecycle_verified and isinstance(layer, FanoutChannelLayer):
                self.one_source = True
                await self._serve_on_fanout(layer, scope, receive, send)
            else:
                await super().__call__(scope, receive, send)
        except Exception as error:
            # Daphne would log a traceback and leave a socket whose consumer
            # is gone open; a client mistake must never get here, so this is
            # a server fault: one line with the reason, and 1011.
            self._fail(error)
        finally:
            await self.leave()

    async def _serve_on_fanout(self, layer, scope, receive, send):
        # On the fan-out layer, messages for this consumer's channel arrive by
        # the layer awaiting its handler, so the consumer has one source left,
        # its client: no second receive task and no asyncio.wait per frame, as
        # Channels' own loop needs for two sources.
        await self.start_one_source(layer, scope, send, self._deliver)
        try:
            await self.serve_client(receive)
        finally:
            try:
                await layer.release(self.channel_name)
            except LAYER_ERRORS as error:
                logger.warning("could not unsubscribe %s: %r", self.channel_name, error)

    async def _deliver(self, message):
        """The fan-out layer's handler: a failure here is this socket's, never the room's."""
        if self.closing:
            metrics.DELIVERIES_DROPPED.labels(metrics.REPLICA, "closing").inc()
            return
        try:
            await self.dispatch(message)
        except Exception as error:
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        path = self.scope.get("path") if hasattr(self, "scope") else "?"
        logger.error("consumer for %s failed, closing its socket with 1011: %s: %s", path, type(error).__name__, error)
        metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "server_error").inc()
        if not self.closing and hasattr(self, "base_send"):
            self.closing = True
            # Not awaited in the fan-out's task; Daphne queues nothing for it.
            closing = asyncio.ensure_future(
                self.base_send({"type": "websocket.close", "code": close_codes.SERVER_ERROR})
            )
            closing.add_done_callback(_report_failed_close)

    # --- connection lifecycle -------------------------------------------

    async def connect(self):
        if state.draining:
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "draining").inc()
            await self.close()
            return
        if state.above_mean:
            # Rebalancing (realtime.peers): refused with 503, which nginx
            # retries on another replica, so new sockets do not land here.
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "above_mean").inc()
            await self.close()
            return
        await self.accept()
        if state.open_sockets >= settings.WS_MAX_CONNECTIONS:
            # Accepted only to say why: 1013 tells the client to come back later
            # (through nginx, most likely to a less loaded replica).
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "over_capacity").inc()
            await self.close(code=close_codes.TRY_AGAIN_LATER)
            return
        self.counted = True
        state.open_sockets += 1
        metrics.OPEN_SOCKETS.labels(metrics.REPLICA, self.endpoint).inc()
        self.bucket = TokenBucket(settings.WS_RATE_LIMIT_PER_SECOND, settings.WS_RATE_LIMIT_BURST)
        self.flood_started = self.last_refused = -FLOOD_GAP_SECONDS
        await self.joined()

    async def joined(self) -> None:
        """Called once the socket is accepted and counted."""

    async def close(self, code=None, reason=None):
        # Frames still arriving (a flooder does not wait for the close) are
        # ignored, and deliveries to this socket dropped.
        self.closing = True
        await super().close(code=code, reason=reason)

    async def disconnect(self, code):
        await self.leave()

    async def leave(self) -> None:
        """Undo what joining did, once, on every way out."""
        if self.has_left:
            return
        self.has_left = True
        self.closing = True
        try:
            await self.left()
        finally:
            # Last: a drain waits for the socket count to reach zero, and by
            # then every membership must be gone.
            if self.counted:
                self.counted = False
                state.open_sockets -= 1
                metrics.OPEN_SOCKETS.labels(metrics.REPLICA, self.endpoint).dec()

    async def left(self) -> None:
        """Called once as the socket goes, however it goes."""

    async def fanout_shed(self, message: dict) -> None:
        """The replica's fan-out backlog was over its bound and dropped a
        message this socket should have had: say so, so the client resumes."""
        metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "shed").inc()
        await self.close(code=close_codes.FELL_BEHIND)

    # --- frames ---------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        if self.closing:
            return
        self.received.inc()
        try:
            if not self.bucket.take():
                raise FrameError("rate_limited", f"over {settings.WS_RATE_LIMIT_PER_SECOND:g} messages per second")
            payload = protocol.decode_text_frame(text_data, bytes_data, settings.WS_MAX_MESSAGE_BYTES)
            await self.handle(payload)
        except FrameError as error:
            await self.refuse(error)

    async def refuse(self, error: FrameError) -> None:
        metrics.FRAMES_REFUSED.labels(metrics.REPLICA, error.code).inc()
        if error.code == "rate_limited" and self._flooding():
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "rate_limited").inc()
            await self.close(code=close_codes.POLICY_VIOLATION)
            return
        await self.send_error(error)

    def _flooding(self) -> bool:
        """True once refusals have gone on for WS_RATE_LIMIT_CLOSE_AFTER_SECONDS.

        Measured in time, not in refusals in a row: a flooder that keeps just
        over its rate interleaves accepted frames, and each would reset a count.
        """
        now = time.monotonic()
        if now - self.last_refused > FLOOD_GAP_SECONDS:
            self.flood_started = now
        self.last_refused = now
        return now - self.flood_started >= settings.WS_RATE_LIMIT_CLOSE_AFTER_SECONDS

    async def handle(self, payload: dict) -> None:
        raise NotImplementedError

    # This endpoint's series, looked up once per socket, not once per frame.
    @functools.cached_property
    def sent(self):
        return metrics.MESSAGES_SENT.labels(metrics.REPLICA, self.endpoint)

    @functools.cached_property
    def received(self):
        return metrics.MESSAGES_RECEIVED.labels(metrics.REPLICA, self.endpoint)

    async def send_json(self, frame: dict) -> None:
        self.sent.inc()
        await self.send(text_data=protocol.dumps(frame))

    async def send_error(self, error: FrameError) -> None:
        await self.send_json(protocol.error_frame(error))


class EchoConsumer(JsonFrameConsumer):
    """``/ws/echo/``: ``{"message": X}`` comes back as it went, stamped with the replica."""

    endpoint = "echo"

    async def handle(self, payload: dict) -> None:
        if "message" not in payload:
            raise FrameError("bad_schema", 'missing field "message"')
        await self.send_json({"message": payload["message"], "served_by": settings.POD_NAME})


class ApiConsumer(JsonFrameConsumer):
    """``/ws/api/``: request/response with ``status`` OK or error; the socket stays open."""

    endpoint = "api"

    async def handle(self, payload: dict) -> None:
        if "request" not in payload:
            raise FrameError("bad_schema", 'missing field "request"')
        await self.send_json({"status": "OK", "data": payload["request"]})

    async def send_error(self, error: FrameError) -> None:
        await self.send_json({"status": "error", "error": f"{error.code}: {error.detail}"})


class ChatConsumer(JsonFrameConsumer):
    """``/ws/chat/<room>/``: every member on every replica gets every message.

    On the fan-out layer with room history, a member also gets each message's
    ``offset`` and ``epoch``, may resume from the last one it saw
    (``?offset=N&epoch=E``), and is never handed a message out of sequence:
    a gap (a message this replica did not get) or a new epoch (history lost)
    closes the socket with 4000, and the client resumes, so what it missed is
    replayed or it is told ``recovered: false``.
    """

    endpoint = "chat"

    group = None
    # Live messages that arrive while the member is joining (the replay comes first).
    joining: collections.deque | None = None
    epoch = ""
    last_offset = 0

    async def connect(self):
        self.room = self.scope["url_route"]["kwargs"]["room"]
        if not protocol.is_valid_room(self.room):
            # Closing before accept refuses the handshake (HTTP 403).
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "bad_room").inc()
            await self.close()
            return
        if state.redis_links_down:
            # Refused with 503, which nginx retries on another replica.
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "redis_link").inc()
            await self.close()
            return
        await super().connect()

    @property
    def has_history(self) -> bool:
        # Positions come with what the fan-out layer hands a handler.
        return self.one_source and settings.ROOM_HISTORY_SIZE > 0

    async def joined(self) -> None:
        try:
            resume = protocol.resume_position(self.scope.get("query_string", b""))
        except FrameError as error:
            await self.refuse(error)
            resume = None
        group = protocol.group_name(self.room)
        if self.has_history:
            self.joining = collections.deque()
        # Live first, then history: a message published in between is in both,
        # and its offset tells the copies apart.
        await self.channel_layer.group_add(group, self.channel_name)
        self.group = group
        keeper.track(self.channel_layer, group, self.channel_name)
        if not self.has_history:
            await self.send_json(protocol.welcome(self.room, settings.POD_NAME, recovered=False if resume else None))
            return
        try:
            if resume is not None:
                recovery, missed = await self.channel_layer.history_since(group, history.Position(*resume))
                position = recovery.position
                metrics.HISTORY_RESUMES.labels(metrics.REPLICA, str(recovery.recovered).lower()).inc()
                metrics.HISTORY_REPLAYED.labels(metrics.REPLICA).inc(len(missed))
            else:
                position, missed = await self.channel_layer.history_position(group), []
        except LAYER_ERRORS as error:
            # No history, no promise: the client tries again (another replica,
            # or this one once Redis answers) and resumes then.
            metrics.LAYER_ERRORS.labels(metrics.REPLICA, "history").inc()
            logger.warning("history of %s unreadable, closing with 1012: %r", group, error)
            await self.close(code=close_codes.SERVICE_RESTART)
            return
        self.epoch, self.last_offset = position.epoch, position.offset
        await self.send_json(
            protocol.welcome(
                self.room,
                settings.POD_NAME,
                epoch=position.epoch,
                offset=position.offset,
                recovered=None if resume is None else recovery.recovered,
                replayed=len(missed),
            )
        )
        for event in missed:
            await self.send_frame(protocol.dumps(protocol.chat_delivery(event, served_by=settings.POD_NAME)))
        while self.joining:
            await self.chat_message_in_sequence(self.joining.popleft())
        # No await between the last look at the queue and going live.
        self.joining = None

    async def left(self) -> None:
        if self.group is None:
            return
        keeper.forget(self.group, self.channel_name)
        try:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        except LAYER_ERRORS as error:
            # The membership expires after CHANNEL_GROUP_EXPIRY anyway.
            metrics.LAYER_ERRORS.labels(metrics.REPLICA, "group_discard").inc()
            logger.warning("group_discard failed for %s in %s: %r", self.channel_name, self.group, error)

    async def handle(self, payload: dict) -> None:
        event = protocol.chat_event(payload, origin=settings.POD_NAME)
        started = time.perf_counter()
        try:
            await self.channel_layer.group_send(self.group, event)
        except LAYER_ERRORS as error:
            metrics.LAYER_ERRORS.labels(metrics.REPLICA, "group_send").inc()
            logger.warning("group_send to %s failed: %r", self.group, error)
            await self.send_json(
                {
                    "type": "error",
                    "code": "unavailable",
                    "detail": "the channel layer is unreachable; the message was not delivered, send it again",
                }
            )
            return
        GROUP_SEND_SECONDS.observe(time.perf_counter() - started)

    async def chat_message(self, event: dict) -> None:
        if "offset" in event:
            if self.joining is not None:
                self.joining.append(event)
                return
            await self.chat_message_in_sequence(event)
            return
        await self.send_frame(self._encode(event))

    async def chat_message_in_sequence(self, event: dict) -> None:
        offset, epoch = event["offset"], event["epoch"]
        if epoch == self.epoch and offset <= self.last_offset:
            # Replayed already (it was published while the member joined).
            return
        if epoch == self.epoch and offset == self.last_offset + 1:
            self.epoch, self.last_offset = epoch, offset
            await self.send_frame(self._encode(event))
            return
        # A gap or another epoch: the member would miss messages silently.
        metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "out_of_sequence").inc()
        logger.info(
            "%s: got offset %s of epoch %s after %s of %s; closing with 4000 to resume",
            self.group,
            offset,
            epoch,
            self.last_offset,
            self.epoch,
        )
        await self.close(code=close_codes.FELL_BEHIND)

    def _encode(self, event: dict) -> str:
        # The fan-out layer hands every member on the replica the same event,
        # and the frame is the same for all: made once, kept on the event.
        if type(event) is SharedEvent:
            return event.made(chat_frame)
        return chat_frame(event)

    async def send_frame(self, text: str) -> None:
        self.sent.inc()
        await self.base_send({"type": "websocket.send", "text": text})

    async def fanout_link_lost(self, message: dict) -> None:
        """This replica lost Redis: the member would miss messages here, so it
        is sent to resume on another replica (1012, service restart)."""
        metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "redis_link").inc()
        await self.close(code=close_codes.SERVICE_RESTART)


def chat_frame(event: dict) -> SharedFrame:
    """The frame every member on this replica gets for a chat event."""
    return SharedFrame(protocol.dumps(protocol.chat_delivery(event, served_by=settings.POD_NAME)))


class RejectConsumer(AsyncWebsocketConsumer):
    """Any other WebSocket path: refuse the handshake instead of erroring in the router."""

    async def connect(self):
        await self.close()
