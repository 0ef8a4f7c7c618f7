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
import sys
import time

# Import the sibling modules as the ``loadtest`` package whatever the working
# directory: locust only puts the locustfile's own directory on sys.path.
# abspath, not resolve(): a Kubernetes ConfigMap mounts each file as a symlink
# into a hidden subdirectory, whose parent is not the package's parent.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent  # noqa: E402
import websocket  # noqa: E402
from gevent.event import AsyncResult  # noqa: E402
from gevent.queue import Empty, Queue  # noqa: E402
from locust import HttpUser, User, constant_throughput, events, tag, task  # noqa: E402
from locust.runners import CPU_WARNING_THRESHOLD, MasterRunner, WorkerRunner  # noqa: E402

from loadtest import summary  # noqa: E402
from loadtest.cpu_watch import CpuWatch  # noqa: E402
from loadtest.delivery import DeliveryTracker  # noqa: E402
from loadtest.thresholds import FANOUT, HTTP_FANOUT, Row, Thresholds, judge  # noqa: E402
from loadtest.ws_connection import BadFrame, ConnectionLost, WsConnection  # noqa: E402

logger = logging.getLogger("loadtest")

# A handshake or a reply slower than this is a failure, not a latency sample.
REPLY_TIMEOUT = 10.0
# How often late deliveries are looked for; small next to any sane deadline.
SWEEP_SECONDS = 0.2
CHAT_PATH = "/ws/chat/{room}/"
CHAT_NAME = "/ws/chat/[room]/"


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
    parser.add_argument("--publish-rate", type=_positive(float), default=1.0, env_var="LOCUST_PUBLISH_RATE",
                        help="messages per second each FanoutUser / HttpBroadcastUser publishes (default 1)")
    parser.add_argument("--room-size", type=_positive(int), default=6, env_var="LOCUST_ROOM_SIZE",
                        help="members per room; each message is delivered room-size times (default 6)")
    parser.add_argument("--delivery-deadline", type=_positive(float), default=5.0, env_var="LOCUST_DELIVERY_DEADLINE",
                        help="seconds a member may wait for a message before it counts as lost (default 5)")
    parser.add_argument("--request-rate", type=_positive(float), default=2.0, env_var="LOCUST_REQUEST_RATE",
                        help="round trips per second each EchoUser / ApiUser makes (default 2)")
    parser.add_argument("--connect-rate", type=_positive(float), default=1.0, env_var="LOCUST_CONNECT_RATE",
                        help="connections per second each ConnectionStormUser opens and closes (default 1)")
    parser.add_argument("--broadcast-token", default="", env_var="BROADCAST_TOKEN", include_in_web_ui=False,
                        help="Bearer token of the HTTP broadcast API (HttpBroadcastUser); default $BROADCAST_TOKEN")
    parser.add_argument("--min-delivery-ratio", type=_ratio, default=0.999, env_var="LOCUST_MIN_DELIVERY_RATIO",
                        help="fail below this share of fan-out deliveries made in time (default 0.999)")
    parser.add_argument("--max-p99-ms", type=_positive(float), default=1000.0, env_var="LOCUST_MAX_P99_MS",
                        help="fail above this p99 fan-out latency in ms (default 1000)")
    parser.add_argument("--min-replicas", type=int, default=2, env_var="LOCUST_MIN_REPLICAS",
                        help="fail when fewer distinct replicas delivered messages (default 2)")
    parser.add_argument("--min-cross-pairs", type=_pair_count, default="all", env_var="LOCUST_MIN_CROSS_PAIRS",
                        help='fail below this many origin->served_by pairs with origin != served_by; '
                             '"all" (default) wants every ordered pair of the replicas seen')
    parser.add_argument("--summary-file", default="", env_var="LOCUST_SUMMARY_FILE",
                        help="also write the verdict summary here (text) and next to it as .json")


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


class RoomMember:
    """One socket in a chat room; its receipts go to the process's delivery tracker."""

    def __init__(self, environment, room: str):
        self.environment = environment
        self.room = room
        self.replica: str | None = None
        self.conn: WsConnection | None = None
        self.alive = False
        self._welcome = AsyncResult()

    def join(self) -> bool:
        started = time.perf_counter()
        try:
            self.conn = WsConnection(
                self.environment.host, CHAT_PATH.format(room=self.room), self._on_frame, self._on_error, REPLY_TIMEOUT
            )
            self.replica = self._welcome.get(timeout=REPLY_TIMEOUT)
        except (websocket.WebSocketException, OSError, ConnectionLost, BadFrame, gevent.Timeout) as error:
            _record(self.environment, "connect", CHAT_NAME, (time.perf_counter() - started) * 1000, exception=error)
            self.close()
            return False
        _record(self.environment, "connect", CHAT_NAME, (time.perf_counter() - started) * 1000)
        self.alive = True
        _tracker().join(self.room, self, self.replica)
        return True

    def _on_frame(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "chat.message":
            _tracker().received(self, frame)
        elif kind == "welcome":
            self._welcome.set(str(frame.get("pod", "unknown")))
        elif kind == "error":
            _record(self.environment, "ws", f"{CHAT_NAME} error frame", 0,
                    exception=RuntimeError(f"{frame.get('code')}: {frame.get('detail')}"))

    def _on_error(self, error: Exception) -> None:
        if not self._welcome.ready():
            self._welcome.set_exception(error)  # join() reports it as a failed connect
            return
        if isinstance(error, ConnectionLost):
            self.lost()
        _record(self.environment, "ws", f"{CHAT_NAME} receive", 0, exception=error)

    def send(self, frame: dict) -> None:
        self.conn.send(frame)

    def lost(self) -> None:
        """The socket died under us: what the member was owed still fails at its deadline."""
        if self.alive:
            self.alive = False
            _tracker().lose(self.room, self)

    def close(self) -> None:
        """Stop on purpose: what a live member was still owed is dropped, unjudged."""
        if self.alive and _Process.tracker is not None:
            _Process.tracker.leave(self.room, self)
        self.alive = False
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
        tracker = _tracker()
        message_id, sent_at = tracker.publish(self.room, FANOUT, origin=self.member.replica)
        try:
            self.member.send({"message": f"load {message_id}", "id": message_id, "sent_at": sent_at})
        except ConnectionLost as error:
            tracker.cancel(message_id)
            _record(self.environment, "ws", f"{CHAT_NAME} send", 0, exception=error)
            self.member.lost()
            self.member.close()
            self.member = None

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
        self.members = [RoomMember(self.environment, self.room) for _ in range(self.environment.parsed_options.room_size)]
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
                self.environment.host, self.path, replies.put, lambda error: self._on_error(error, replies), REPLY_TIMEOUT
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
        _record(self.environment, self.request_type, self.path, (time.perf_counter() - started) * 1000, exception=failure)
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
            _record(self.environment, "connect", f"{CHAT_NAME} storm", (time.perf_counter() - started) * 1000,
                    exception=error)
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
