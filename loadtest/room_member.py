"""A chat room member that keeps its identity across reconnects (asyncio, websockets).

One ``RoomMember`` is one participant of a room, not one socket: when its
socket is closed (by the server: 1001 draining, 1012 the replica lost Redis,
4000 fell behind, 1013 full, 1008 flood; or by the network: 1006) it
reconnects through the same base URL with full-jitter exponential backoff and
resumes from the last position it saw (``?epoch=E&offset=N``), so the server
replays what it missed or says it cannot (``recovered: false``).

It records everything a check needs to judge the server afterwards, and
decides nothing itself:

* ``chats``: every ``chat.message`` frame, with the replica whose socket
  delivered it, its (epoch, offset) and whether it was replayed;
* ``welcomes``: every welcome (replica, room position, recovered, replayed,
  and the position the member resumed from);
* ``closes``: every socket lost while the member wanted it, with its close code;
* ``reconnects``: each loss and the welcome that ended it (how long it took,
  how many handshakes);
* ``attempts``: every handshake that failed, and why; ``other_frames``;
  ``gave_up`` says why the member stopped trying, if it did.

    member = RoomMember("http://127.0.0.1:8080", "lobby")
    await member.start(deadline=loop.time() + 15)   # first welcome, or JoinError
    sent = await member.publish("hello")            # confirmed by its own echo
    ...
    await member.stop()

Position rule (the chat page's): the position moves with every chat frame
received; a welcome sets it only when nothing is replayed after it (with a
replay coming, the replayed frames move it, so a socket lost mid-replay
resumes from the last frame actually received).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

# Handshake answers that mean "not now" (rate limit, replica starting or gone).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# What the server's close codes mean (app/realtime/close_codes.py), 1006 for a
# socket lost without a close frame.
CLOSE_MEANINGS = {
    1000: "closed",
    1001: "replica draining",
    1006: "connection lost",
    1008: "flooding",
    1011: "server error",
    1012: "replica lost Redis",
    1013: "replica full",
    4000: "fell behind",
}
ABNORMAL_CLOSURE = 1006
# How long after a resume's replay publish() waits for its own message before
# it sends it again.
RESEND_GRACE_SECONDS = 0.5


class JoinError(Exception):
    """The member could not join (or rejoin) its room."""


def endpoints(base_url: str) -> tuple[str, str]:
    """(WebSocket base, Origin header) for an http(s) base URL."""
    parts = urlsplit(base_url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"target must be an http:// or https:// URL with a host, got {base_url!r}")
    ws_scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{ws_scheme}://{parts.netloc}{parts.path}", f"{parts.scheme}://{parts.netloc}"


def now_ms() -> float:
    return time.time() * 1000


@dataclass(frozen=True)
class Position:
    """Where a member is in a room's history: offsets compare only within an epoch."""

    epoch: str
    offset: int

    def query(self) -> str:
        return f"?epoch={quote(self.epoch)}&offset={self.offset}"


@dataclass(frozen=True)
class Welcome:
    at: float  # time.time()
    connection: int  # 0 for the member's first socket, then 1, 2, ...
    pod: str
    epoch: str | None
    offset: int | None
    recovered: bool | None  # None: a fresh join, no resume asked
    replayed: int
    resumed_from: Position | None

    @property
    def position(self) -> Position | None:
        return None if self.epoch is None or self.offset is None else Position(self.epoch, self.offset)


@dataclass(frozen=True)
class Chat:
    at: float  # time.time()
    connection: int
    pod: str  # the replica whose socket delivered the frame
    replayed: bool  # one of the welcome's replayed frames, not a live one
    frame: dict

    @property
    def id(self) -> str:
        return str(self.frame.get("id"))

    @property
    def position(self) -> Position | None:
        epoch, offset = self.frame.get("epoch"), self.frame.get("offset")
        return Position(epoch, offset) if isinstance(epoch, str) and isinstance(offset, int) else None


@dataclass(frozen=True)
class Close:
    at: float
    connection: int
    pod: str
    code: int  # 1006: no close frame (the network, or a replica that died)
    reason: str

    @property
    def meaning(self) -> str:
        return CLOSE_MEANINGS.get(self.code, "unexpected")


@dataclass(frozen=True)
class Reconnect:
    lost: Close
    welcome: Welcome
    attempts: int  # handshakes tried, the one that worked included

    @property
    def seconds(self) -> float:
        return self.welcome.at - self.lost.at


@dataclass(frozen=True)
class Attempt:
    """A handshake that did not end in a welcome."""

    at: float
    why: str


@dataclass
class Sent:
    """A message this member published."""

    id: str
    text: str
    sent_at: float  # ms, time.time() clock: receivers subtract it from their own
    pod: str  # the replica its (last) send went out through: the message's origin
    sends: int = 0  # more than 1: lost with a socket before it was published, sent again
    confirmed: bool = False  # the member saw it come back from the room


@dataclass
class _Attempt(Exception):
    why: str
    retry: bool


class RoomMember:
    """One member of ``room`` behind ``base_url``; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        room: str,
        *,
        reconnect: bool = True,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        open_timeout: float = 10.0,
    ):
        self.ws_base, self.origin = endpoints(base_url)
        self.base_url = base_url
        self.room = room
        self.reconnect = reconnect
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.open_timeout = open_timeout
        # loop.time() after which the member stops trying to (re)connect; set by start().
        self.deadline = math.inf
        self.position: Position | None = None
        self.pod: str | None = None  # the replica of the current (or last) socket
        self.chats: list[Chat] = []
        self.welcomes: list[Welcome] = []
        self.closes: list[Close] = []
        self.reconnects: list[Reconnect] = []
        self.attempts: list[Attempt] = []
        self.other_frames: list[dict] = []
        self.sent: list[Sent] = []
        self.gave_up: str | None = None
        self._ids: dict[str, int] = {}  # message id -> times received
        self._ws: ClientConnection | None = None
        self._connection = -1
        self._replay_left = 0
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    # --- what a check reads ---------------------------------------------------

    @property
    def connected(self) -> bool:
        """A socket is open and welcomed."""
        return self._ws is not None

    @property
    def caught_up(self) -> bool:
        """Connected, and the welcome's replay has all arrived."""
        return self._ws is not None and self._replay_left == 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def received(self, message_id: str) -> int:
        return self._ids.get(message_id, 0)

    def has_all(self, ids) -> bool:
        return all(self._ids.get(message_id) for message_id in ids)

    def told_missing(self, position: Position) -> Welcome | None:
        """The ``recovered: false`` welcome that told this member it may have
        missed the message at ``position``, or None."""
        for welcome in self.welcomes:
            start = welcome.resumed_from
            if welcome.recovered is not False or start is None or welcome.position is None:
                continue
            first_replayed = welcome.position.offset - welcome.replayed + 1
            if position.epoch == start.epoch and position.offset > start.offset:
                if start.epoch != welcome.epoch or position.offset < first_replayed:
                    return welcome
            if start.epoch != welcome.epoch and position.epoch == welcome.epoch and position.offset < first_replayed:
                return welcome
        return None

    # --- lifecycle ------------------------------------------------------------

    async def start(self, deadline: float | None = None) -> Welcome:
        """Run the member and return its first welcome; JoinError if there is none
        (handshake refused for good, or still failing at ``deadline``)."""
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.open_timeout if deadline is None else deadline
        self._task = asyncio.ensure_future(self.run())
        await self._wait(lambda: self.welcomes or not self.running, math.inf)
        if not self.welcomes:
            await self._task
            raise JoinError(f"room {self.room}: {self.gave_up}")
        return self.welcomes[0]

    async def run(self) -> None:
        """Connect, read, and on every loss reconnect and resume, until stop()
        or, when it cannot get back in, the deadline."""
        loop = asyncio.get_running_loop()
        failures = 0  # handshakes in a row that failed, since the last welcome
        lost: Close | None = None
        tried = 0
        try:
            while not self._stopping:
                if failures or lost is not None:
                    # Full jitter: many members losing one replica do not come back in lockstep.
                    delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**failures))
                    if loop.time() + delay >= self.deadline:
                        state = "still not back" if self.welcomes else "still failing"
                        self.gave_up = f"{state} at the deadline, last: {self._last_why(lost)}"
                        return
                    await asyncio.sleep(delay)
                    if self._stopping:
                        return
                tried += 1
                try:
                    ws, welcome = await self._open(loop)
                except _Attempt as attempt:
                    self.attempts.append(Attempt(time.time(), attempt.why))
                    if not attempt.retry or not self.reconnect:
                        self.gave_up = attempt.why
                        return
                    failures += 1
                    continue
                if lost is not None:
                    self.reconnects.append(Reconnect(lost, welcome, tried))
                failures, tried, lost = 0, 0, None
                close = await self._read(ws)
                if self._stopping:
                    return
                self.closes.append(close)
                lost = close
                if not self.reconnect:
                    self.gave_up = f"disconnected ({close.code} {close.meaning})"
                    return
        finally:
            self._ws = None
            self._notify()

    async def stop(self) -> None:
        """Leave the room: close the socket and end the run loop."""
        self._stopping = True
        ws = self._ws
        if ws is not None:
            await ws.close()  # the read ends, and with it the run loop
        elif self._task is not None:
            self._task.cancel()  # between sockets: in a backoff or a handshake
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._notify()

    async def drop(self) -> None:
        """Cut the current socket without a close handshake, as a network
        would (tests): the member reconnects as from any other loss."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    # --- publishing -----------------------------------------------------------

    async def publish(self, text: str, *, deadline: float | None = None, confirm: bool = True) -> Sent:
        """Publish ``text`` with an ``id`` and ``sent_at``; with ``confirm``,
        return once the member's own copy came back from the room.

        A socket lost before the copy came back may or may not have published
        it: after the resume's replay, a message not in it was not published and
        is sent again on the new socket (same id and sent_at). After a resume
        that was not recovered nobody can tell: it is not sent again (a second
        copy would be a duplicate), and ``confirmed`` stays False. Raises
        JoinError when the member is not back by ``deadline``.
        """
        loop = asyncio.get_running_loop()
        deadline = self.deadline if deadline is None else deadline
        sent = Sent(uuid.uuid4().hex, text, now_ms(), self.pod or "unknown")
        self.sent.append(sent)
        payload = json.dumps({"message": text, "id": sent.id, "sent_at": sent.sent_at})
        while True:
            if not await self._wait(lambda: self.caught_up or not self.running, deadline) or not self.caught_up:
                raise JoinError(f"room {self.room}: not connected to publish ({self.gave_up or 'deadline passed'})")
            if sent.sends:
                if self.welcomes[-1].recovered is False:
                    return sent
                # A publish the old replica was still making when the socket
                # closed arrives live, just after the replay: a moment first.
                await self._wait(lambda: self._ids.get(sent.id), min(deadline, loop.time() + RESEND_GRACE_SECONDS))
            if self._ids.get(sent.id):
                sent.confirmed = True  # published before the loss: it was replayed
                return sent
            if not self.caught_up:
                continue
            ws, connection, pod = self._ws, self._connection, self.pod
            try:
                await ws.send(payload)
            except ConnectionClosed:
                await self._wait(lambda c=connection: self._connection != c or not self.running, deadline)
                continue
            sent.sends += 1
            sent.pod = pod
            if not confirm:
                return sent
            in_time = await self._wait(
                lambda c=connection: self._ids.get(sent.id) or self._connection != c or not self.connected, deadline
            )
            if self._ids.get(sent.id):
                sent.confirmed = True
                return sent
            if not in_time:
                return sent  # still on its socket at the deadline: sending again could make a duplicate
            # Lost with its socket before it came back: decided after the resume's replay.

    # --- internals ------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, predicate, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), None if remaining == math.inf else remaining)
            except TimeoutError:
                return bool(predicate())
        return True

    def _last_why(self, lost: Close | None) -> str:
        if self.attempts and (lost is None or self.attempts[-1].at > lost.at):
            return self.attempts[-1].why
        return f"disconnected ({lost.code} {lost.meaning})" if lost else "no attempt"

    async def _open(self, loop) -> tuple[ClientConnection, Welcome]:
        """One handshake and its welcome; _Attempt says why not, and whether to retry."""
        remaining = self.deadline - loop.time()
        if remaining <= 0:
            raise _Attempt("no welcome before the deadline", retry=False)
        resume = self.position
        url = f"{self.ws_base}/ws/chat/{self.room}/" + (resume.query() if resume else "")
        try:
            ws = await connect(url, origin=self.origin, proxy=None, open_timeout=min(self.open_timeout, remaining))
        except InvalidStatus as error:
            status = error.response.status_code
            raise _Attempt(f"handshake refused with HTTP {status}", retry=status in RETRY_STATUSES) from None
        except TimeoutError:
            raise _Attempt("no handshake before the deadline", retry=True) from None
        except (OSError, InvalidHandshake, ConnectionClosed) as error:
            # Refused, reset, or cut mid-handshake (a replica that just died).
            raise _Attempt(f"cannot connect: {error!r}", retry=True) from None
        try:
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, self.deadline - loop.time())))
                if not isinstance(frame, dict):
                    raise ValueError(frame)
                if frame.get("type") == "welcome":
                    break
                # An error frame may come first (a resume position the server refused).
                self.other_frames.append(frame)
        except TimeoutError:
            await ws.close()
            raise _Attempt("no welcome frame before the deadline", retry=True) from None
        except ConnectionClosed as error:
            # Accepted only to be told to go (1013 full, 1012 history unreadable).
            code = error.rcvd.code if error.rcvd else ABNORMAL_CLOSURE
            raise _Attempt(f"closed with {code} before the welcome", retry=True) from None
        except ValueError:
            await ws.close()
            raise _Attempt(
                "expected a welcome frame first, got something that is not a JSON object", retry=False
            ) from None
        except BaseException:
            ws.transport.abort()  # cancelled by stop() mid-handshake
            raise
        if not frame.get("pod"):
            await ws.close()
            raise _Attempt(f"expected a welcome frame naming its pod, got {frame}", retry=False)
        self._connection += 1
        welcome = Welcome(
            at=time.time(),
            connection=self._connection,
            pod=str(frame["pod"]),
            epoch=frame.get("epoch"),
            offset=frame.get("offset"),
            recovered=frame.get("recovered"),
            replayed=int(frame.get("replayed") or 0),
            resumed_from=resume,
        )
        self.welcomes.append(welcome)
        self.pod = welcome.pod
        self._replay_left = welcome.replayed
        if welcome.replayed == 0 and welcome.position is not None:
            self.position = welcome.position
        self._ws = ws
        self._notify()
        return ws, welcome

    async def _read(self, ws: ClientConnection) -> Close:
        connection, pod = self._connection, self.pod
        try:
            async for raw in ws:
                at = time.time()
                try:
                    frame = json.loads(raw)
                except ValueError:
                    frame = {"type": "not json", "raw": str(raw)[:200]}
                if isinstance(frame, dict) and frame.get("type") == "chat.message":
                    replayed = self._replay_left > 0
                    if replayed:
                        self._replay_left -= 1
                    chat = Chat(at, connection, pod, replayed, frame)
                    self.chats.append(chat)
                    self._ids[chat.id] = self._ids.get(chat.id, 0) + 1
                    if chat.position is not None:
                        self.position = chat.position
                else:
                    self.other_frames.append(frame if isinstance(frame, dict) else {"frame": frame})
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._notify()
        return Close(time.time(), connection, pod, ws.close_code or ABNORMAL_CLOSURE, ws.close_reason or "")
