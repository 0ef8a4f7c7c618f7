"""The checker: every member's whole history against every acknowledged
publish, judged per fault window.

A window runs from its fault's start to the next fault's start, so a fault's
aftermath (reconnects, replays, a replica coming back) counts against it. A
message belongs to the window it was published in; a reconnect to the one
its socket was lost in.

For each member of a room, every acknowledged message of the room published
after the member joined must be delivered exactly once, in room order, or be
covered by a ``recovered: false`` welcome (the member was told it may have
missed it). What else is measured: the longest stall (a delivery's time
after its publish), reconnect times, replicas healthy again, peak memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from loadtest.chaos.nemesis import Window
from loadtest.chaos.observer import Observer
from loadtest.chaos.workload import Publish
from loadtest.room_member import Position, RoomMember

# What a member may wait for a message beyond the time the whole service
# could not deliver: the link timeout (5 s) plus one reconnect and replay.
STALL_ALLOWANCE_SECONDS = 10.0
HEALTHY_WITHIN_SECONDS = 30.0


@dataclass
class WindowResult:
    name: str
    kind: str
    start: float
    end: float
    next_start: float
    notes: list[str]
    published: int = 0  # publishes tried in the window
    acked: int = 0
    owed: int = 0  # (member, acknowledged message) pairs owed
    delivered: int = 0
    lost: int = 0  # owed, not delivered, and the member was not told
    told_missed: int = 0  # owed, not delivered, covered by recovered: false
    duplicated: int = 0
    reordered: int = 0
    longest_stall: float = 0.0
    stall_bound: float = 0.0
    reconnects: int = 0
    longest_reconnect: float = 0.0
    healthy_after: float | None = None  # seconds from the fault's end
    peak_rss_mib: float = 0.0
    peak_rss_replica: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


@dataclass
class Verdict:
    windows: list[WindowResult]
    members_not_connected: list[str]  # members that gave up reconnecting, and why
    memory_limit_mib: float

    @property
    def ok(self) -> bool:
        return all(w.ok for w in self.windows) and not self.members_not_connected

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "memory_limit_mib": self.memory_limit_mib,
            "members_not_connected": self.members_not_connected,
            "windows": [asdict(w) | {"ok": w.ok} for w in self.windows],
        }


def window_of(windows: list[Window], at: float) -> int | None:
    for index, window in enumerate(windows):
        if window.start <= at < window.next_start:
            return index
    return None


def owed_to(member: RoomMember, position: Position) -> bool:
    """Whether a message at ``position`` was published after the member joined."""
    joined = member.welcomes[0].position if member.welcomes else None
    if joined is None:
        return False
    return position.epoch != joined.epoch or position.offset > joined.offset


def check(
    windows: list[Window],
    members: dict[str, list[RoomMember]],
    publishes: list[Publish],
    observer: Observer,
    memory_limit_bytes: int,
) -> Verdict:
    results = [
        WindowResult(
            w.name,
            w.kind,
            w.start,
            w.end,
            w.next_start,
            list(w.notes),
            stall_bound=w.outage_seconds + STALL_ALLOWANCE_SECONDS,
            checks=dict(w.checks),
        )
        for w in windows
    ]

    def result_at(at: float) -> WindowResult | None:
        index = window_of(windows, at)
        return None if index is None else results[index]

    by_id = {p.id: p for p in publishes}
    for publish in publishes:
        if result := result_at(publish.sent_at):
            result.published += 1
            result.acked += publish.acked

    for room, room_members in members.items():
        acked = [p for p in publishes if p.room == room and p.acked and p.position is not None]
        for member in room_members:
            label = f"{room} member {room_members.index(member)}"
            received = Counter(chat.id for chat in member.chats)
            first_at = {}
            for chat in member.chats:
                first_at.setdefault(chat.id, chat.at)
            for publish in acked:
                if not owed_to(member, publish.position) or not (result := result_at(publish.sent_at)):
                    continue
                result.owed += 1
                if received[publish.id]:
                    result.delivered += 1
                    result.longest_stall = max(result.longest_stall, first_at[publish.id] - publish.sent_at)
                elif member.told_missing(publish.position):
                    result.told_missed += 1
                else:
                    result.lost += 1
                    if len(result.examples) < 5:
                        result.examples.append(f"{label} lost {publish.via} message {publish.id} at {publish.position}")
            for message_id, times in received.items():
                if times > 1 and (publish := by_id.get(message_id)) and (result := result_at(publish.sent_at)):
                    result.duplicated += times - 1
                    if len(result.examples) < 5:
                        result.examples.append(f"{label} got {message_id} {times} times")
            last: dict[str, int] = {}
            seen: set[str] = set()
            for chat in member.chats:
                position = chat.position
                if position is None or chat.id in seen:  # a second copy is counted as a duplicate
                    continue
                seen.add(chat.id)
                if position.offset < last.get(position.epoch, 0) and (result := result_at(chat.at)):
                    result.reordered += 1
                    if len(result.examples) < 5:
                        result.examples.append(f"{label} got offset {position.offset} after {last[position.epoch]}")
                last[position.epoch] = max(position.offset, last.get(position.epoch, 0))
            for reconnect in member.reconnects:
                if result := result_at(reconnect.lost.at):
                    result.reconnects += 1
                    result.longest_reconnect = max(result.longest_reconnect, reconnect.seconds)

    for window, result in zip(windows, results, strict=True):
        # A fault counts from its repair; the baseline had none to repair.
        since = window.start if window.kind == "baseline" else window.end
        healthy = observer.healthy_at(since, window.replicas)
        result.healthy_after = None if healthy is None else max(0.0, healthy - since)
        peak, replica = observer.peak_rss(window.start, window.next_start)
        result.peak_rss_mib, result.peak_rss_replica = peak / 2**20, replica
        result.checks.update(
            {
                "nothing acknowledged lost silently": result.lost == 0,
                "no duplicates": result.duplicated == 0,
                "nothing out of order": result.reordered == 0,
                f"longest stall ≤ {result.stall_bound:.0f} s": result.longest_stall <= result.stall_bound,
                f"healthy ≤ {HEALTHY_WITHIN_SECONDS:.0f} s after": result.healthy_after is not None
                and result.healthy_after <= HEALTHY_WITHIN_SECONDS,
                "RSS below the memory limit": peak < memory_limit_bytes,
            }
        )

    not_connected = [
        f"{room} member {i}: {m.gave_up}" for room, ms in members.items() for i, m in enumerate(ms) if m.gave_up
    ]
    return Verdict(results, not_connected, memory_limit_bytes / 2**20)
