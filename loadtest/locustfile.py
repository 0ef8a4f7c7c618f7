"""Locust scenarios for the blueprint: cross-replica fan-out under load, with a verdict.

Pick scenarios by user class (or by the tag in brackets):

    FanoutUser           [fanout] members of shared rooms publish over their sockets;
                                  every receipt is a request named origin->served_by
    HttpBroadcastUser    [http]   publishes through POST /api/rooms/<room>/messages
                                  (needs BROADCAST_TOKEN) to members on every replica
    EchoUser             [echo]   /ws/echo/ round trips
    ApiUser              [api]    /ws/api/ JSON request/response round trips
    ConnectionStormUser  [storm]  connect, wait for the welcome, disconnect: churn

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \
        -u 60 -r 10 -t 30s FanoutUser

The exit code is the verdict (0 PASS, 1 FAIL, 3 INVALID), decided on the
master from the aggregated stats, so distributed runs judge the whole load.
loadtest/README.md explains the options, the method and how to read a report.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from urllib.parse import quote

# Import the sibling modules as the ``loadtest`` package whatever the working
# directory: locust only puts the locustfile's own directory on sys.path.
# abspath, not resolve(): a Kubernetes ConfigMap mounts each file as a symlink
# into a hidden subdirectory, whose parent is not the package's parent.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent
import websocket
from gevent.event import AsyncResult, Event
from gevent.queue import Empty, Queue
from locust import HttpUser, User, constant_throughput, events, tag, task
from locust.runners import CPU_WARNING_THRESHOLD, MasterRunner, WorkerRunner

from loadtest import summary
from loadtest.cpu_watch import CpuWatch
from loadtest.delivery import DeliveryTracker
from loadtest.thresholds import (
    DUPLICATE,
    FANOUT,
    HTTP_FANOUT,
    NOT_RECOVERED,
    RECONNECT,
    RECOVERED,
    RESUME,
    Row,
    Thresholds,
    judge,
    pair_name,
    reconnect_name,
)
from loadtest.ws_connection import ABNORMAL_CLOSURE, BadFrame, ConnectionLost, WsConnection

logger = logging.getLogger("loadtest")

# A handshake or a reply slower than this is a failure, not a latency sample.
REPLY_TIMEOUT = 10.0
# How often late deliveries are looked for; small next to any sane deadline.
SWEEP_SECONDS = 0.2
CHAT_PATH = "/ws/chat/{room}/"
CHAT_NAME = "/ws/chat/[room]/"
# A member whose socket was lost comes back after a random delay up to
# min(cap, base * 2**failures): "full jitter", as the chat page does.
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 5.0
# How long after a resume's replay a member waits for its own unconfirmed
# messages before it sends them again (see RoomMember._send_unconfirmed).
RESEND_GRACE_SECONDS = 0.5


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _pair_count(text: str) -> str:
    if text != "all" and not (text.isdigit()):
        raise argparse.ArgumentTypeError(f'must be "all" or a whole number, got {text}')
    return text


@events.init_command_line_parser.add_listener
def add_options(parser, **_kwargs):
    # Every option can also be set by its LOCUST_* variable, which is how the
    # compose profile and the Kubernetes manifests pass them.
    parser.add_argument(
        "--publish-rate",
        type=_positive(float),
        default=1.0,
        env_var="LOCUST_PUBLISH_RATE",
        help="messages per second each FanoutUser / HttpBroadcastUser publishes (default 1)",
    )
    parser.add_argument(
        "--room-size",
        type=_positive(int),
        default=6,
        env_var="LOCUST_ROOM_SIZE",
        help="members per room; each message is delivered room-size times (default 6)",
    )
    parser.add_argument(
        "--delivery-deadline",
        type=_positive(float),
        default=5.0,
        env_var="LOCUST_DELIVERY_DEADLINE",
        help="seconds a member may wait for a message before it counts as lost (default 5)",
    )
    parser.add_argument(
        "--request-rate",
        type=_positive(float),
        default=2.0,
        env_var="LOCUST_REQUEST_RATE",
        help="round trips per second each EchoUser / ApiUser makes (default 2)",
    )
    parser.add_argument(
        "--connect-rate",
        type=_positive(float),
        default=1.0,
        env_var="LOCUST_CONNECT_RATE",
        help="connections per second each ConnectionStormUser opens and closes (default 1)",
    )
    parser.add_argument(
        "--broadcast-token",
        default="",
        env_var="BROADCAST_TOKEN",
        include_in_web_ui=False,
        help="Bearer token of the HTTP broadcast API (HttpBroadcastUser); default $BROADCAST_TOKEN",
    )
    parser.add_argument(
        "--min-delivery-ratio",
        type=_ratio,
        default=0.999,
        env_var="LOCUST_MIN_DELIVERY_RATIO",
        help="fail below this share of fan-out deliveries made in time (default 0.999)",
    )
    parser.add_argument(
        "--max-p99-ms",
        type=_positive(float),
        default=1000.0,
        env_var="LOCUST_MAX_P99_MS",
        help="fail above this p99 fan-out latency in ms (default 1000)",
    )
    parser.add_argument(
        "--min-replicas",
        type=int,
        default=2,
        env_var="LOCUST_MIN_REPLICAS",
        help="fail when fewer distinct replicas delivered messages (default 2)",
    )
    parser.add_argument(
        "--min-cross-pairs",
        type=_pair_count,
        default="all",
        env_var="LOCUST_MIN_CROSS_PAIRS",
        help="fail below this many origin->served_by pairs with origin != served_by; "
        '"all" (default) wants every ordered pair of the replicas seen',
    )
    parser.add_argument(
        "--summary-file",
        default="",
        env_var="LOCUST_SUMMARY_FILE",
        help="also write the verdict summary here (text) and next to it as .json",
    )


def _record(environment, request_type: str, name: str, response_time: float, exception=None, length: int = 0):
    environment.events.request.fire(
        request_type=request_type,
        name=name,
        response_time=response_time,
        response_length=length,
        exception=exception,
        context={},
    )


class _Process:
    """What one locust process keeps between events: the delivery book and its CPU."""

    tracker: DeliveryTracker | None = None
    sweeper: gevent.Greenlet | None = None
    cpu = CpuWatch()
    worker_reports: dict[str, dict] = {}
    verdict = None


def _tracker() -> DeliveryTracker:
    if _Process.tracker is None:
        raise RuntimeError("no delivery tracker: users run only after test_start")
    return _Process.tracker


# --- room members and users ---


class DuplicateDelivery(Exception):
    """A member received an offset of an epoch it already had."""


class RoomMember:
    """One member of a chat room; its receipts go to the process's delivery tracker.

    A member, not a socket: when the server closes its socket (1001 draining,
    1012 lost Redis, 4000 fell behind, 1013 full, 1008 flood) or the network
    drops it, a reconnect greenlet reopens it through the same host with
    full-jitter backoff and resumes from the member's last position
    (``?epoch=&offset=``): the server replays what it missed, so the member
    stays in the room and what it is owed keeps counting. Every reconnect is a
    ``reconnect after <code>`` row (its time: how long the member was away) and
    every resume a ``resume recovered`` / ``not recovered`` row; an offset
    received twice within an epoch is a ``duplicate`` failure.
    """

    def __init__(self, environment, room: str):
        self.environment = environment
        self.room = room
        self.replica: str | None = None
        self.conn: WsConnection | None = None
        self.alive = False  # in the room: connected, or coming back
        self.connected = False  # a socket is open and welcomed
        # (epoch, offset) of the last message received, or of the welcome
        # when nothing was replayed after it: where a reconnect resumes.
        self.position: tuple[str, int] | None = None
        self.last_welcome: dict = {}
        self._generation = 0
        self._replay_left = 0
        self._caught_up = Event()
        # This member's own messages that have not come back from the room
        # yet, with the socket (generation) each went out on.
        self._unconfirmed: dict[str, tuple[int, dict]] = {}
        self._reconnector: gevent.Greenlet | None = None
        self._lost: tuple[float, int] = (0.0, ABNORMAL_CLOSURE)  # when and why the last socket was lost
        self._stopped = False

    def join(self) -> bool:
        started = time.perf_counter()
        error = self._connect()
        if error is not None:
            _record(self.environment, "connect", CHAT_NAME, (time.perf_counter() - started) * 1000, exception=error)
            self.close()
            return False
        _record(self.environment, "connect", CHAT_NAME, (time.perf_counter() - started) * 1000)
        self.alive = True
        _tracker().join(self.room, self, self.replica)
        return True

    def _connect(self) -> Exception | None:
        """Open a socket (resuming from the position, if any) and wait for its welcome."""
        self._generation += 1
        generation, welcome = self._generation, AsyncResult()
        self.connected = False
        self._caught_up.clear()
        path = CHAT_PATH.format(room=self.room)
        if self.position is not None:
            path += f"?epoch={quote(self.position[0])}&offset={self.position[1]}"
        conn = None
        try:
            conn = WsConnection(
                self.environment.host,
                path,
                lambda frame: self._on_frame(generation, welcome, frame),
                lambda error: self._on_error(generation, welcome, error),
                REPLY_TIMEOUT,
            )
            welcome.get(timeout=REPLY_TIMEOUT)
        except (websocket.WebSocketException, OSError, ConnectionLost, BadFrame, gevent.Timeout) as error:
            if conn is not None:
                conn.close()
            return error
        except gevent.GreenletExit:
            if conn is not None:  # stopped mid-handshake
                conn.close()
            raise
        if self._stopped:
            conn.close()
            return ConnectionLost("the member was stopped")
        old, self.conn = self.conn, conn
        if old is not None:
            old.close()
        self.connected = True
        return None

    def _on_frame(self, generation: int, welcome: AsyncResult, frame: dict) -> None:
        if generation != self._generation:
            return  # a socket this member has given up on
        kind = frame.get("type")
        if kind == "chat.message":
            self._on_chat(frame)
        elif kind == "welcome":
            self.replica = str(frame.get("pod", "unknown"))
            self.last_welcome = frame
            self._replay_left = int(frame.get("replayed") or 0)
            # With a replay coming, the replayed messages move the position:
            # a socket lost mid-replay resumes from the last one received.
            if self._replay_left == 0:
                if "epoch" in frame:
                    self.position = (frame["epoch"], frame["offset"])
                self._caught_up.set()
            welcome.set(frame)
        elif kind == "error":
            _record(
                self.environment,
                "ws",
                f"{CHAT_NAME} error frame",
                0,
                exception=RuntimeError(f"{frame.get('code')}: {frame.get('detail')}"),
            )

    def _on_chat(self, frame: dict) -> None:
        epoch, offset = frame.get("epoch"), frame.get("offset")
        if isinstance(epoch, str) and isinstance(offset, int):
            # The server hands each member a room's offsets in order, once: an
            # offset at or below the last one of the same epoch came before.
            if self.position is not None and self.position[0] == epoch and offset <= self.position[1]:
                _record(
                    self.environment,
                    DUPLICATE,
                    pair_name(str(frame.get("origin")), str(frame.get("served_by"))),
                    0,
                    exception=DuplicateDelivery(f"offset {offset} of epoch {epoch} again, after {self.position[1]}"),
                )
            else:
                self.position = (epoch, offset)
        self._unconfirmed.pop(frame.get("id"), None)
        if self._replay_left > 0:
            self._replay_left -= 1
            if self._replay_left == 0:
                self._caught_up.set()
        _tracker().received(self, frame)

    def _on_error(self, generation: int, welcome: AsyncResult, error: Exception) -> None:
        if generation != self._generation:
            return
        if not welcome.ready():
            welcome.set_exception(error)  # _connect() reports it
            return
        if isinstance(error, ConnectionLost):
            self.lost(error)
            return
        _record(self.environment, "ws", f"{CHAT_NAME} receive", 0, exception=error)

    def publish(self, frame: dict) -> None:
        """Send one of this member's own messages; it is confirmed when it comes
        back from the room. Raises ConnectionLost (the message was not sent)."""
        self._unconfirmed[frame["id"]] = (self._generation, frame)
        try:
            self.conn.send(frame)
        except ConnectionLost:
            self._unconfirmed.pop(frame["id"], None)
            raise

    def send(self, frame: dict) -> None:
        self.conn.send(frame)

    def lost(self, error: ConnectionLost | None = None) -> None:
        """The socket died under us: come back and resume; what the member is
        owed keeps counting, and arrives with the replay."""
        self.connected = False
        self._caught_up.set()  # wakes a reconnector waiting for a replay that will not finish
        if self._stopped or not self.alive:
            return
        self._lost = (time.perf_counter(), error.code if error is not None else ABNORMAL_CLOSURE)
        if self._reconnector is None or self._reconnector.dead:
            self._reconnector = gevent.spawn(self._reconnect)

    def _reconnect(self) -> None:
        # One greenlet per member: a socket lost again while it still works
        # (resending after a replay) is taken up by its next turn of the loop.
        while not self._stopped and not self.connected:
            lost_at, code = self._lost
            failures = 0
            resumed_from = self.position
            while True:
                # Full jitter: the members of a drained replica do not come back in lockstep.
                gevent.sleep(random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**failures)))
                if self._stopped:
                    return
                error = self._connect()
                if error is None:
                    break
                logger.debug("%s: reconnect failed: %r", self.room, error)
                failures += 1
            _record(self.environment, RECONNECT, reconnect_name(code), (time.perf_counter() - lost_at) * 1000)
            # Still owed what it was; messages from now on are owed to it on its new replica.
            _tracker().join(self.room, self, self.replica)
            recovered = self.last_welcome.get("recovered")
            if resumed_from is not None and recovered is not None:
                _record(
                    self.environment,
                    RESUME,
                    RECOVERED if recovered else NOT_RECOVERED,
                    0,
                    length=int(self.last_welcome.get("replayed") or 0),
                )
            self._send_unconfirmed(recovered)

    def _send_unconfirmed(self, recovered) -> None:
        """Own messages sent on a socket that was lost before they came back:
        the replay has those that were published; the others are sent again."""
        # _caught_up is also set when the socket is lost mid-replay.
        if not self._unconfirmed or not self._caught_up.wait(timeout=REPLY_TIMEOUT) or not self.connected:
            return
        if recovered is False:
            # Nobody can tell which were published: sending again could duplicate.
            self._unconfirmed.clear()
            return
        # A publish the old replica was still making when the socket closed
        # arrives live, just after the replay: give it a moment first.
        gevent.sleep(RESEND_GRACE_SECONDS)
        if not self.connected:
            return
        deadline = _tracker().clock() - _tracker().deadline
        generation = self._generation
        for message_id, (sent_on, frame) in list(self._unconfirmed.items()):
            if sent_on == generation:
                continue  # sent on this socket: on its way
            if frame.get("sent_at", 0) < deadline:
                del self._unconfirmed[message_id]  # judged already
                continue
            try:
                self.conn.send(frame)
            except ConnectionLost:
                return  # the next reconnect tries again
            self._unconfirmed[message_id] = (generation, frame)

    def close(self) -> None:
        """Stop on purpose: what a live member was still owed is dropped, unjudged."""
        self._stopped = True
        if self.alive and _Process.tracker is not None:
            _Process.tracker.leave(self.room, self)
        self.alive = False
        self.connected = False
        if self._reconnector is not None and self._reconnector is not gevent.getcurrent():
            self._reconnector.kill(block=False)
        if self.conn is not None:
            self.conn.close()


class FanoutUser(User):
    """One member of a shared room that also publishes to it."""

    delivers = True

    def wait_time(self):
        return constant_throughput(self.environment.parsed_options.publish_rate)(self)

    def on_start(self):
        tracker = _tracker()
        number = tracker.next_number("fanout-member")
        self.room = tracker.room_name("fanout", number // self.environment.parsed_options.room_size)
        self.member: RoomMember | None = None
        self._join()

    def _join(self) -> None:
        member = RoomMember(self.environment, self.room)
        self.member = member if member.join() else None

    @tag("fanout")
    @task
    def publish(self):
        if self.member is None or not self.member.alive:
            if self.member is not None:
                self.member.close()
            self._join()
            return
        if not self.member.connected:
            return  # coming back: it publishes again once it has resumed
        tracker = _tracker()
        message_id, sent_at = tracker.publish(self.room, FANOUT, origin=self.member.replica)
        try:
            self.member.publish({"message": f"load {message_id}", "id": message_id, "sent_at": sent_at})
        except ConnectionLost:
            # Not sent: nobody is owed it. The socket's reader sees the loss
            # too (with its close code), and the member comes back.
            tracker.cancel(message_id)

    def on_stop(self):
        if self.member is not None:
            self.member.close()


class HttpBroadcastUser(HttpUser):
    """Publishes over HTTP (gunicorn) to its own room, whose members sit on the replicas."""

    delivers = True

    def wait_time(self):
        return constant_throughput(self.environment.parsed_options.publish_rate)(self)

    def on_start(self):
        tracker = _tracker()
        self.room = tracker.room_name("http", tracker.next_number("http"))
        self.members = [
            RoomMember(self.environment, self.room) for _ in range(self.environment.parsed_options.room_size)
        ]
        for member in self.members:
            member.join()
        self.headers = {"Authorization": f"Bearer {self.environment.parsed_options.broadcast_token}"}

    @tag("http")
    @task
    def publish(self):
        for index, member in enumerate(self.members):
            if not member.alive:
                member.close()
                self.members[index] = RoomMember(self.environment, self.room)
                self.members[index].join()
        tracker = _tracker()
        message_id, sent_at = tracker.publish(self.room, HTTP_FANOUT)
        body = {"message": f"load {message_id}", "id": message_id, "sent_at": sent_at}
        with self.client.post(
            f"/api/rooms/{self.room}/messages",
            json=body,
            headers=self.headers,
            name="/api/rooms/[room]/messages",
            catch_response=True,
        ) as response:
            if response.status_code == 202:
                tracker.published_by(message_id, str(response.json().get("origin", "unknown")))
                response.success()
            else:
                tracker.cancel(message_id)
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")

    def on_stop(self):
        for member in self.members:
            member.close()


class _RoundTripUser(User):
    """One socket; each task sends a frame and waits for the one reply."""

    abstract = True
    path = ""

    def wait_time(self):
        return constant_throughput(self.environment.parsed_options.request_rate)(self)

    def on_start(self):
        self.conn: WsConnection | None = None
        self._connect()

    def _connect(self) -> bool:
        started = time.perf_counter()
        # A fresh queue per socket: nothing from an old socket can answer a new request.
        replies = self.replies = Queue()
        try:
            self.conn = WsConnection(
                self.environment.host,
                self.path,
                replies.put,
                lambda error: self._on_error(error, replies),
                REPLY_TIMEOUT,
            )
        except (websocket.WebSocketException, OSError) as error:
            _record(self.environment, "connect", self.path, (time.perf_counter() - started) * 1000, exception=error)
            return False
        _record(self.environment, "connect", self.path, self.conn.handshake_ms)
        return True

    def _on_error(self, error: Exception, replies: Queue) -> None:
        if isinstance(error, ConnectionLost):
            replies.put(None)  # the waiting (or next) round trip reports it, once
        else:
            _record(self.environment, "ws", f"{self.path} receive", 0, exception=error)

    def round_trip(self, frame: dict, expected: dict) -> None:
        if self.conn is None and not self._connect():
            return
        started = time.perf_counter()
        failure = None
        try:
            self.conn.send(frame)
            reply = self.replies.get(timeout=REPLY_TIMEOUT)
            if reply is None:
                raise ConnectionLost("closed while waiting for the reply")
        except ConnectionLost as error:
            failure = error
        except Empty:
            failure = TimeoutError(f"no reply within {REPLY_TIMEOUT:g} s")
        else:
            if any(reply.get(key) != value for key, value in expected.items()):
                failure = ValueError(f"unexpected reply {str(reply)[:200]}")
        _record(
            self.environment, self.request_type, self.path, (time.perf_counter() - started) * 1000, exception=failure
        )
        if isinstance(failure, (ConnectionLost, TimeoutError)):
            # A late reply on this socket would be taken for the next request's.
            self.conn.close()
            self.conn = None

    def on_stop(self):
        if self.conn is not None:
            self.conn.close()


class EchoUser(_RoundTripUser):
    path = "/ws/echo/"
    request_type = "echo"

    @tag("echo")
    @task
    def echo(self):
        token = f"echo {time.monotonic()}"
        self.round_trip({"message": token}, {"message": token})


class ApiUser(_RoundTripUser):
    path = "/ws/api/"
    request_type = "api"

    @tag("api")
    @task
    def request(self):
        data = {"op": "ping", "at": time.monotonic()}
        self.round_trip({"request": data}, {"status": "OK", "data": data})


class ConnectionStormUser(User):
    """Churn: open a chat socket, wait for the welcome, close it, again and again."""

    def wait_time(self):
        return constant_throughput(self.environment.parsed_options.connect_rate)(self)

    def on_start(self):
        self.room = _tracker().room_name("storm", 0)

    @tag("storm")
    @task
    def churn(self):
        welcome = AsyncResult()
        started = time.perf_counter()
        conn = None
        try:
            conn = WsConnection(
                self.environment.host,
                CHAT_PATH.format(room=self.room),
                lambda frame: welcome.set(frame) if frame.get("type") == "welcome" else None,
                lambda error: welcome.set_exception(error) if not welcome.ready() else None,
                REPLY_TIMEOUT,
            )
            welcome.get(timeout=REPLY_TIMEOUT)
        except (websocket.WebSocketException, OSError, ConnectionLost, BadFrame, gevent.Timeout) as error:
            _record(
                self.environment,
                "connect",
                f"{CHAT_NAME} storm",
                (time.perf_counter() - started) * 1000,
                exception=error,
            )
        else:
            _record(self.environment, "connect", f"{CHAT_NAME} storm", conn.handshake_ms)
        finally:
            if conn is not None:
                conn.close()


# --- selection, bookkeeping, verdict ---


def _select_by_tags(environment) -> None:
    """Run only the user classes with a task left by --tags/--exclude-tags, so a
    tag picks a scenario instead of leaving task-less users that raise."""
    options = environment.parsed_options
    tags = set(options.tags) if options.tags else None
    excluded = set(options.exclude_tags) if options.exclude_tags else set()
    if tags is None and not excluded:
        return

    def runs(user_class) -> bool:
        for task_function in user_class.tasks:
            task_tags = getattr(task_function, "locust_tag_set", set())
            if (tags is None or task_tags & tags) and not task_tags & excluded:
                return True
        return False

    kept = [user_class for user_class in environment.user_classes if runs(user_class)]
    if not kept:
        sys.exit(f"no scenario matches --tags {sorted(tags or [])} / --exclude-tags {sorted(excluded)}")
    environment.user_classes[:] = kept


@events.init.add_listener
def on_init(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return
    _select_by_tags(environment)
    if HttpBroadcastUser in environment.user_classes and not environment.parsed_options.broadcast_token:
        sys.exit("HttpBroadcastUser needs the broadcast token: set BROADCAST_TOKEN or --broadcast-token")
    if isinstance(environment.runner, MasterRunner):
        environment.events.worker_report.add_listener(_on_worker_report)


def _sweep_forever(tracker: DeliveryTracker) -> None:
    while True:
        gevent.sleep(SWEEP_SECONDS)
        tracker.sweep()


@events.test_start.add_listener
def on_test_start(environment, **_kwargs):
    _Process.cpu.start()
    _Process.worker_reports.clear()
    if isinstance(environment.runner, MasterRunner):
        return
    if _Process.sweeper is not None:
        _Process.sweeper.kill(block=False)
    _Process.tracker = DeliveryTracker(environment.events.request.fire, environment.parsed_options.delivery_deadline)
    _Process.sweeper = gevent.spawn(_sweep_forever, _Process.tracker)


@events.test_stopping.add_listener
def on_test_stopping(environment, **_kwargs):
    if _Process.sweeper is not None:
        _Process.sweeper.kill(block=False)
        _Process.sweeper = None
    if _Process.tracker is not None:
        _Process.tracker.settle_at_stop()


@events.report_to_master.add_listener
def on_report_to_master(client_id, data, **_kwargs):
    data["loadtest"] = {
        "cpu_peak": _Process.cpu.peak,
        "unsettled_at_stop": _Process.tracker.unsettled_at_stop if _Process.tracker else 0,
    }


def _on_worker_report(client_id, data, **_kwargs):
    if "loadtest" in data:
        _Process.worker_reports[client_id] = data["loadtest"]


def _rows(environment) -> list[Row]:
    return [
        Row(entry.method or "", entry.name, entry.num_requests, entry.num_failures, dict(entry.response_times))
        for entry in environment.stats.entries.values()
    ]


@events.quitting.add_listener
def on_quitting(environment, **_kwargs):
    """Judge on the master (or the only process): it holds the aggregated stats."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner) or runner is None:
        return
    options = environment.parsed_options
    cpu_peaks = {"master" if isinstance(runner, MasterRunner) else "local": _Process.cpu.peak}
    unsettled = _Process.tracker.unsettled_at_stop if _Process.tracker else 0
    for client_id, report in _Process.worker_reports.items():
        index = runner.worker_indexes.get(client_id, client_id)
        cpu_peaks[f"worker-{index}"] = report["cpu_peak"]
        unsettled += report["unsettled_at_stop"]
    thresholds = Thresholds(
        min_delivery_ratio=options.min_delivery_ratio,
        max_p99_ms=options.max_p99_ms,
        min_replicas=options.min_replicas,
        min_cross_pairs=None if options.min_cross_pairs == "all" else int(options.min_cross_pairs),
        max_cpu_percent=CPU_WARNING_THRESHOLD,
    )
    verdict = judge(
        _rows(environment),
        thresholds,
        expects_fanout=any(getattr(user_class, "delivers", False) for user_class in environment.user_classes),
        cpu_peaks=cpu_peaks,
        cpu_warned=runner.cpu_warning_emitted or getattr(runner, "worker_cpu_warning_emitted", False),
        unsettled_at_stop=unsettled,
    )
    environment.process_exit_code = verdict.exit_code
    _Process.verdict = verdict
    if options.summary_file:
        text_path, json_path = summary.write(verdict, options.summary_file)
        logger.info("verdict summary written to %s and %s", text_path, json_path)


@events.quit.add_listener
def on_quit(exit_code, **_kwargs):
    # After locust's own tables, so the verdict is the last thing on screen.
    if _Process.verdict is not None:
        sys.stdout.write("\n" + summary.render(_Process.verdict))
        sys.stdout.flush()
