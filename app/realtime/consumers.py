"""The three consumers the Channels tutorials teach, hardened for production.

Every frame goes through ``protocol``; whatever a client sends, the answer is
a frame (a reply or an error), never a dead consumer.
"""
from __future__ import annotations

import asyncio
import logging

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from redis.exceptions import RedisError

from realtime import protocol
from realtime.protocol import FrameError

logger = logging.getLogger(__name__)


class JsonFrameConsumer(AsyncWebsocketConsumer):
    """Decodes client frames and turns every refusal into an error frame."""

    # Channels assigns ``self.channel_receive`` (the layer's receive for this
    # consumer's channel) when the consumer starts, and a raised error there
    # kills the consumer, closing the socket with 1011. During a Redis outage
    # that would drop every socket of the replica; instead the socket stays
    # open and the receive is retried with backoff until Redis is back.
    RECEIVE_RETRY_MAX_DELAY = 2.0

    @property
    def channel_receive(self):
        return self._receive_until_layer_answers

    @channel_receive.setter
    def channel_receive(self, layer_receive):
        self._layer_receive = layer_receive

    async def _receive_until_layer_answers(self):
        delay = 0.05
        while True:
            try:
                return await self._layer_receive()
            except (OSError, asyncio.TimeoutError, RedisError) as error:
                # Once per outage per socket at warning level, not once per retry.
                log = logger.warning if delay == 0.05 else logger.debug
                log("channel layer receive failed for %s, retrying: %r", self.channel_name, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RECEIVE_RETRY_MAX_DELAY)

    async def dispatch(self, message):
        # Channels' own dispatch awaits aclose_old_connections() before every
        # handler: a hop to the database thread per frame, kept for consumers
        # that use the ORM. These consumers never touch the database, and that
        # hop is a large share of per-message cost on the fan-out path.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def receive(self, text_data=None, bytes_data=None):
        try:
            payload = protocol.decode_text_frame(text_data, bytes_data, settings.WS_MAX_MESSAGE_BYTES)
            await self.handle(payload)
        except FrameError as error:
            await self.send_error(error)

    async def handle(self, payload: dict) -> None:
        raise NotImplementedError

    async def send_json(self, frame: dict) -> None:
        await self.send(text_data=protocol.dumps(frame))

    async def send_error(self, error: FrameError) -> None:
        await self.send_json(protocol.error_frame(error))


class EchoConsumer(JsonFrameConsumer):
    """``/ws/echo/``: ``{"message": X}`` comes back as it went, stamped with the replica."""

    async def handle(self, payload: dict) -> None:
        if "message" not in payload:
            raise FrameError("bad_schema", 'missing field "message"')
        await self.send_json({"message": payload["message"], "served_by": settings.POD_NAME})


class ApiConsumer(JsonFrameConsumer):
    """``/ws/api/``: request/response with ``status`` OK or error; the socket stays open."""

    async def handle(self, payload: dict) -> None:
        if "request" not in payload:
            raise FrameError("bad_schema", 'missing field "request"')
        await self.send_json({"status": "OK", "data": payload["request"]})

    async def send_error(self, error: FrameError) -> None:
        await self.send_json({"status": "error", "error": f"{error.code}: {error.detail}"})


class ChatConsumer(JsonFrameConsumer):
    """``/ws/chat/<room>/``: every member on every replica gets every message."""

    async def connect(self):
        self.room = self.scope["url_route"]["kwargs"]["room"]
        if not protocol.is_valid_room(self.room):
            # Closing before accept refuses the handshake (HTTP 403).
            await self.close()
            return
        self.group = protocol.group_name(self.room)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json(protocol.welcome(self.room, settings.POD_NAME))

    async def disconnect(self, code):
        group = getattr(self, "group", None)
        if group is None:
            return
        try:
            await self.channel_layer.group_discard(group, self.channel_name)
        except Exception:  # a dead Redis must not turn a disconnect into a traceback storm
            logger.warning("group_discard failed for %s in %s", self.channel_name, group, exc_info=True)

    async def handle(self, payload: dict) -> None:
        event = protocol.chat_event(payload, origin=settings.POD_NAME)
        try:
            await self.channel_layer.group_send(self.group, event)
        except Exception as error:
            logger.warning("group_send to %s failed: %r", self.group, error)
            await self.send_json(
                {"type": "error", "code": "unavailable", "detail": "the channel layer is unreachable; the message was not delivered, send it again"}
            )

    async def chat_message(self, event: dict) -> None:
        await self.send_json(protocol.chat_delivery(event, served_by=settings.POD_NAME))


class RejectConsumer(AsyncWebsocketConsumer):
    """Any other WebSocket path: refuse the handshake instead of erroring in the router."""

    async def connect(self):
        await self.close()
