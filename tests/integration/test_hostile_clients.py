"""Hostile clients against the real stack (redis, 3 Daphne replicas, gunicorn, nginx).

Each case asserts what a user would notice: the attacker gets the documented
error frame or close code; the attacked replica's /healthz stays 200 and
answers in under 100 ms (probed from another process); room members on every
replica keep receiving every message (counted); the replica's log does not
fill with per-message tracebacks; and once every client has left, every
replica's blueprint_ws_open_sockets gauge (scraped from the replica itself,
not through nginx) is exactly 0.

The contract is the server's, as README (Wire protocol, Limits) and
app/realtime/close_codes.py state it. `pytest -s` prints the numbers: the
health probe's latency, the well-behaved members' p50/p99 during each attack,
the replica's RSS growth under slow readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets

from tests import rawws
from tests.hostile import (
    CapturedLog,
    HealthProbe,
    LiveDaphne,
    Member,
    Publisher,
    RawPublisher,
    delivery_problems,
    healthz,
    latency_summary,
    log_records,
    metric_sum,
    now_ms,
    open_sockets,
    replica_pid,
    rss_bytes,
    scrape,
    settle,
    traceback_lines,
    wait_open_sockets,
)
from tests.integration.running_stack import checked_stack

pytestmark = [pytest.mark.stack, pytest.mark.redis]

MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024  # WS_MAX_MESSAGE_BYTES default
MAX_PENDING_BYTES = 1 * MIB  # WS_MAX_PENDING_BYTES default
CLOSE_AFTER_SECONDS = 3.0  # WS_RATE_LIMIT_CLOSE_AFTER_SECONDS default
MAX_SAFE_INTEGER = 2**53 - 1
HEALTH_MAX_MS = 100.0
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the stack -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack():
    log = CapturedLog()
    with checked_stack(replicas=3, log=log) as running:
        running.captured = log
        yield running


@pytest.fixture(autouse=True)
def no_socket_left(stack):
    """After every test, once its clients have left: every replica's gauge is
    exactly 0. If an earlier test already leaked (the module shares one stack),
    this test is held to adding no socket of its own, so one leak fails one
    test instead of every later one."""
    before = {name: open_sockets(port) for name, port in stack.replica_ports.items()}
    yield
    readings = wait_open_sockets(stack.replica_ports, 0, timeout=10)
    if any(before.values()):
        assert all(readings[name] <= before[name] for name in readings), (
            f"open-socket gauges rose during the test: {before} -> {readings} (an earlier test leaked the rest)"
        )
    else:
        assert readings == {name: 0 for name in stack.replica_names}, f"open-socket gauges after the test: {readings}"
    for name, port in stack.replica_ports.items():
        assert healthz(port)[0] == 200, f"{name} /healthz after the test"


def nginx(stack) -> tuple[str, str]:
    return f"ws://127.0.0.1:{stack.port}", f"http://127.0.0.1:{stack.port}"


def direct(stack, name: str) -> tuple[str, str]:
    port = stack.replica_ports[name]
    return f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}"


async def roommates(
    stack, room: str, per_replica: int = 1, through_nginx: int = 2
) -> tuple[list[Member], list[Member]]:
    """(members placed on every replica directly, members through nginx); the
    latter also publish."""
    placed = []
    for name in stack.replica_names:
        for _ in range(per_replica):
            placed.append(await Member.join(*direct(stack, name), room, where=f"direct to {name}"))
    proxied = [await Member.join(*nginx(stack), room, where="through nginx") for _ in range(through_nginx)]
    assert {member.pod for member in placed} == set(stack.replica_names)
    return placed, proxied


async def leave(members) -> None:
    await asyncio.gather(*(member.close() for member in members), return_exceptions=True)


def report(label: str, members: list[Member], probe: HealthProbe | None = None, extra: str = "") -> None:
    p50, p99, count = latency_summary(members)
    line = f"[{label}] well-behaved members: {count} deliveries, p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    if probe is not None:
        line += f"; {probe.summary()}"
    print(line + (f"; {extra}" if extra else ""))


# --- a) malformed JSON on every endpoint and the HTTP API ----------------------------

DEEP = 10_000
# (case, the frame for field F, the code). F is "message" on echo and chat,
# "request" on api; the bad value sits in F itself or in an extra field.
MALFORMED = [
    ("nan", '{"F":"ok","id":NaN}', "bad_json"),
    ("nan-in-field", '{"F":NaN}', "bad_json"),
    ("infinity", '{"F":"ok","id":Infinity}', "bad_json"),
    ("minus-infinity", '{"F":"ok","id":[1,-Infinity]}', "bad_json"),
    ("1e400", '{"F":"ok","id":1e400}', "bad_json"),
    ("-1e400-nested", '{"F":"ok","id":{"a":[-1e400]}}', "bad_json"),
    ("depth-33-arrays", '{"F":"ok","id":' + "[" * 33 + "]" * 33 + "}", "bad_json"),
    ("depth-40-objects", '{"F":"ok","id":' + '{"a":' * 40 + "1" + "}" * 40 + "}", "bad_json"),
    ("depth-10000", '{"F":"ok","id":' + "[" * DEEP + "]" * DEEP + "}", "bad_json"),
    ("depth-10000-unclosed", '{"F":"ok","id":' + "[" * DEEP, "bad_json"),
    ("int-2**53", '{"F":"ok","id":%d}' % (2**53), "bad_schema"),
    ("int-minus-2**53-nested", '{"F":"ok","id":[1,{"n":%d}]}' % -(2**53), "bad_schema"),
    ("int-400-digits", '{"F":"ok","id":' + "9" * 400 + "}", "bad_schema"),
    ("int-in-field", '{"F":%d}' % (2**64), "bad_schema"),
    # Past Python's 4,300-digit int parsing limit: still an integer over 2**53-1.
    ("int-5000-digits", '{"F":"ok","id":-' + "9" * 5000 + "}", "bad_schema"),
    ("lone-high-surrogate", '{"F":"a\\ud800b"}', "bad_json"),
    ("lone-low-surrogate-in-extra", '{"F":"ok","id":"\\udfff"}', "bad_json"),
    ("surrogate-in-key", '{"F":"ok","\\ud800":1}', "bad_json"),
    ("not-json", "nope", "bad_json"),
    ("array", '["F"]', "bad_json"),
]
# Edge values that are valid and must be accepted (the limits are not off by one).
ACCEPTED = [
    ("int-2**53-1", '{"F":"ok","id":%d}' % MAX_SAFE_INTEGER),
    ("int-minus-2**53-1", '{"F":"ok","id":[%d]}' % -MAX_SAFE_INTEGER),
    ("depth-31", '{"F":"ok","id":' + "[" * 30 + "]" * 30 + "}"),
    ("surrogate-pair", '{"F":"\\ud83d\\ude00"}'),
    ("float", '{"F":"ok","id":1.5e300}'),
]
ENDPOINTS = {
    "echo": ("/ws/echo/", "message"),
    "api": ("/ws/api/", "request"),
    "chat": ("/ws/chat/hostile-a/", "message"),
}


def frame_for(template: str, field: str) -> str:
    return template.replace('"F"', json.dumps(field))


@contextlib.asynccontextmanager
async def open_endpoint(stack, endpoint: str):
    """A socket through nginx, closed whatever the test does (a failed
    assertion must not leave a socket open for the next test's gauge check)."""
    path, _ = ENDPOINTS[endpoint]
    url, origin = nginx(stack)
    async with websockets.connect(url + path, origin=origin, max_size=None, open_timeout=10) as ws:
        if endpoint == "chat":
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
        yield ws


async def next_reply(ws, timeout: float = 5.0) -> dict:
    """The next frame that is not someone's chat message (a room may be shared)."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame.get("type") != "chat.message" or str(frame.get("id")).startswith("usable-"):
            return frame


def error_code(endpoint: str, frame: dict) -> str | None:
    if endpoint == "api":
        if frame.get("status") != "error":
            return None
        return frame["error"].split(":", 1)[0]
    return frame.get("code") if frame.get("type") == "error" else None


async def assert_still_usable(ws, endpoint: str) -> None:
    """The socket answers a valid frame after the error."""
    path, field = ENDPOINTS[endpoint]
    # A new id each time: the room's history publishes an id it holds only once.
    usable = f"usable-{secrets.token_hex(4)}"
    await ws.send(json.dumps({field: "still here", "id": usable}))
    frame = await next_reply(ws)
    if endpoint == "echo":
        assert frame == {"message": "still here", "served_by": frame.get("served_by")} and frame["served_by"], frame
    elif endpoint == "api":
        assert frame == {"status": "OK", "data": "still here"}, frame
    else:
        assert frame["type"] == "chat.message" and frame["id"] == usable and frame["message"] == "still here", frame


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("case,template,code", MALFORMED, ids=[case for case, _, _ in MALFORMED])
async def test_malformed_json_gets_its_error_code_and_the_socket_stays_usable(stack, endpoint, case, template, code):
    async with open_endpoint(stack, endpoint) as ws:
        await ws.send(frame_for(template, ENDPOINTS[endpoint][1]))
        frame = await next_reply(ws)
        assert error_code(endpoint, frame) == code, f"{case} on {endpoint}: {frame}"
        if endpoint == "api":
            assert set(frame) == {"status", "error"} and frame["error"].startswith(f"{code}: "), frame
        else:
            assert set(frame) == {"type", "code", "detail"} and isinstance(frame["detail"], str), frame
        await assert_still_usable(ws, endpoint)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("case,template", ACCEPTED, ids=[case for case, _ in ACCEPTED])
async def test_valid_edge_values_are_accepted(stack, endpoint, case, template):
    async with open_endpoint(stack, endpoint) as ws:
        text = frame_for(template, ENDPOINTS[endpoint][1])
        await ws.send(text)
        frame = await next_reply(ws) if endpoint != "chat" else json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert error_code(endpoint, frame) is None and frame.get("type") != "error", f"{case} on {endpoint}: {frame}"
        sent = json.loads(text)
        if endpoint == "api":
            assert frame == {"status": "OK", "data": sent["request"]}
        elif endpoint == "echo":
            assert frame["message"] == sent["message"]
        else:
            assert (
                frame["type"] == "chat.message"
                and frame["message"] == sent["message"]
                and frame.get("id") == sent.get("id")
            )


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_a_binary_frame_is_bad_json(stack, endpoint):
    async with open_endpoint(stack, endpoint) as ws:
        await ws.send(json.dumps({ENDPOINTS[endpoint][1]: "x"}).encode())
        frame = await next_reply(ws)
        assert error_code(endpoint, frame) == "bad_json", frame
        await assert_still_usable(ws, endpoint)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_non_utf8_text_fails_the_connection_without_leaking_its_slot(stack, endpoint):
    path, field = ENDPOINTS[endpoint]

    def attack() -> tuple[int | None, bool]:
        with rawws.RawWebSocket("127.0.0.1", stack.port, path) as ws:
            ws.send_text(b'{"' + field.encode() + b'":"\xff\xfe\xc0\xaf"}')
            ws.frames_until_close(5)
            return ws.close_code, ws.eof

    code, eof = await asyncio.to_thread(attack)
    # autobahn fails the connection with 1007 (invalid frame payload data).
    assert code == 1007, f"close code {code}, eof {eof}"

    # And a truncated UTF-8 sequence split over fragments.
    def fragmented() -> int | None:
        with rawws.RawWebSocket("127.0.0.1", stack.port, path) as ws:
            ws.send_frame(rawws.TEXT, b'{"x":"\xe2\x82', fin=False)
            ws.send_frame(rawws.CONTINUATION, b'"}', fin=True)
            ws.frames_until_close(5)
            return ws.close_code

    assert await asyncio.to_thread(fragmented) == 1007


HTTP_ONLY = [("non-utf8-body", b'{"message":"\xff"}', "bad_json")]


@pytest.mark.parametrize(
    "case,body,code",
    [(case, frame_for(template, "message").encode(), code) for case, template, code in MALFORMED] + HTTP_ONLY,
    ids=[case for case, _, _ in MALFORMED] + [case for case, _, _ in HTTP_ONLY],
)
def test_the_http_api_answers_400_with_the_same_code(stack, case, body, code):
    request = urllib.request.Request(
        f"{stack.url}/api/rooms/hostile-http/messages",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {stack.broadcast_token}", "Content-Type": "application/json"},
    )
    try:
        with _HTTP.open(request, timeout=10) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, json.loads(error.read())
    assert (status, answer.get("code")) == (400, code), f"{case}: {status} {answer}"


def test_a_client_that_resets_mid_frame_leaves_no_socket_counted(redis_server):
    """A frame header that promises more bytes than follow, then a TCP reset
    at once: the replica must forget the socket (a leaked slot per attempt
    fills a replica: WS_MAX_CONNECTIONS of them and it refuses everyone with 1013).
    On a replica of its own: a leak here must not fail the stack's other tests."""
    with LiveDaphne(
        redis_server.url, CHANNEL_LAYER="redis-fanout", WS_MAX_CONNECTIONS="5", DRAIN_TIMEOUT_SECONDS="2"
    ) as daphne:
        for _ in range(20):
            ws = rawws.RawWebSocket("127.0.0.1", daphne.port, "/ws/echo/")
            ws.send_raw(rawws.frame(rawws.TEXT, b'{"message":"cut', length=5000))
            ws.abort()
        readings = wait_open_sockets({"d": daphne.port}, 0, timeout=10)
        try:
            with rawws.RawWebSocket("127.0.0.1", daphne.port, "/ws/echo/") as ws:
                ws.send_text('{"message":"after"}')
                answer = ws.recv_frame(5)
                answer = answer.close_code or answer.text
        except rawws.HandshakeRefused as refused:
            answer = refused.status_line
        wait_open_sockets({"d": daphne.port}, 0, timeout=5)
    assert readings == {"d": 0}, f"after 20 resets mid-frame the replica still counts {readings['d']:g} sockets"
    assert isinstance(answer, str) and '"after"' in answer, f"a new client after the resets got {answer!r}"


def test_a_client_that_resets_mid_frame_through_nginx_leaves_no_socket_counted(stack):
    for _ in range(20):
        ws = rawws.RawWebSocket("127.0.0.1", stack.port, "/ws/echo/")
        ws.send_raw(rawws.frame(rawws.TEXT, b'{"message":"cut', length=5000))
        ws.abort()
    # The autouse check holds the gauges to 0.


# --- e) oversize frames ---------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_a_frame_over_the_message_limit_is_too_large_and_the_socket_stays_open(stack, endpoint):
    async with open_endpoint(stack, endpoint) as ws:
        field = ENDPOINTS[endpoint][1]
        await ws.send(json.dumps({field: "x" * (65 * 1024)}))
        frame = await next_reply(ws)
        assert error_code(endpoint, frame) == "too_large", frame
        await assert_still_usable(ws, endpoint)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_a_frame_over_the_transport_limit_is_closed_with_1009(stack, endpoint):
    async with open_endpoint(stack, endpoint) as ws:
        try:
            await ws.send(json.dumps({ENDPOINTS[endpoint][1]: "x" * (2 * MIB)}))
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed:
            pass
        assert ws.close_code == 1009, f"close code {ws.close_code} (1006 is a bare TCP drop)"


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_a_fragmented_message_over_the_transport_limit_is_closed_with_1009(stack, endpoint):
    path, _ = ENDPOINTS[endpoint]

    def attack() -> int | None:
        with rawws.RawWebSocket("127.0.0.1", stack.port, path) as ws:
            ws.duplex = True
            ws.sock.settimeout(0.5)
            chunk = b"x" * (64 * 1024)
            sent = ws.send_frame(rawws.TEXT, b'{"message":"' + chunk, fin=False)
            for _ in range(40):  # 2.5 MiB in all
                sent = sent and ws.send_frame(rawws.CONTINUATION, chunk, fin=False)
            ws.send_frame(rawws.CONTINUATION, b'"}', fin=True)
            ws.frames_until_close(10)
            return ws.close_code

    code = await asyncio.to_thread(attack)
    assert code == 1009, f"close code {code}"


# --- c) paced floods, b) sending after the close -----------------------------------------


async def flood(ws, rate: float, seconds: float, tag: str) -> dict:
    """Send ``rate`` chat frames a second for at most ``seconds`` or until the
    socket is closed; read everything meanwhile."""
    loop = asyncio.get_running_loop()
    seen = {"rate_limited": 0, "first_refusal": None, "closed_at": None, "other_errors": []}
    started = loop.time()

    async def read():
        try:
            async for text in ws:
                frame = json.loads(text)
                if frame.get("type") == "error":
                    if frame.get("code") == "rate_limited":
                        seen["rate_limited"] += 1
                        if seen["first_refusal"] is None:
                            seen["first_refusal"] = loop.time() - started
                    else:
                        seen["other_errors"].append(frame)
        except websockets.ConnectionClosed:
            pass
        seen["closed_at"] = loop.time() - started

    reader = asyncio.ensure_future(read())
    n = 0
    try:
        while loop.time() - started < seconds and not reader.done():
            due = int((loop.time() - started) * rate) + 1
            while n < due:
                await ws.send(json.dumps({"message": "flood", "id": f"{tag}-{n}"}))
                n += 1
            await asyncio.sleep(0.004)
    except websockets.ConnectionClosed:
        pass
    seen["sent"] = n
    await asyncio.wait_for(reader, 10)
    seen["close_code"] = ws.close_code
    return seen


def flood_deadline(rate: float) -> float:
    """When a paced flood must be closed, from its first frame: the contract's
    "within about 3-6 s" (at 100 msg/s the burst lasts 2 s, then 3 s of
    refusals: 5 s; faster floods spend the burst sooner)."""
    return 6.0


@pytest.mark.parametrize("rate", [100, 200, 500, 1000])
async def test_a_paced_flood_is_closed_with_1008_while_roommates_miss_nothing(stack, rate):
    room = f"flood-{rate}"
    placed, proxied = await roommates(stack, room)
    members = placed + proxied
    url, origin = nginx(stack)
    async with websockets.connect(f"{url}/ws/chat/{room}/", origin=origin, max_size=None) as attacker:
        try:
            attacked = json.loads(await attacker.recv())["pod"]
            log_before = stack.captured.count(attacked)
            publisher = Publisher(proxied, rate=20, tag=f"good-{rate}")
            with HealthProbe({attacked: stack.replica_ports[attacked]}) as probe:
                seen, _ = await asyncio.gather(flood(attacker, rate, 8.0, f"flood-{rate}"), publisher.run(8.0))
            await settle(members, publisher.ids)
            report(
                f"flood {rate} msg/s",
                members,
                probe,
                f"closed with {seen['close_code']} after {seen['closed_at']:.1f} s, {seen['rate_limited']} "
                f"rate_limited, {seen['sent']} sent",
            )
            problems = delivery_problems(members, publisher.ids)
        finally:
            await leave(members)
    new_log = stack.captured.of(attacked)[log_before:]

    assert seen["close_code"] == 1008, seen
    assert seen["rate_limited"] > 0 and not seen["other_errors"], seen
    assert seen["closed_at"] <= flood_deadline(rate), (
        f"closed after {seen['closed_at']:.1f} s, not by {flood_deadline(rate):.1f}"
    )
    assert seen["closed_at"] >= seen["first_refusal"] + CLOSE_AFTER_SECONDS - 0.5, seen
    assert not problems, problems
    assert not probe.problems(HEALTH_MAX_MS), probe.problems(HEALTH_MAX_MS)
    assert traceback_lines(new_log) == 0 and len(log_records(new_log)) < 100, log_records(new_log)[-20:]


async def test_a_flood_that_interleaves_valid_pauses_is_still_closed(stack):
    """Refusals less than 1 s apart continue the run, whatever comes between:
    bursts of 30 frames every 0.5 s (60/s on average) after the bucket is spent."""
    url, origin = nginx(stack)
    ws = await websockets.connect(f"{url}/ws/echo/", origin=origin)
    for n in range(100):  # spend the burst
        await ws.send(json.dumps({"message": n}))
    started = time.monotonic()
    closed = None
    refused = 0
    try:
        while time.monotonic() - started < 8:
            for n in range(30):
                await ws.send(json.dumps({"message": n}))
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                try:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
                except TimeoutError:
                    break
                refused += frame.get("code") == "rate_limited"
    except websockets.ConnectionClosed:
        closed = time.monotonic() - started
    assert ws.close_code == 1008 and refused, f"close code {ws.close_code} after {closed}, {refused} refused"
    assert closed <= CLOSE_AFTER_SECONDS + 2, f"closed after {closed:.1f} s"


async def test_a_flooder_that_keeps_sending_after_its_1008_harms_nothing(stack):
    room = "after-close"
    placed, proxied = await roommates(stack, room)
    members = placed + proxied
    attacker = None
    try:
        attacker = rawws.RawWebSocket("127.0.0.1", stack.port, f"/ws/chat/{room}/")
        welcome = attacker.recv_frame(5)
        attacked = json.loads(welcome.text)["pod"]
        attacker.duplex = True
        attacker.sock.settimeout(0.5)
        log_before = stack.captured.count(attacked)
        result = {"closed_at": None, "sent_after_close": 0, "failed_after_close": 0, "rate_limited": 0}
        started = time.monotonic()

        def read():
            while True:
                frame = attacker.recv_frame(15)
                if frame is None:
                    return
                if frame.opcode == rawws.CLOSE:
                    result["closed_at"] = time.monotonic() - started
                    return
                if frame.opcode == rawws.TEXT and '"rate_limited"' in frame.text:
                    result["rate_limited"] += 1

        def send():
            n = 0
            while time.monotonic() - started < 12:
                if result["closed_at"] is not None and time.monotonic() - started > result["closed_at"] + 3:
                    return
                ok = attacker.send_text(json.dumps({"message": "flood", "id": f"x-{n}"}))
                if result["closed_at"] is not None:
                    result["sent_after_close" if ok else "failed_after_close"] += 1
                n += 1
                time.sleep(0.001)

        publisher = Publisher(proxied, rate=20, tag="good-after-close")
        with HealthProbe({attacked: stack.replica_ports[attacked]}) as probe:
            reader = threading.Thread(target=read)
            reader.start()
            await asyncio.gather(asyncio.to_thread(send), publisher.run(9.0))
            reader.join(15)
        attacker.abort()
        await settle(members, publisher.ids)
        report(
            "send after close",
            members,
            probe,
            f"attacker closed with {attacker.close_code} after {result['closed_at']}, "
            f"{result['sent_after_close']} sends after it went through, {result['failed_after_close']} failed",
        )
        problems = delivery_problems(members, publisher.ids)
    finally:
        await leave(members)
        if attacker is not None:
            attacker.abort()
    new_log = stack.captured.of(attacked)[log_before:]

    assert attacker.close_code == 1008, result
    assert result["closed_at"] <= flood_deadline(1000), result
    assert replica_pid(stack, attacked) and healthz(stack.replica_ports[attacked])[0] == 200
    assert not problems, problems
    assert not probe.problems(HEALTH_MAX_MS), probe.problems(HEALTH_MAX_MS)
    assert traceback_lines(new_log) == 0 and len(log_records(new_log)) < 100, log_records(new_log)[-20:]
    dropped = metric_sum(stack.replica_ports[attacked], "blueprint_ws_deliveries_dropped_total")
    print(f"[send after close] {attacked} blueprint_ws_deliveries_dropped_total = {dropped:g}")


# --- d) slow consumers -------------------------------------------------------------------

SLOW_READERS = 10
SLOW_SECONDS = 60.0
SLOW_RATE = 200  # msg/s into the room
SLOW_SIZE = 2048  # bytes of message text
RSS_ALLOWANCE = 40 * MIB
BASELINE_SECONDS = 5.0


async def test_ten_members_that_stop_reading_are_cut_and_memory_stays_bounded(stack):
    room = "busy"
    target = stack.replica_names[0]
    port = stack.replica_ports[target]
    pid = replica_pid(stack, target)
    refused_before = metric_sum(port, "blueprint_ws_connections_refused_total", reason="slow_consumer")
    log_before = stack.captured.count(target)

    # Every slow reader on one replica: the attack concentrated. A small
    # receive buffer and no reads after the handshake.
    slow: list[rawws.RawWebSocket] = []
    members: list[Member] = []
    publishers = None
    try:
        placed, proxied = await roommates(stack, room, per_replica=1, through_nginx=1)
        members += placed + proxied
        # 200 msg/s from 5 sockets through nginx (40/s each: under the
        # per-socket limit); they read and discard the room's traffic.
        publishers = await asyncio.to_thread(RawPublisher, "127.0.0.1", stack.port, room, 5)
        await asyncio.sleep(0.5)  # a socket is counted just after its handshake answer
        good_on_target = open_sockets(port)  # members and publishers that nginx put there

        # First the same load without the slow readers: what the machine gives
        # without the attack.
        with HealthProbe(stack.replica_ports) as calm_probe:
            calm_ids = await asyncio.to_thread(publishers.run, SLOW_RATE, BASELINE_SECONDS, "calm", SLOW_SIZE)
        await settle(members, calm_ids, timeout=15)
        report(f"baseline: the same load for {BASELINE_SECONDS:.0f} s, no slow reader", members, calm_probe)
        for member in members:
            member.latencies.clear()
        slow += [
            await asyncio.to_thread(rawws.RawWebSocket, "127.0.0.1", port, f"/ws/chat/{room}/", rcvbuf=4096)
            for _ in range(SLOW_READERS)
        ]
        await asyncio.sleep(0.5)
        assert open_sockets(port) == SLOW_READERS + good_on_target, [
            line for line in scrape(port).splitlines() if "open_sockets{" in line
        ]
        baseline = rss_bytes(pid)
        peak = baseline
        gauge_cut_at = None

        async def watch():
            nonlocal peak, gauge_cut_at
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < SLOW_SECONDS + 1:
                peak = max(peak, rss_bytes(pid))
                if gauge_cut_at is None and await asyncio.to_thread(open_sockets, port) == good_on_target:
                    gauge_cut_at = loop.time() - started
                await asyncio.sleep(0.25)

        with HealthProbe(stack.replica_ports) as probe:
            ids, _ = await asyncio.gather(
                asyncio.to_thread(publishers.run, SLOW_RATE, SLOW_SECONDS, "busy", SLOW_SIZE), watch()
            )
        await settle(members, ids, timeout=15)
        growth = peak - baseline
        refused = metric_sum(port, "blueprint_ws_connections_refused_total", reason="slow_consumer") - refused_before
        report(
            f"{SLOW_READERS} slow readers, {SLOW_RATE} msg/s of {SLOW_SIZE} B for {SLOW_SECONDS:.0f} s",
            members,
            probe,
            f"{target} RSS {baseline / MIB:.1f} -> peak {peak / MIB:.1f} MiB (growth {growth / MIB:.1f} MiB, "
            f"bound {(SLOW_READERS * MAX_PENDING_BYTES + RSS_ALLOWANCE) / MIB:.0f} MiB); slow readers gone from the "
            f"gauge after {gauge_cut_at} s; slow_consumer refusals +{refused:g}",
        )

        def what_slow_readers_saw(ws) -> str:
            frames = ws.frames_until_close(2)
            code = ws.close_code
            ws.close()
            return f"close {code}" if code else ("TCP closed" if ws.eof else f"still open ({len(frames)} frames read)")

        seen = await asyncio.gather(*(asyncio.to_thread(what_slow_readers_saw, ws) for ws in slow))
        print(f"[slow readers] what each saw once it read again: {seen}")
        problems = delivery_problems(members, ids)
    finally:
        await leave(members)
        if publishers is not None:
            await asyncio.to_thread(publishers.close)
        for ws in slow:
            ws.abort()
    new_log = stack.captured.of(target)[log_before:]

    assert not problems, problems
    assert gauge_cut_at is not None, f"{target} still counts the slow readers: {open_sockets(port)} open"
    assert refused == SLOW_READERS, f"slow_consumer refusals went up by {refused:g}, not {SLOW_READERS}"
    assert growth <= SLOW_READERS * MAX_PENDING_BYTES + RSS_ALLOWANCE, f"RSS grew {growth / MIB:.1f} MiB"
    assert all(code in ("close 4000", "TCP closed") for code in seen), seen
    assert not probe.problems(HEALTH_MAX_MS), probe.problems(HEALTH_MAX_MS)[:10]
    assert traceback_lines(new_log) == 0 and len(log_records(new_log)) < 200, log_records(new_log)[-20:]


# --- f) a full replica under crash attempts ------------------------------------------------


def test_a_full_replica_survives_crash_attempts_and_keeps_accepting(redis_server):
    """WS_MAX_CONNECTIONS=3: every slot is taken by a socket that tries to
    crash the replica (a 10,000-deep array, a 5,000-digit id, a flood that
    keeps sending after its 1008, invalid UTF-8, a 2 MiB frame, a frame cut
    off mid-way); afterwards the replica holds 0 sockets and accepts 3 again."""
    deep = '{"message":"x","id":' + "[" * DEEP + "]" * DEEP + "}"
    huge = '{"message":"x","id":' + "9" * 5000 + "}"
    huge_float = '{"message":"x","id":1' + "0" * 5000 + ".0}"

    def crash_round(daphne, path: str) -> list[str]:
        notes = []
        sockets = [rawws.RawWebSocket("127.0.0.1", daphne.port, path) for _ in range(3)]
        for ws in sockets:
            if path.startswith("/ws/chat/"):
                assert json.loads(ws.recv_frame(5).text)["type"] == "welcome"
        # Full: a fourth is told to come back later.
        with rawws.RawWebSocket("127.0.0.1", daphne.port, path) as fourth:
            fourth.frames_until_close(5)
            notes.append(f"fourth: {fourth.close_code}")
            assert fourth.close_code == 1013, notes
        a, b, c = sockets
        for text in (deep, huge, huge_float):
            a.send_text(text)
            reply = a.recv_frame(5)
            assert reply is not None and reply.opcode == rawws.TEXT, f"{path}: no answer to a crash attempt"
            assert '"error"' in reply.text, reply.text
        b.send_text(b'{"message":"\xc3\x28"}')
        b.frames_until_close(5)
        notes.append(f"invalid utf-8: {b.close_code}")
        c.send_raw(rawws.frame(rawws.TEXT, b'{"message":"cut', length=5000))
        c.abort()
        a.send_frame(rawws.TEXT, b"y" * (2 * MIB))
        a.frames_until_close(5)
        notes.append(f"2 MiB: {a.close_code}")
        assert a.close_code == 1009, notes
        for ws in sockets:
            ws.abort()
        return notes

    def flood_after_close(daphne) -> int | None:
        ws = rawws.RawWebSocket("127.0.0.1", daphne.port, "/ws/echo/")
        ws.duplex = True
        ws.sock.settimeout(0.5)
        closed = threading.Event()

        def read():
            while ws.recv_frame(10) is not None:
                if ws.close_code is not None:
                    break
            closed.set()

        reader = threading.Thread(target=read)
        reader.start()
        started = time.monotonic()
        while time.monotonic() - started < 10:
            ws.send_text('{"message":"flood"}')
            if closed.is_set() and time.monotonic() - started > 5:
                break
            time.sleep(0.001)
        # A second after the close, still sending.
        end = time.monotonic() + 1
        while time.monotonic() < end:
            ws.send_text('{"message":"flood"}')
        reader.join(10)
        ws.abort()
        return ws.close_code

    with LiveDaphne(
        redis_server.url, CHANNEL_LAYER="redis-fanout", WS_MAX_CONNECTIONS="3", DRAIN_TIMEOUT_SECONDS="2"
    ) as daphne:
        notes = []
        for path in ("/ws/echo/", "/ws/api/", "/ws/chat/full/"):
            notes += crash_round(daphne, path)
            assert wait_open_sockets({"d": daphne.port}, 0, 10) == {"d": 0}, notes
        assert flood_after_close(daphne) == 1008
        for _ in range(3):
            notes += crash_round(daphne, "/ws/chat/full/")
        readings = wait_open_sockets({"d": daphne.port}, 0, 10)
        alive = daphne.process.poll() is None
        status = healthz(daphne.port)[0] if alive else None

        async def three_new_sockets():
            url = f"ws://127.0.0.1:{daphne.port}"
            members = [await Member.join(url, daphne.origin, "full") for _ in range(3)]
            await members[0].ws.send(json.dumps({"message": "after", "id": "after", "sent_at": now_ms()}))
            await settle(members, ["after"], 5)
            got = [member.ids.get("after") for member in members]
            await leave(members)
            return got

        got = asyncio.run(three_new_sockets())
        final = wait_open_sockets({"d": daphne.port}, 0, 10)
        tracebacks = traceback_lines(daphne.lines)
    print(f"[full replica] {notes}")
    assert alive and status == 200
    assert readings == {"d": 0}, readings
    assert got == [1, 1, 1], got
    assert final == {"d": 0}, final
    assert tracebacks == 0, "\n".join(line for line in daphne.lines if "Traceback" in line)[:3000]
