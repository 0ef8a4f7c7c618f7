"""HTTP side: the chat page, health and readiness, and the broadcast API."""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from realtime import metrics, protocol
from realtime.protocol import FrameError
from realtime.replica import state

logger = logging.getLogger(__name__)


@require_GET
def index(request: HttpRequest):
    room = request.GET.get("room", "").strip()
    if room and protocol.is_valid_room(room):
        return redirect("room", room=room)
    return render(request, "realtime/index.html", {"pod": settings.POD_NAME, "bad_room": room})


@require_GET
def room(request: HttpRequest, room: str):
    if not protocol.is_valid_room(room):
        raise Http404("room names are 1-64 characters of A-Z, a-z, 0-9, _ and -")
    return render(request, "realtime/room.html", {"room": room, "pod": settings.POD_NAME})


@require_GET
def healthz(request: HttpRequest):
    """Liveness: the process answers. Deliberately checks nothing else, so a
    Redis outage never gets every replica restarted at once."""
    return JsonResponse({"status": "ok", "pod": settings.POD_NAME})


async def _layer_round_trip() -> None:
    layer = get_channel_layer()
    # The default prefix, as the consumers' channels: the core layer keeps all
    # of a process's channels of one prefix in one Redis list, read by one
    # receive at a time. A channel of its own prefix lands in another list,
    # which a consumer's pending receive does not read: readiness then timed
    # out whenever a socket was open.
    channel = await layer.new_channel()
    nonce = secrets.token_hex(8)
    await layer.send(channel, {"type": "readyz.ping", "nonce": nonce})
    message = await layer.receive(channel)
    if message.get("nonce") != nonce:
        raise RuntimeError("round trip returned another message")


@require_GET
async def readyz(request: HttpRequest):
    """Readiness: not draining, and a real send/receive through the channel layer."""
    if state.draining:
        return JsonResponse({"status": "unavailable", "pod": settings.POD_NAME, "reason": "draining"}, status=503)
    try:
        await asyncio.wait_for(_layer_round_trip(), settings.READYZ_TIMEOUT_SECONDS)
    except Exception as error:
        reason = "timed out" if isinstance(error, asyncio.TimeoutError) else f"{type(error).__name__}: {error}"
        return JsonResponse(
            {"status": "unavailable", "pod": settings.POD_NAME, "reason": f"channel layer: {reason}"}, status=503
        )
    return JsonResponse({"status": "ready", "pod": settings.POD_NAME})


def _bearer_ok(request: HttpRequest) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.BROADCAST_TOKEN.encode())


def _error(status: int, code: str, detail: str) -> JsonResponse:
    metrics.BROADCASTS.labels(metrics.REPLICA, str(status)).inc()
    return JsonResponse({"status": "error", "code": code, "detail": detail}, status=status)


@csrf_exempt  # a token-authenticated API for servers, not a browser form
@require_POST
def broadcast(request: HttpRequest, room: str):
    """Publish to a room from the HTTP side; reaches members on every replica."""
    if not settings.BROADCAST_TOKEN:
        return _error(503, "disabled", "the broadcast API is off: set BROADCAST_TOKEN to enable it")
    if not _bearer_ok(request):
        response = _error(401, "unauthorized", "send Authorization: Bearer <BROADCAST_TOKEN>")
        response["WWW-Authenticate"] = "Bearer"
        return response
    if not protocol.is_valid_room(room):
        return _error(404, "unknown_room", "room names are 1-64 characters of A-Z, a-z, 0-9, _ and -")
    if len(request.body) > settings.WS_MAX_MESSAGE_BYTES:
        return _error(413, "too_large", f"body is over the {settings.WS_MAX_MESSAGE_BYTES}-byte limit")
    try:
        payload = protocol.decode_text_frame(request.body.decode("utf-8"), None, settings.WS_MAX_MESSAGE_BYTES)
        event = protocol.chat_event(payload, origin=settings.POD_NAME)
    except UnicodeDecodeError:
        return _error(400, "bad_json", "body is not UTF-8")
    except FrameError as error:
        return _error(400, error.code, error.detail)
    try:
        async_to_sync(get_channel_layer().group_send)(protocol.group_name(room), event)
    except Exception as error:
        metrics.LAYER_ERRORS.labels(metrics.REPLICA, "group_send").inc()
        logger.warning("broadcast to %s failed: %r", room, error)
        return _error(503, "unavailable", "the channel layer is unreachable; nothing was published")
    metrics.BROADCASTS.labels(metrics.REPLICA, "202").inc()
    return JsonResponse({"status": "accepted", "room": room, "origin": settings.POD_NAME}, status=202)
