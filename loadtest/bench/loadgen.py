"""The benchmark's load generator: one asyncio process, thousands of chat sockets.

Every socket is a room member. Messages carry an integer ``id`` and a
``sent_at`` read from this process's monotonic clock, so a delivery's latency
is one subtraction with no clock skew. A ``Ledger`` knows, for every message
of one measurement, how many members were owed it; whatever did not arrive
is counted as lost, never dropped from the figures. The generator measures its
own CPU (process time over wall time, 1.0 = one full core): a saturated
generator delays its own reads, so such a measurement is flagged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from loadtest.bench.wsclient import HandshakeRefused, WsClient, connect
from loadtest.fanout_check import percentile

# nginx admits 100 new WebSockets a second per client address (burst 500):
# handshakes come from all of 127.0.0.2-254, all still loopback.
SOURCE_ADDRESSES = [f"127.0.0.{host}" for host in range(2, 255)]
# Handshake answers that mean "not now": retried with backoff.
RETRY_STATUSES = {429, 502, 503, 504}
CONNECT_ATTEMPTS = 5
# The longest wait between two attempts of one socket.
MAX_BACKOFF_SECONDS = 2.0
# A generator busier than this share of its one core reads its sockets late.
SATURATED_CPU = 0.9
MESSAGE_TEXT = "benchmark message " + "x" * 46  # 64 characters: a chat line


class CpuClock:
    """This process's CPU time over wall time since the last ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cpu = time.process_time()
        self.wall = time.monotonic()

    def share(self) -> float:
        wall = time.monotonic() - self.wall
        return (time.process_time() - self.cpu) / wall if wall > 0 else 0.0


@dataclass
class Ledger:
    """Who was owed which message of one measurement, and what arrived when."""

    expected: dict[int, int] = field(default_factory=dict)
    sent_at: dict[int, float] = field(default_factory=dict)
    got: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    pairs: Counter = field(default_factory=Counter)
    owed: int = 0
    received: int = 0
    duplicates: int = 0
    last_arrival: float = 0.0

    def owe(self, message_id: int, members: int, sent_at: float) -> None:
        self.expected[message_id] = members
        self.sent_at[message_id] = sent_at
        self.owed += members

    def arrive(self, frame: dict, received_at: float) -> None:
        message_id = frame.get("id")
        expected = self.expected.get(message_id)
        if expected is None:
            return  # a message of an earlier measurement, arriving late
        count = self.got[message_id] + 1
        self.got[message_id] = count
        if count > expected:
            self.duplicates += 1
            return
        self.received += 1
        self.latencies.append(received_at - frame["sent_at"])
        self.pairs[(frame.get("origin"), frame.get("served_by"))] += 1
        self.last_arrival = received_at

    @property
    def outstanding(self) -> int:
        return self.owed - self.received

    def latency_ms(self, pct: float) -> float | None:
        return round(percentile(self.latencies, pct) * 1000, 2) if self.latencies else None


class Member:
    """One chat socket in one room; its replica comes from the welcome frame."""

    __slots__ = ("fleet", "room", "client", "pod", "welcomed")

    def __init__(self, fleet: Fleet, room: str):
        self.fleet = fleet
        self.room = room
        self.client: WsClient | None = None
        self.pod: str | None = None
        self.welcomed = asyncio.get_running_loop().create_future()

    @staticmethod
    def path(room: str) -> str:
        return f"/ws/chat/{room}/"

    def on_open(self, client: WsClient) -> None:
        """The socket is open (before its first frame is read); the welcome comes next."""

    def on_text(self, payload: bytes, received_at: float) -> None:
        self.on_frame(json.loads(payload), received_at)

    def on_frame(self, frame: dict, received_at: float) -> None:
        kind = frame.get("type")
        if kind == "chat.message":
            self.fleet.ledger.arrive(frame, received_at)
        elif kind == "welcome" and not self.welcomed.done():
            self.pod = frame.get("pod")
            self.welcomed.set_result(None)
        else:
            self.fleet.errors[str(frame.get("code", kind))] += 1

    def on_close(self, client: WsClient) -> None:
        if client is self.client and not self.fleet.closing:
            self.fleet.lost_sockets[str(client.close_code or "no close frame")] += 1

    def publish(self, message_id: int, owed: int | None = None) -> float | None:
        """Send a message owed to ``owed`` members (default: the room's in this
        fleet); returns when it was sent, None if the socket was closed."""
        if not self.client.open:
            self.fleet.errors["publish on a closed socket"] += 1
            return None
        sent_at = time.monotonic()
        self.fleet.ledger.owe(message_id, len(self.fleet.rooms[self.room]) if owed is None else owed, sent_at)
        self.client.send_text(self.encode(f'{{"message":"{MESSAGE_TEXT}","id":{message_id},"sent_at":{sent_at!r}}}'))
        return sent_at

    @staticmethod
    def encode(message: str) -> str:
        return message


class SocketIOMember(Member):
    """The same member speaking Socket.IO (Engine.IO 4, WebSocket transport only) to
    ``socketio_server``: the thin adapter that module's docstring explains. Events
    carry the blueprint's frames; ``served_by``, which python-socketio's manager
    cannot set per server, is the replica that welcomed this socket."""

    __slots__ = ("wire",)

    def __init__(self, fleet: Fleet, room: str):
        super().__init__(fleet, room)
        self.wire: WsClient | None = None

    @staticmethod
    def path(room: str) -> str:
        return f"/ws/chat/{room}/?EIO=4&transport=websocket"

    def on_open(self, client: WsClient) -> None:
        self.wire = client

    def on_text(self, payload: bytes, received_at: float) -> None:
        if payload.startswith(b"42"):  # a Socket.IO EVENT on the default namespace
            name, data = json.loads(payload[2:])
            if name == "chat.message" and data.get("served_by") is None:
                data["served_by"] = self.pod
            elif name == "error":
                self.fleet.errors[str(data.get("code", name))] += 1
                return
            self.on_frame(data, received_at)
        elif payload == b"2":  # Engine.IO PING: answered, or the server drops the socket
            if self.wire.open and not self.wire.closing:
                self.wire.send_text("3")
        elif payload.startswith(b"0"):  # Engine.IO OPEN: now join the default namespace
            self.wire.send_text("40")
        elif payload.startswith(b"40"):  # Socket.IO CONNECT accepted; the welcome event follows
            pass
        else:  # 41 DISCONNECT, 44 CONNECT_ERROR, anything else
            self.fleet.errors[f"socket.io {payload[:40]!r}"] += 1

    @staticmethod
    def encode(message: str) -> str:
        return f'42["message",{message}]'


MEMBER_KINDS = {"json": Member, "socketio": SocketIOMember}


class ConnectError(Exception):
    """A socket could not be opened (after retries); the message says why."""


class Fleet:
    """The sockets of one benchmark run, by room, all fed into the current ledger."""

    def __init__(
        self, base_url: str, wire: str = "json", name: str = "", concurrency: int = 100, timeout: float = 30.0
    ):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"the benchmark needs a plain http://host:port target, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port
        self.origin = f"http://{parts.netloc}"
        #: how members speak: the blueprint's JSON frames, or Socket.IO
        self.member_kind = MEMBER_KINDS[wire]
        #: the configuration measured, for messages
        self.name = name
        self.concurrency = concurrency
        self.timeout = timeout
        self.rooms: dict[str, list[Member]] = {}
        self.ledger = Ledger()
        self.errors: Counter = Counter()
        #: sockets the servers closed while they were wanted, by close code
        self.lost_sockets: Counter = Counter()
        self.closing = False
        self._sources = itertools.cycle(SOURCE_ADDRESSES)
        self._ids = itertools.count()

    @property
    def members(self) -> list[Member]:
        return [member for members in self.rooms.values() for member in members]

    def sockets_by_pod(self, members: list[Member] | None = None) -> Counter:
        return Counter(member.pod for member in (self.members if members is None else members))

    async def open(
        self, room: str, count: int, within: float | None = None, refused: Counter | None = None
    ) -> list[Member]:
        """``count`` more members of ``room``, each welcomed before this returns.
        With ``within`` (seconds), a refused socket is retried until then rather
        than ``CONNECT_ATTEMPTS`` times; ``refused`` counts the refusals."""
        gate = asyncio.Semaphore(self.concurrency)
        members = [self.member_kind(self, room) for _ in range(count)]
        deadline = None if within is None else time.monotonic() + within

        async def one(member: Member) -> None:
            async with gate:
                if deadline is None:
                    await self.connect(member, refused=refused)
                else:
                    await self.connect(member, attempts=None, deadline=deadline, refused=refused)

        results = await asyncio.gather(*(one(member) for member in members), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        opened = [member for member in members if member.client is not None]
        self.rooms.setdefault(room, []).extend(opened)
        if failures:
            raise ConnectError(
                f"{self.name + ': ' if self.name else ''}{len(failures)} of {count} sockets to room {room} "
                f"failed to open; first: {failures[0]!r}"
            )
        return members

    async def connect(
        self,
        member: Member,
        attempts: int | None = CONNECT_ATTEMPTS,
        deadline: float | None = None,
        refused: Counter | None = None,
    ) -> None:
        """Open ``member``'s socket and wait for its welcome, retrying a refusal
        that means "not now" (and a timeout or a refused connection) with
        jittered backoff: ``attempts`` times, or until the monotonic
        ``deadline`` when ``attempts`` is None. ``refused`` counts each refusal
        by its HTTP status (or ``timeout``, ``connection``)."""
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            last = attempt == attempts or (deadline is not None and time.monotonic() + delay > deadline)
            try:
                client = await connect(
                    self.host,
                    self.port,
                    member.path(member.room),
                    origin=self.origin,
                    on_open=member.on_open,
                    on_text=member.on_text,
                    on_close=member.on_close,
                    source=next(self._sources),
                    timeout=self.timeout,
                )
                try:
                    await asyncio.wait_for(asyncio.shield(member.welcomed), self.timeout)
                except TimeoutError:
                    client.abort()
                    raise
                member.client = client
                return
            except HandshakeRefused as error:
                if refused is not None:
                    refused[str(error.status)] += 1
                if error.status not in RETRY_STATUSES or last:
                    raise
            except (TimeoutError, OSError) as error:
                if refused is not None:
                    refused["timeout" if isinstance(error, TimeoutError) else "connection"] += 1
                if last:
                    raise
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    async def repair(self) -> None:
        """Replace every member whose socket the server closed, so a run starts with full rooms."""
        for room, members in self.rooms.items():
            alive = [member for member in members if member.client.open]
            if len(alive) < len(members):
                self.rooms[room] = alive
                await self.open(room, len(members) - len(alive))

    def measure(self) -> Ledger:
        """Start a new measurement: deliveries of earlier messages no longer count."""
        self.ledger = Ledger()
        return self.ledger

    def next_id(self) -> int:
        return next(self._ids)

    async def settle(self, deadline: float) -> None:
        """Until every owed delivery arrived, or the monotonic ``deadline``."""
        while self.ledger.outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def quiet(self, seconds: float, limit: float) -> None:
        """Until nothing arrived for ``seconds`` (a backlog has drained), at most ``limit`` seconds."""
        ledger, deadline = self.ledger, time.monotonic() + limit
        seen = (ledger.received, ledger.duplicates)
        while time.monotonic() < deadline:
            await asyncio.sleep(seconds)
            now = (ledger.received, ledger.duplicates)
            if now == seen:
                return
            seen = now

    async def close(self, room: str | None = None) -> None:
        """Close the sockets of ``room`` (all rooms when None) and wait for the servers' close."""
        self.closing = True
        rooms = [room] if room else list(self.rooms)
        clients = [member.client for name in rooms for member in self.rooms.pop(name, [])]
        for client in clients:
            client.close()
        if clients:
            await asyncio.wait([client.closed for client in clients], timeout=self.timeout)
        for client in clients:
            if not client.closed.done():
                client.abort()
        self.closing = False


def interleaved(rooms: dict[str, list[Member]]) -> list[Member]:
    """Members in the order room 0's first, room 1's first, ..., room 0's second, ...:
    cycling through it spreads consecutive messages over rooms and sockets."""
    columns = itertools.zip_longest(*rooms.values())
    return [member for column in columns for member in column if member is not None]


async def offer(fleet: Fleet, publishers: list[Member], rate: float, duration: float, tick: float = 0.005) -> int:
    """Publish ``rate`` messages a second for ``duration`` seconds, round-robin over
    ``publishers``; returns how many were sent. Falls behind only if the
    generator does (its CPU share shows it)."""
    cycle = itertools.cycle(publishers)
    started = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= duration:
            return sent
        due = min(int(rate * elapsed) + 1, int(rate * duration)) - sent
        for _ in range(due):
            next(cycle).publish(fleet.next_id())
        sent += max(due, 0)
        await asyncio.sleep(tick)
