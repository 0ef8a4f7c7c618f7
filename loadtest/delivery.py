"""Who must receive which chat message by when, in one locust process.

Rooms are namespaced per process, so every member of a room lives in the same
process as every publisher to it: ``sent_at`` is this process's monotonic
clock and a delivery's latency is one subtraction, with no clock skew between
machines. Each member's receipt becomes one request event named
``origin->served_by``; a member still waiting when the deadline passes becomes
one failure with the same kind of name. Nothing here touches sockets or gevent.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loadtest.thresholds import pair_name


class NotDelivered(Exception):
    """A room member did not receive a message within the deadline."""


@dataclass
class _Pending:
    sent_at: float
    request_type: str
    origin: str
    # member -> the replica serving it (from its welcome frame)
    waiting: dict[object, str] = field(default_factory=dict)


class DeliveryTracker:
    def __init__(self, fire: Callable[..., None], deadline: float, clock: Callable[[], float] = time.monotonic):
        """``fire`` takes locust's request-event keywords."""
        self.fire = fire
        self.deadline = deadline
        self.clock = clock
        # Short and random: rooms of concurrent runs (or of two locust workers)
        # against one target never share a name.
        self.namespace = f"lt-{secrets.token_hex(4)}"
        self.rooms: dict[str, dict[object, str]] = {}
        self.pending: dict[str, _Pending] = {}
        self.unsettled_at_stop = 0
        self._ids = itertools.count()
        self._counters: dict[str, itertools.count] = {}

    def room_name(self, kind: str, number: int) -> str:
        return f"{self.namespace}-{kind}-{number}"

    def next_number(self, kind: str) -> int:
        """0, 1, 2, ... per kind: numbers the users of this process to fill rooms in turn."""
        return next(self._counters.setdefault(kind, itertools.count()))

    def join(self, room: str, member: object, replica: str) -> None:
        """From now on, every message published to ``room`` must reach ``member``."""
        self.rooms.setdefault(room, {})[member] = replica

    def lose(self, room: str, member: object) -> None:
        """The member is gone for good (it will not resume): expect nothing new,
        keep judging what it was owed. A member that reconnects and resumes is
        not lost: it stays joined, and what it missed arrives with the replay."""
        self.rooms.get(room, {}).pop(member, None)

    def leave(self, room: str, member: object) -> None:
        """The member was stopped on purpose: drop what it was still owed, unjudged."""
        self.lose(room, member)
        for pending in self.pending.values():
            if pending.waiting.pop(member, None) is not None:
                self.unsettled_at_stop += 1

    def publish(self, room: str, request_type: str, origin: str = "unknown") -> tuple[str, float]:
        """Register a message about to be sent; returns its ``id`` and ``sent_at``."""
        message_id = f"{self.namespace}-{next(self._ids)}"
        sent_at = self.clock()
        self.pending[message_id] = _Pending(sent_at, request_type, origin, dict(self.rooms.get(room, {})))
        return message_id, sent_at

    def published_by(self, message_id: str, origin: str) -> None:
        """The publisher learned which pod published (an HTTP 202 names it)."""
        if message_id in self.pending:
            self.pending[message_id].origin = origin

    def cancel(self, message_id: str) -> None:
        """Publishing failed (and was reported as such): nobody is owed the message."""
        self.pending.pop(message_id, None)

    def received(self, member: object, frame: dict) -> None:
        """A ``chat.message`` frame reached ``member``."""
        message_id = frame.get("id")
        pending = self.pending.get(message_id) if isinstance(message_id, str) else None
        # Not ours, or already judged late: a second verdict would count it twice.
        if pending is None or member not in pending.waiting:
            return
        del pending.waiting[member]
        origin = str(frame.get("origin", pending.origin))
        pending.origin = origin
        self.fire(
            request_type=pending.request_type,
            name=pair_name(origin, str(frame.get("served_by", "unknown"))),
            response_time=(self.clock() - pending.sent_at) * 1000,
            response_length=len(str(frame.get("message", ""))),
            exception=None,
            context={},
        )
        if not pending.waiting:
            del self.pending[message_id]

    def sweep(self) -> None:
        """Fail every member still waiting for a message older than the deadline."""
        now = self.clock()
        # Insertion order is publish order: stop at the first one still in time.
        for message_id in list(self.pending):
            pending = self.pending[message_id]
            age = now - pending.sent_at
            if age < self.deadline:
                break
            for replica in pending.waiting.values():
                self.fire(
                    request_type=pending.request_type,
                    name=pair_name(pending.origin, replica),
                    response_time=age * 1000,
                    response_length=0,
                    exception=NotDelivered(f"not delivered within {self.deadline:g} s"),
                    context={},
                )
            del self.pending[message_id]

    def settle_at_stop(self) -> None:
        """The test is stopping: what is still in time is neither passed nor failed."""
        self.sweep()
        self.unsettled_at_stop += sum(len(pending.waiting) for pending in self.pending.values())
        self.pending.clear()
