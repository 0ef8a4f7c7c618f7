"""The wire protocol (README, "Wire protocol"), as pure functions.

Consumers and the HTTP broadcast view share these, so a frame is validated
and shaped in exactly one place, and the rules are testable without sockets.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

ROOM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Fields a publisher may attach to a chat message; they travel unchanged.
PASSTHROUGH_FIELDS = ("id", "sent_at")
# Objects and arrays inside each other, the frame itself counting as one.
# A 64 KiB frame holds 32,000 levels; json.loads and json.dumps recurse once
# per level and raise RecursionError near 1,000 (less from a deep stack, such
# as a consumer echoing a frame back). Chat frames are flat; 32 leaves room
# for any sensible client payload.
MAX_JSON_DEPTH = 32
# The integers a browser's JSON.parse keeps exactly (Number.MAX_SAFE_INTEGER).
# Beyond them an id silently changes on the way to other members, and past
# 2**64 msgpack cannot pack the event at all.
MAX_SAFE_INTEGER = 2**53 - 1
SAFE_INTEGER_DIGITS = len(str(MAX_SAFE_INTEGER))


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
    """Parse one client frame (or broadcast API body) into a JSON object, or raise FrameError.

    What is accepted round-trips: the channel layer packs it with msgpack, and
    every member's browser reads it with JSON.parse, so JSON that only Python
    takes is refused too (``check_portable``).
    """
    if text_data is None:
        size = len(bytes_data or b"")
        raise FrameError("bad_json", f"binary frames are not accepted ({size} bytes): send a UTF-8 JSON text frame")
    # Daphne decodes text frames before we see them; the size limit is on the
    # encoded form, which is what crossed the network. Cheap upper bound first.
    if len(text_data) * 4 > max_bytes and len(text_data.encode("utf-8", "surrogatepass")) > max_bytes:
        raise FrameError("too_large", f"frame is over the {max_bytes}-byte limit")
    try:
        payload = json.loads(text_data, parse_int=_parse_int)
    except ValueError as error:
        raise FrameError("bad_json", f"frame is not valid JSON: {error}") from None
    except RecursionError:
        # Thousands of nested brackets fit in one frame; json.loads gives up
        # cleanly, and the frame is refused like any other too-deep one.
        raise _too_deep() from None
    if not isinstance(payload, dict):
        raise FrameError("bad_json", f"frame must be a JSON object, got {type(payload).__name__}")
    check_portable(payload)
    return payload


def _too_deep() -> FrameError:
    return FrameError("bad_json", f"frame nests objects and arrays deeper than {MAX_JSON_DEPTH} levels")


def _unsafe_integer() -> FrameError:
    return FrameError(
        "bad_schema",
        f"integers must be within plus or minus {MAX_SAFE_INTEGER} (2**53 - 1), the range "
        "browsers keep exactly: send larger numbers, such as ids, as strings",
    )


def _parse_int(digits: str) -> int:
    # More digits than any safe integer has: refused before Python converts
    # it, which is slow for thousands of digits and, past 4300, refused as if
    # the JSON were invalid.
    if len(digits) > SAFE_INTEGER_DIGITS + digits.startswith("-"):
        raise _unsafe_integer()
    return int(digits)


def check_portable(payload: dict) -> None:
    """Raise FrameError unless all of ``payload`` survives msgpack and JSON.parse.

    Python's json module accepts, and the rest of the path does not:
    - NaN, Infinity, -Infinity, and numbers such as 1e400 that overflow to
      infinity: msgpack packs them, but the frame every member then receives
      holds a bare NaN, which JSON.parse rejects;
    - integers beyond 2**53 - 1: JSON.parse rounds them, and past 2**64
      msgpack raises OverflowError;
    - lone surrogates, sent as "\\ud800"-style escapes, in values or keys:
      msgpack's UTF-8 encoding raises UnicodeEncodeError;
    - nesting deeper than MAX_JSON_DEPTH, which json.dumps may fail to encode.
    An explicit stack, not recursion: the walk must not fail on the very
    frames it exists to refuse.
    """
    stack = [(payload, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if type(container) is dict:
            for key in container:
                _check_text(key)
            values = container.values()
        else:
            values = container
        # json.loads makes exact dicts, lists, strs, ints, floats, bools and
        # None: comparing types is the cheap test, once per value of a frame.
        for value in values:
            kind = type(value)
            if kind is str:
                _check_text(value)
            elif kind is int:
                if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
                    raise _unsafe_integer()
            elif kind is dict or kind is list:
                stack.append((value, depth + 1))
            elif kind is float and not math.isfinite(value):
                raise FrameError(
                    "bad_json",
                    "numbers must be finite: NaN, Infinity and numbers too large for a double (such as 1e400) "
                    "are not JSON that browsers accept",
                )


def _check_text(text: str) -> None:
    # Almost every string is ASCII, which cannot hold a surrogate: one C-speed test.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError(
            "bad_json",
            "strings must be valid Unicode: a \\ud800-\\udfff escape is allowed only as half of a surrogate pair",
        ) from None


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


# Fields the fan-out layer's room history adds to a delivery.
POSITION_FIELDS = ("offset", "epoch")
EPOCH_PATTERN = re.compile(r"[0-9a-f]{1,32}")


def chat_delivery(event: dict, served_by: str) -> dict:
    """The frame a room member receives for a chat event."""
    frame = {"type": "chat.message", "message": event["message"]}
    for field in PASSTHROUGH_FIELDS:
        if field in event:
            frame[field] = event[field]
    frame["origin"] = event["origin"]
    frame["served_by"] = served_by
    for field in POSITION_FIELDS:
        if field in event:
            frame[field] = event[field]
    return frame


def resume_position(query_string: bytes) -> tuple[str, int] | None:
    """The ``(epoch, offset)`` a reconnecting member resumes from: ``?epoch=E&offset=N``."""
    query = parse_qs(query_string.decode("latin-1"))
    if "offset" not in query and "epoch" not in query:
        return None
    epoch, offset = query.get("epoch", [""])[0], query.get("offset", [""])[0]
    if not EPOCH_PATTERN.fullmatch(epoch) or not offset.isdigit() or len(offset) > 15:
        raise FrameError(
            "bad_schema", "resume with ?epoch=<the epoch>&offset=<the last offset> of a message received; joined live"
        )
    return epoch, int(offset)


def welcome(room: str, pod: str, **position) -> dict:
    """The first frame of a chat socket; with room history, where the room is
    (``epoch``, ``offset``), and for a member that resumed, whether it got
    everything it missed (``recovered``) and how many messages were replayed."""
    frame = {"type": "welcome", "room": room, "pod": pod}
    frame.update((name, value) for name, value in position.items() if value is not None)
    return frame


def error_frame(error: FrameError) -> dict:
    return {"type": "error", "code": error.code, "detail": error.detail}


def dumps(frame: dict) -> str:
    # Compact separators: every byte is paid once per member on fan-out.
    # ensure_ascii stays on: should a lone surrogate ever get past
    # check_portable, it still leaves as an escape, never as a str that cannot
    # be encoded to UTF-8 on the way out.
    return json.dumps(frame, separators=(",", ":"))
