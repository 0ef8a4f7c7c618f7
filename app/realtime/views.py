"""HTTP side: the chat page, health and readiness, and the broadcast API."""

from __future__ import annotations

import hmac
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from realtime import metrics, protocol
from realtime.layers import LAYER_ERRORS, FanoutChannelLayer
from realtime.protocol import FrameError
from realtime.readiness import readiness

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


def _readiness_answer(request: HttpRequest, reason: str) -> JsonResponse:
    body = {"status": "unavailable" if reason else "ready", "pod": settings.POD_NAME}
    # nginx sets X-Forwarded-For on every request it proxies, replacing any a
    # client sent. Without it the request came straight to the pod port: a
    # kubelet probe, or an operator with a port-forward, who need the reason.
    # The public gets none: it can name Redis's address.
    if reason and "HTTP_X_FORWARDED_FOR" not in request.META:
        body["reason"] = reason
    return JsonResponse(body, status=503 if reason else 200)


# Readiness: not draining, not overloaded, and the channel layer answers a
# send/receive round trip (realtime/readiness.py: cached, one check at a time).
# Two views, so neither server pays for the other's way of waiting.
@require_GET
async def readyz(request: HttpRequest):
    """Under Daphne: waits, when it must, on the server's own loop."""
    return _readiness_answer(request, await readiness.reason_async())


@require_GET
def readyz_sync(request: HttpRequest):
    """Under gunicorn: no loop per request, the checks run on one thread of the worker."""
    return _readiness_answer(request, readiness.reason_sync())


def _bearer_ok(request: HttpRequest) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), settings.BROADCAST_TOKEN.encode())


def _error(status: int, code: str, detail: str) -> JsonResponse:
    metrics.BROADCASTS.labels(metrics.REPLICA, str(status)).inc()
    return JsonResponse({"status": "error", "code": code, "detail": detail}, status=status)


@csrf_exempt  # a token-authenticated API for servers, not a browser form
def broadcast(request: HttpRequest, room: str):
    """Publish to a room from the HTTP side; reaches members on every replica.

    Every answer is JSON with a code. A client's mistake is 4xx; 503 means this
    side cannot publish (no token configured, or Redis unreachable). The body
    passes the same checks as a WebSocket frame, so what is published always
    packs for the channel layer and parses in browsers.
    """
    if request.method != "POST":
        response = _error(405, "method_not_allowed", "POST a JSON body to publish")
        response["Allow"] = "POST"
        return response
    if not settings.BROADCAST_TOKEN:
        return _error(503, "disabled", "the broadcast API is off: set BROADCAST_TOKEN to enable it")
    if not _bearer_ok(request):
        response = _error(401, "unauthorized", "send Authorization: Bearer <BROADCAST_TOKEN>")
        response["WWW-Authenticate"] = "Bearer"
        return response
    if not protocol.is_valid_room(room):
        return _error(404, "unknown_room", "room names are 1-64 characters of A-Z, a-z, 0-9, _ and -")
    try:
        too_large = len(request.body) > settings.WS_MAX_MESSAGE_BYTES
    except RequestDataTooBig:  # over DATA_UPLOAD_MAX_MEMORY_SIZE, which Django answers with a bare 400
        too_large = True
    if too_large:
        return _error(413, "too_large", f"body is over the {settings.WS_MAX_MESSAGE_BYTES}-byte limit")
    try:
        payload = protocol.decode_text_frame(request.body.decode("utf-8"), None, settings.WS_MAX_MESSAGE_BYTES)
        event = protocol.chat_event(payload, origin=settings.POD_NAME)
    except UnicodeDecodeError:
        return _error(400, "bad_json", "body is not UTF-8")
    except FrameError as error:
        return _error(400, error.code, error.detail)
    try:
        position = async_to_sync(_publish)(protocol.group_name(room), event)
    except LAYER_ERRORS as error:
        metrics.LAYER_ERRORS.labels(metrics.REPLICA, "group_send").inc()
        logger.warning("broadcast to %s failed: %r", room, error)
        return _error(503, "unavailable", "the channel layer is unreachable; nothing was published")
    metrics.BROADCASTS.labels(metrics.REPLICA, "202").inc()
    body = {"status": "accepted", "room": room, "origin": settings.POD_NAME}
    if position is not None:
        # Where the message is in the room's history: what members see as its offset.
        body.update(epoch=position.epoch, offset=position.offset)
        if position.repeated:  # its id was published already: this is that message's position
            body["repeated"] = True
    return JsonResponse(body, status=202)


async def _publish(group: str, event: dict):
    layer = get_channel_layer()
    if isinstance(layer, FanoutChannelLayer):
        return await layer.publish(group, event)
    await layer.group_send(group, event)
    return None
