"""Cross-replica fan-out through the load balancer, checked message by message.

In each room, K WebSocket clients connect through nginx and land wherever it
puts them (the welcome frame names the replica; a room that misses a replica
gets more members until it has one there). Then one
member on every replica publishes, and the HTTP API publishes once (``rounds``
times, ``round_interval`` apart). Every member must receive every message of
its room exactly once, stamped with the right origin and, as served_by, the
replica of the socket that delivered it. The result is the origin -> served_by
delivery matrix, latency percentiles, the reconnects and a verdict.

Members keep their identity across reconnects (``loadtest.room_member``): a
socket closed mid-check, by a replica (draining, killed, lost Redis, full) or
by the network, is reopened through the same base URL with jittered backoff
until the check's deadline, and resumes from the member's last position, so
the server replays what it missed. Each message id still counts once per
member: a duplicate is a failure, and a message the member was told it may
have missed (``recovered: false``) is reported as told missing.

    python -m loadtest.fanout_check --target http://127.0.0.1:8080 --token "$BROADCAST_TOKEN"
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import os
import random
import re
import secrets
import sys
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from loadtest.room_member import RETRY_STATUSES, JoinError, Position, Reconnect, RoomMember, endpoints, now_ms

__all__ = [
    "CheckError",
    "FanoutReport",
    "Member",
    "Message",
    "endpoints",
    "join",
    "now_ms",
    "publish_http",
    "run_fanout_check",
    "tally",
    "wait_for_deliveries",
]

# Handshakes in flight at once within a room.
CONNECT_CONCURRENCY = 50
# Joins beyond clients_per_room that may be spent to put a member of a room
# on every replica (random balancing can leave one out).
MAX_EXTRA_JOINS_PER_ROOM = 30
# After the last expected delivery: the window in which a duplicate would show up.
SETTLE_SECONDS = 0.5
# Problems listed in the rendered report; the rest are counted.
SHOWN_PROBLEMS = 20
# No proxy from the environment may sit between a check and the stack it checks.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CheckError(Exception):
    """The check could not run (the target refused or is unreachable)."""


@dataclass
class Message:
    id: str
    room: str
    text: str
    origin: str
    sent_at: float


class Member:
    """One chat socket that does not reconnect: its replica from the welcome
    frame, and every frame it receives (the tests' building block; the check
    itself uses ``RoomMember``, which resumes)."""

    def __init__(self, room: str, ws: ClientConnection, pod: str):
        self.room = room
        self.ws = ws
        self.pod = pod
        self.deliveries: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        self.other_frames: list[dict] = []
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                received = now_ms()
                frame = json.loads(raw)
                if frame.get("type") == "chat.message":
                    self.deliveries[str(frame.get("id"))].append((frame, received))
                else:
                    self.other_frames.append(frame)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def has_all(self, ids: list[str]) -> bool:
        return all(self.deliveries.get(message_id) for message_id in ids)

    async def publish(self, text: str) -> Message:
        message = Message(uuid.uuid4().hex, self.room, text, self.pod, now_ms())
        await self.ws.send(json.dumps({"message": text, "id": message.id, "sent_at": message.sent_at}))
        return message

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def join(base_url: str, room: str, *, deadline: float, reconnect: bool = True) -> Member:
    """Open one socket to ``room`` through ``base_url`` and read its welcome frame."""
    ws_base, origin = endpoints(base_url)
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise TimeoutError
            ws = await connect(f"{ws_base}/ws/chat/{room}/", origin=origin, proxy=None, open_timeout=remaining)
            try:
                welcome = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - loop.time())))
            except BaseException:
                await ws.close()
                raise
            if welcome.get("type") != "welcome" or not welcome.get("pod"):
                await ws.close()
                raise CheckError(f"room {room}: expected a welcome frame first, got {welcome}")
            return Member(room, ws, welcome["pod"])
        except InvalidStatus as error:
            status = error.response.status_code
            if not reconnect or status not in RETRY_STATUSES:
                raise CheckError(f"room {room}: handshake refused with HTTP {status}") from None
            why = f"HTTP {status}"
        except TimeoutError:
            raise CheckError(f"room {room}: no welcome frame before the timeout") from None
        except (OSError, InvalidHandshake, ConnectionClosed) as error:
            # Refused, reset, or cut mid-handshake (a replica that just died).
            if not reconnect:
                raise CheckError(f"room {room}: cannot connect: {error!r}") from None
            why = repr(error)
        # Full jitter, as the browser client does: retries from many clients spread out.
        delay = random.uniform(0, min(2.0, 0.05 * 2**attempt))
        attempt += 1
        if loop.time() + delay >= deadline:
            raise CheckError(f"room {room}: still failing at the timeout, last: {why}")
        await asyncio.sleep(delay)


def broadcast_request(base_url: str, room: str, token: str, body: dict) -> urllib.request.Request:
    """``POST /api/rooms/<room>/messages`` with ``body``, authorised by the broadcast token."""
    return urllib.request.Request(
        f"{base_url.rstrip('/')}/api/rooms/{room}/messages",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


async def publish_http(base_url: str, room: str, token: str, text: str) -> Message:
    """Publish through ``POST /api/rooms/<room>/messages``; the origin is the pod that answered."""
    message_id, sent_at = uuid.uuid4().hex, now_ms()
    request = broadcast_request(base_url, room, token, {"message": text, "id": message_id, "sent_at": sent_at})

    def post() -> str:
        try:
            with HTTP.open(request, timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise CheckError(f"HTTP publish to {room} answered {error.code}: {error.read()[:300]!r}") from None
        except OSError as error:
            raise CheckError(f"HTTP publish to {room} failed: {error!r}") from None
        try:
            return json.loads(body)["origin"]
        except (ValueError, TypeError, KeyError):
            raise CheckError(f"HTTP publish to {room}: the answer names no origin: {body[:300]!r}") from None

    origin = await asyncio.to_thread(post)
    return Message(message_id, room, text, origin, sent_at)


def natural_key(name: str) -> list:
    """daphne-2 before daphne-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass
class FanoutReport:
    target: str
    rooms: int
    clients_per_room: int
    expect_replicas: int
    problems: list[str] = field(default_factory=list)
    replicas: set[str] = field(default_factory=set)
    # Where the members landed when they joined (a member that moved is counted where it started).
    sockets: Counter = field(default_factory=Counter)
    matrix: dict[tuple[str, str], int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    http_origins: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    rounds: int = 1
    # Every socket lost mid-check and the welcome that ended it.
    reconnects: list[Reconnect] = field(default_factory=list)
    # Members that resumed and were told ``recovered: false``.
    unrecovered_resumes: int = 0
    # (member, message) pairs a member never got but was told it may have missed.
    told_missing: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        served = sorted(self.replicas | {s for _, s in self.matrix}, key=natural_key)
        origins = served + sorted({o for o, _ in self.matrix} - set(served), key=natural_key)
        rounds = f", {self.rounds} publish rounds" if self.rounds > 1 else ""
        lines = [
            f"fan-out check through {self.target}: {self.rooms} rooms x {self.clients_per_room} sockets,"
            f" {self.expect_replicas} replicas expected{rounds}",
            "sockets per replica: " + (", ".join(f"{r} {self.sockets[r]}" for r in served) or "none"),
            "",
            "deliveries, origin (rows) -> served_by (columns):",
        ]
        width = max([len("origin"), *map(len, origins), *map(len, served)]) + 2
        if served:
            lines.append("origin".ljust(width) + "".join(name.rjust(width) for name in served))
        for origin in origins:
            cells = "".join(str(self.matrix.get((origin, s), 0)).rjust(width) for s in served)
            lines.append(origin.ljust(width) + cells)
        if not self.matrix:
            lines.append("(no deliveries)")
        if self.latencies_ms:
            p50, p95, p99 = (percentile(self.latencies_ms, p) for p in (50, 95, 99))
            lines.append(
                f"\nlatency send -> receive over {len(self.latencies_ms)} deliveries:"
                f" p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms"
            )
        lines.append(self.render_reconnects())
        lines += [f"note: {note}" for note in self.notes]
        if self.ok:
            through = f", through {len(self.reconnects)} reconnects" if self.reconnects else ""
            lines.append(
                f"verdict: PASS - every member received every message exactly once, across every replica pair{through}"
            )
        else:
            told = (
                f" ({self.told_missing} of them messages members were told they may have missed: recovered false)"
                if self.told_missing
                else ""
            )
            lines.append(f"verdict: FAIL - {len(self.problems)} problem(s){told}:")
            lines += [f"  - {problem}" for problem in self.problems[:SHOWN_PROBLEMS]]
            if len(self.problems) > SHOWN_PROBLEMS:
                lines.append(f"  ... and {len(self.problems) - SHOWN_PROBLEMS} more")
        return "\n".join(lines)

    def render_reconnects(self) -> str:
        if not self.reconnects:
            return "reconnects: none"
        codes = Counter(reconnect.lost.code for reconnect in self.reconnects)
        why = ", ".join(f"{code} x{count}" for code, count in sorted(codes.items()))
        recovered = sum(1 for reconnect in self.reconnects if reconnect.welcome.recovered is True)
        replayed = sum(reconnect.welcome.replayed for reconnect in self.reconnects)
        seconds = [reconnect.seconds for reconnect in self.reconnects]
        return (
            f"reconnects: {len(self.reconnects)} (close codes: {why}); resumed {recovered} recovered"
            f" ({replayed} messages replayed), {self.unrecovered_resumes} not recovered;"
            f" back within p50 {percentile(seconds, 50):.2f} s, max {max(seconds):.2f} s"
        )


async def wait_for_deliveries(
    members: list[Member | RoomMember], expected: dict[str, list[Message]], deadline: float
) -> None:
    """Until every member holds every message of its room or the deadline passes,
    then one settle window so a late duplicate is seen too."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        if all(member.has_all([m.id for m in expected[member.room]]) for member in members):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(SETTLE_SECONDS)


@dataclass
class _Receipts:
    """What one member got, the same for a single socket and a resuming member."""

    who: str
    by_id: dict[str, list[tuple[dict, float, str]]]  # id -> [(frame, received ms, replica of the socket)]
    other_frames: list[dict]
    lost: str | None  # why it is not in its room any more, if it is not


def _receipts(member: Member | RoomMember) -> _Receipts:
    by_id: dict[str, list[tuple[dict, float, str]]] = defaultdict(list)
    if isinstance(member, RoomMember):
        pods = [welcome.pod for welcome in member.welcomes]
        path = [pod for index, pod in enumerate(pods) if index == 0 or pods[index - 1] != pod]
        who = f"member of {member.room} on {' then '.join(path) or 'no replica'}"
        for chat in member.chats:
            by_id[chat.id].append((chat.frame, chat.at * 1000, chat.pod))
        lost = None
        if member.gave_up is not None:
            lost = (
                "was disconnected during the check"
                if not member.reconnect
                else f"could not get back into its room: {member.gave_up}"
            )
        return _Receipts(who, by_id, member.other_frames, lost)
    for message_id, received in member.deliveries.items():
        by_id[message_id] = [(frame, at, member.pod) for frame, at in received]
    lost = "was disconnected during the check" if member.closed.is_set() else None
    return _Receipts(f"member of {member.room} on {member.pod}", by_id, member.other_frames, lost)


def tally(report: FanoutReport, members: list[Member | RoomMember], expected: dict[str, list[Message]]) -> None:
    """Fill the matrix and latencies from what the members received; name every deviation."""
    # Where each message sits in its room's history, as any member saw it: a
    # member that never got it may have been told so (recovered: false).
    positions: dict[str, Position] = {}
    for member in members:
        if isinstance(member, RoomMember):
            for chat in member.chats:
                if chat.position is not None:
                    positions.setdefault(chat.id, chat.position)
    for member in members:
        receipts = _receipts(member)
        who = receipts.who
        wanted = {message.id: message for message in expected[member.room]}
        for message_id, received in receipts.by_id.items():
            if message_id not in wanted:
                report.problems.append(f"{who} got a message nobody in its room sent: {received[0][0]}")
                continue
            message = wanted[message_id]
            if len(received) > 1:
                report.problems.append(f"{who} got {message.origin}'s message {len(received)} times")
            for frame, at, pod in received:
                report.matrix[(frame.get("origin"), frame.get("served_by"))] = (
                    report.matrix.get((frame.get("origin"), frame.get("served_by")), 0) + 1
                )
                report.latencies_ms.append(at - message.sent_at)
                if (frame.get("origin"), frame.get("served_by"), frame.get("message"), frame.get("sent_at")) != (
                    message.origin,
                    pod,
                    message.text,
                    message.sent_at,
                ):
                    report.problems.append(f"{who} got a wrong frame for {message.origin}'s message: {frame}")
        for message_id, message in wanted.items():
            if receipts.by_id.get(message_id):
                continue
            position = positions.get(message_id)
            told = member.told_missing(position) if isinstance(member, RoomMember) and position else None
            if told is not None:
                report.told_missing += 1
                report.problems.append(
                    f"{who} was told missing {message.origin}'s message: resumed on {told.pod} with"
                    " recovered false (history did not cover the gap)"
                )
            else:
                report.problems.append(f"{who} never got {message.origin}'s message")
        for frame in receipts.other_frames:
            report.problems.append(f"{who} got an unexpected frame: {frame}")
        if receipts.lost:
            report.problems.append(f"{who} {receipts.lost}")
        if isinstance(member, RoomMember):
            report.reconnects += member.reconnects
            report.unrecovered_resumes += sum(1 for r in member.reconnects if r.welcome.recovered is False)


# before_round(round number, the check's members): a function or coroutine function.
BeforeRound = Callable[[int, "list[RoomMember]"], "Awaitable[None] | None"]


async def run_fanout_check(
    base_url: str,
    *,
    rooms: int = 6,
    clients_per_room: int = 10,
    expect_replicas: int = 3,
    broadcast_token: str | None = None,
    timeout: float = 15.0,
    reconnect: bool = True,
    rounds: int = 1,
    round_interval: float = 0.5,
    before_round: BeforeRound | None = None,
) -> FanoutReport:
    """Run the check against a stack behind ``base_url``.

    ``timeout`` bounds each phase (connecting, each publish round, delivering).
    With ``reconnect``, a handshake answered 429/502/503/504 or a refused
    connection is retried with backoff until the phase's deadline, and a socket
    lost mid-check is reopened and resumes; without it, either is a problem.
    Round 1 publishes from a member on every replica; later rounds from a
    member on every replica the room's members are on by then.
    ``before_round(n, members)`` (a function or coroutine function) runs
    before round n publishes: where a chaos test kills or restarts a replica,
    or cuts members' sockets.
    Without ``broadcast_token`` the HTTP API is not exercised (said in the report).
    """
    if rooms < 1 or expect_replicas < 1 or rounds < 1:
        raise ValueError("rooms, rounds and expect_replicas must be at least 1")
    if clients_per_room < expect_replicas:
        raise ValueError(
            f"clients_per_room ({clients_per_room}) must be at least expect_replicas ({expect_replicas}):"
            " every room needs a member on every replica"
        )
    endpoints(base_url)
    report = FanoutReport(base_url, rooms, clients_per_room, expect_replicas, rounds=rounds)
    loop = asyncio.get_running_loop()
    run_id = secrets.token_hex(4)
    room_names = [f"fanout-{run_id}-{index}" for index in range(1, rooms + 1)]
    members: list[RoomMember] = []

    def deadline_in(seconds: float) -> float:
        # One deadline for the phase, the members' reconnects included.
        deadline = loop.time() + seconds
        for member in members:
            member.deadline = deadline
        return deadline

    try:
        deadline = loop.time() + timeout
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def gated_join(room: str) -> RoomMember:
            member = RoomMember(base_url, room, reconnect=reconnect)
            async with gate:
                try:
                    await member.start(deadline)
                except JoinError as error:
                    raise CheckError(str(error)) from None
            return member

        # Room after room: each room's handshakes reach nginx back to back, so
        # least_conn (fixed addresses) deals that room's members out over all
        # replicas. Where nginx picks a replica at random per handshake (a
        # pool it resolves by DNS: compose, Kubernetes), a room can miss one:
        # then members join one by one until it has one on every replica, at
        # most MAX_EXTRA_JOINS_PER_ROOM more.
        by_room: dict[str, list[RoomMember]] = {}
        for room in room_names:
            results = await asyncio.gather(*(gated_join(room) for _ in range(clients_per_room)), return_exceptions=True)
            for _ in range(MAX_EXTRA_JOINS_PER_ROOM):
                pods = {r.welcomes[0].pod for r in results if isinstance(r, RoomMember)}
                if len(pods) >= expect_replicas or loop.time() > deadline:
                    break
                results += await asyncio.gather(gated_join(room), return_exceptions=True)
            joined = [r for r in results if isinstance(r, RoomMember)]
            members += joined
            by_room[room] = joined
            for failure in (r for r in results if isinstance(r, BaseException)):
                if not isinstance(failure, (CheckError, OSError)):
                    raise failure
                report.problems.append(str(failure))
        for member in members:
            report.replicas.add(member.welcomes[0].pod)
            report.sockets[member.welcomes[0].pod] += 1
        if len(report.replicas) != expect_replicas:
            report.problems.append(
                f"expected {expect_replicas} replicas behind {base_url}, welcome frames named {len(report.replicas)}:"
                f" {', '.join(sorted(report.replicas, key=natural_key)) or 'none'}"
            )
        if not broadcast_token:
            report.notes.append("the HTTP API was not exercised: no broadcast token given")

        expected: dict[str, list[Message]] = defaultdict(list)
        for number in range(1, rounds + 1):
            if number > 1:
                await asyncio.sleep(round_interval)
            if before_round is not None:
                outcome = before_round(number, members)
                if inspect.isawaitable(outcome):
                    await outcome
            round_deadline = deadline_in(timeout)
            publishes = []
            for room, room_members in by_room.items():
                on_replica: dict[str, RoomMember] = {}
                for member in room_members:
                    if number == 1 or member.caught_up:
                        on_replica.setdefault(member.pod, member)
                missing = report.replicas - on_replica.keys()
                if missing and number == 1:
                    report.problems.append(
                        f"room {room} has no member on {', '.join(sorted(missing, key=natural_key))}"
                    )
                publishes += [
                    _publish(member, f"from {pod} in {room}, round {number}", round_deadline)
                    for pod, member in on_replica.items()
                ]
                if broadcast_token:
                    publishes.append(
                        publish_http(base_url, room, broadcast_token, f"from the HTTP API in {room}, round {number}")
                    )
            for result in await asyncio.gather(*publishes, return_exceptions=True):
                if isinstance(result, Message):
                    expected[result.room].append(result)
                elif isinstance(result, (CheckError, ConnectionClosed)):
                    report.problems.append(f"publishing failed: {result}")
                else:
                    raise result
        report.http_origins = {m.origin for ms in expected.values() for m in ms} - report.replicas

        await wait_for_deliveries(members, expected, deadline_in(timeout))
        tally(report, members, expected)
        for origin in sorted(report.replicas | report.http_origins, key=natural_key):
            for served_by in sorted(report.replicas, key=natural_key):
                if not report.matrix.get((origin, served_by)):
                    report.problems.append(f"no delivery from {origin} to a socket on {served_by}")
    finally:
        await asyncio.gather(*(member.stop() for member in members), return_exceptions=True)
    return report


async def _publish(member: RoomMember, text: str, deadline: float) -> Message:
    """Publish over the member's socket, confirmed by its own copy coming back."""
    try:
        sent = await member.publish(text, deadline=deadline)
    except JoinError as error:
        raise CheckError(f"{member.room}: could not publish: {error}") from None
    return Message(sent.id, member.room, text, sent.pod, sent.sent_at)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="base URL of the stack, e.g. http://127.0.0.1:8080")
    parser.add_argument("--rooms", type=int, default=6)
    parser.add_argument("--clients-per-room", type=int, default=10)
    parser.add_argument("--expect-replicas", type=int, default=3)
    parser.add_argument(
        "--token",
        default=os.environ.get("BROADCAST_TOKEN") or None,
        help="broadcast API token (default: $BROADCAST_TOKEN); without it the HTTP API is not checked",
    )
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="seconds per phase (connect, each publish round, deliver)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="publish rounds (default 1)")
    parser.add_argument("--round-interval", type=float, default=0.5, help="seconds between rounds (default 0.5)")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(
            run_fanout_check(
                args.target,
                rooms=args.rooms,
                clients_per_room=args.clients_per_room,
                expect_replicas=args.expect_replicas,
                broadcast_token=args.token,
                timeout=args.timeout,
                rounds=args.rounds,
                round_interval=args.round_interval,
            )
        )
    except ValueError as error:
        parser.error(str(error))
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
