"""Room history in Redis: what a member that reconnects missed, and whether it can have it.

Every publish to a room is appended to the room's history and published in
one step (a Lua script: ``XADD`` + ``PUBLISH``), so history order is delivery
order on every replica, and a message is never delivered without being in
history, nor in history without being published.

A room's position is ``(epoch, offset)``. Offsets count the room's messages
from 1, with no gaps, so a member that holds offset N and sees N + 2 knows it
missed N + 1. The epoch names one unbroken history: it changes whenever the
history may have been lost, so an offset is only comparable within its epoch:

* the history expired (no publish for ``ROOM_HISTORY_TTL_SECONDS``) or was
  evicted, or Redis restarted without persistence: the meta hash is gone and
  the next publish starts a new epoch;
* a Sentinel failover: the new master has a new replication ID, which the
  script compares with the one the epoch was started under. A replica may
  not have received the last writes, so the history it holds is not trusted.

The stream keeps at most ``ROOM_HISTORY_SIZE`` entries (exact trim) and, with
a TTL, the history is forgotten that long after the room's last publish; the
epoch lives as long after the room's last publish or join.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from redis.commands.core import AsyncScript

# Every script starts here. KEYS[1] the stream, KEYS[2] its meta hash (epoch,
# replid, offset), KEYS[3] the ids of the messages the stream holds (a sorted
# set scored by offset); ARGV[1] the epoch to start if a new one is needed,
# ARGV[2] the TTL in seconds (0: none). Leaves the room's epoch and offset in
# `epoch` and `top`: a room always has an epoch once anyone has looked at it.
EPOCH = """
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'replid', 'offset')
local epoch, top = meta[1], tonumber(meta[3])
if (not epoch) or meta[2] ~= replid then
  epoch, top = ARGV[1], 0
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'replid', replid, 'offset', 0)
end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
"""

# ARGV[3] pub/sub channel, ARGV[4] payload, ARGV[5] max entries, ARGV[6] the
# message's id ('' for none). A message whose id the history still holds was
# published already (a client that resent it after losing its socket, or a
# publish that reached Redis after its publisher gave up on it): it is not
# published again, and the answer is the first one's offset, flagged 1.
PUBLISH_SCRIPT = (
    EPOCH
    + """
if ARGV[6] ~= '' then
  local seen = redis.call('ZSCORE', KEYS[3], ARGV[6])
  if seen then return {epoch, tonumber(seen), 1} end
end
top = redis.call('HINCRBY', KEYS[2], 'offset', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], '0-' .. top, 'd', ARGV[4])
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[3], top, ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', top - tonumber(ARGV[5]))
end
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if ARGV[6] ~= '' then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
end
redis.call('PUBLISH', ARGV[3], 'H' .. top .. ':' .. epoch .. ':' .. ARGV[4])
return {epoch, top, 0}
"""
)

POSITION_SCRIPT = (
    EPOCH
    + """
return {epoch, top}
"""
)

# ARGV[3] the member's epoch, ARGV[4] its offset: the range starts after it
# in the same epoch, at the beginning in another.
SINCE_SCRIPT = (
    EPOCH
    + """
local start = '-'
if epoch == ARGV[3] then start = '(0-' .. ARGV[4] end
return {epoch, top, redis.call('XRANGE', KEYS[1], start, '+')}
"""
)

# What the script publishes starts with this byte; a serialized message (a
# msgpack map, 0x80-0x8f, 0xde or 0xdf) never does.
ENVELOPE = ord("H")


@dataclass(frozen=True)
class Position:
    epoch: str
    offset: int
    repeated: bool = False  # a publish whose id the history held: not published again


@dataclass(frozen=True)
class Recovery:
    """What a member that resumes from a position gets back."""

    position: Position  # the room's position now
    messages: list[tuple[int, bytes]]  # (offset, payload) after the member's offset, oldest first
    recovered: bool  # True: messages are exactly what it missed


def new_epoch() -> str:
    return secrets.token_hex(4)


def keys(prefix: str, group: str) -> tuple[str, str, str]:
    return f"{prefix}:history:{group}", f"{prefix}:history-meta:{group}", f"{prefix}:history-ids:{group}"


# The ids a publish is deduplicated by: short strings and integers. Other
# values (objects, long strings) pass through to members but are not kept.
MAX_ID_LENGTH = 128


def dedup_key(message_id: object) -> str:
    """What the script keeps for ``message_id`` ('' for an id it does not keep)."""
    if isinstance(message_id, bool):
        return ""
    if isinstance(message_id, int):
        return f"i:{message_id}"
    if isinstance(message_id, str) and 0 < len(message_id) <= MAX_ID_LENGTH:
        return f"s:{message_id}"
    return ""


def open_envelope(data: bytes) -> tuple[int, str, bytes] | None:
    """(offset, epoch, payload) of a message the script published, or None for a plain one."""
    if not data or data[0] != ENVELOPE:
        return None
    offset, epoch, payload = data[1:].split(b":", 2)
    return int(offset), epoch.decode(), payload


def _script(text: str) -> AsyncScript:
    # Called by its SHA (EVALSHA): a publish sends its arguments, not the
    # script. A Redis that does not know it yet (restarted, failed over) is
    # sent it once (SCRIPT LOAD) and asked again.
    return AsyncScript(None, text.encode())


_PUBLISH, _POSITION, _SINCE = _script(PUBLISH_SCRIPT), _script(POSITION_SCRIPT), _script(SINCE_SCRIPT)


async def publish(
    redis, prefix: str, group: str, channel: str, payload: bytes, size: int, ttl: int, message_id: object = None
) -> Position:
    epoch, offset, repeated = await _PUBLISH(
        keys(prefix, group), (new_epoch(), ttl, channel, payload, size, dedup_key(message_id)), client=redis
    )
    return Position(epoch.decode(), int(offset), bool(repeated))


async def position(redis, prefix: str, group: str, ttl: int) -> Position:
    """Where the room is now: a member that joins fresh starts here."""
    epoch, offset = await _POSITION(keys(prefix, group), (new_epoch(), ttl), client=redis)
    return Position(epoch.decode(), int(offset))


async def since(redis, prefix: str, group: str, ttl: int, resume: Position) -> Recovery:
    """The room's messages after ``resume``: all it has if the epoch changed."""
    epoch, top, entries = await _SINCE(
        keys(prefix, group), (new_epoch(), ttl, resume.epoch, resume.offset), client=redis
    )
    now = Position(epoch.decode(), int(top))
    messages = [(int(entry_id.split(b"-")[1]), fields[1]) for entry_id, fields in entries]
    if resume.epoch != now.epoch:
        # Another history (the member's expired, was evicted, or was lost with
        # a Redis restart or failover): all of it is new to the member, and
        # whatever came before it is lost.
        return Recovery(now, messages, recovered=False)
    if resume.offset >= now.offset:
        # Nothing missed (an offset from the future is not trusted).
        return Recovery(now, [], recovered=resume.offset == now.offset)
    # Covered when the oldest message kept is the first one the member missed.
    covered = bool(messages) and messages[0][0] == resume.offset + 1
    return Recovery(now, messages, recovered=covered)
