"""The wire protocol of ARCHITECTURE.md, as pure functions.

Consumers and the HTTP broadcast view share these, so a frame is validated
and shaped in exactly one place, and the rules are testable without sockets.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROOM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Fields a publisher may attach to a chat message; they travel unchanged.
PASSTHROUGH_FIELDS = ("id", "sent_at")


@dataclass
class FrameError(Exception):
    """A client frame the server refuses; becomes an error frame, never a crash."""

    code: str  # bad_json | bad_schema | too_large | rate_limited
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


def is_valid_room(room: str) -> bool:
    return bool(ROOM_PATTERN.fullmatch(room))


def group_name(room: str) -> str:
    """The channel-layer group of a room (group names allow letters, digits, - _ .)."""
    return f"chat.{room}"


def decode_text_frame(text_data: str | None, bytes_data: bytes | None, max_bytes: int) -> dict:
    """Parse one client frame into a JSON object, or raise FrameError."""
    if text_data is None:
        size = len(bytes_data or b"")
        raise FrameError("bad_json", f"binary frames are not accepted ({size} bytes): send a UTF-8 JSON text frame")
    # Daphne decodes text frames before we see them; the size limit is on the
    # encoded form, which is what crossed the network. Cheap upper bound first.
    if len(text_data) * 4 > max_bytes and len(text_data.encode("utf-8", "surrogatepass")) > max_bytes:
        raise FrameError("too_large", f"frame is over the {max_bytes}-byte limit")
    try:
        payload = json.loads(text_data)
    except ValueError as error:
        raise FrameError("bad_json", f"frame is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise FrameError("bad_json", f"frame must be a JSON object, got {type(payload).__name__}")
    return payload


def require_message(payload: dict) -> str:
    """The ``message`` field of a chat frame or broadcast body: a string."""
    if "message" not in payload:
        raise FrameError("bad_schema", 'missing field "message"')
    message = payload["message"]
    if not isinstance(message, str):
        raise FrameError("bad_schema", f'"message" must be a string, got {type(message).__name__}')
    return message


def chat_event(payload: dict, origin: str) -> dict:
    """The channel-layer event that a validated chat frame publishes to its room."""
    event = {"type": "chat.message", "message": require_message(payload), "origin": origin}
    for field in PASSTHROUGH_FIELDS:
        if field in payload:
            event[field] = payload[field]
    return event


def chat_delivery(event: dict, served_by: str) -> dict:
    """The frame a room member receives for a chat event."""
    frame = {"type": "chat.message", "message": event["message"]}
    for field in PASSTHROUGH_FIELDS:
        if field in event:
            frame[field] = event[field]
    frame["origin"] = event["origin"]
    frame["served_by"] = served_by
    return frame


def welcome(room: str, pod: str) -> dict:
    return {"type": "welcome", "room": room, "pod": pod}


def error_frame(error: FrameError) -> dict:
    return {"type": "error", "code": error.code, "detail": error.detail}


def dumps(frame: dict) -> str:
    # Compact separators: every byte is paid once per member on fan-out.
    # ensure_ascii stays on: a lone surrogate a client smuggled in as "\\ud800"
    # must not become a str that cannot be encoded to UTF-8 on the way out.
    return json.dumps(frame, separators=(",", ":"))
