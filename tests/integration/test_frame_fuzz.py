"""Random and mutated WebSocket frames against one live replica, over raw TCP.

Hypothesis builds each example: a valid handshake on one of the three
WebSocket endpoints, then frames no client library would send (random
opcodes and RSV bits, masked or not, length headers that lie, fragments out of
order, control frames with big payloads, bytes that are not frames, close
frames with any code and reason, mutated chat JSON), then the connection ends
(a close frame, FIN or a reset). The replica is Daphne as production runs it
(``python -m realtime.server``) on the fan-out layer and a real Redis.

After every example the replica must still run. At the end: its open-socket
gauge is exactly 0, /healthz answers 200, every 1011 a client saw came with a
logged reason (a warning or error line), and nothing failed unhandled.

    make test   FUZZ_EXAMPLES=150 (the default here), well under a minute
    make fuzz   FUZZ_EXAMPLES=2000, or any number: make fuzz FUZZ_EXAMPLES=10000
"""

from __future__ import annotations

import collections
import json
import os
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import example as explicit
from hypothesis import strategies as st

from tests import rawws
from tests.hostile import LiveDaphne, healthz, log_level, traceback_lines, wait_open_sockets

pytestmark = pytest.mark.redis

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
PATHS = ["/ws/echo/", "/ws/api/", "/ws/chat/fuzz/"]
READ_SECONDS = 0.15  # after the last byte: what the replica answers in that time is recorded
UNHANDLED = ("Task exception was never retrieved", "Unhandled error in Deferred", "Exception inside application")

# --- strategies ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
valid_chat = st.builds(
    lambda message, ident, extra: json.dumps({"message": message, "request": message, "id": ident, **extra}),
    st.text(max_size=60),
    json_values,
    st.dictionaries(st.text(max_size=6), json_values, max_size=2),
)


@st.composite
def mutated(draw, source=valid_chat) -> bytes:
    """Valid JSON with a few bytes flipped, inserted, deleted or duplicated."""
    data = bytearray(draw(source).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup", "tokens"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
        elif kind == "tokens":
            token = draw(
                st.sampled_from([b"NaN", b"-Infinity", b"1e400", b"9" * 30, b"[" * 40, b'"\\ud800"', b"\\", b"\x00"])
            )
            data[at:at] = token
    return bytes(data)


random_frame = st.builds(
    lambda opcode, payload, fin, rsv, mask, lie, form: rawws.frame(
        opcode, payload, fin=fin, rsv=rsv, mask=mask, length=lie, length_form=form
    ),
    st.integers(0, 15),
    st.binary(max_size=300),
    st.booleans(),
    st.sampled_from([0, 0, 0, 1, 2, 4, 7]),
    st.sampled_from([True, True, True, False]),
    st.one_of(st.none(), st.none(), st.integers(0, 70_000), st.sampled_from([2**31, 2**32 + 5, 2**63 - 1, 2**64 - 1])),
    st.sampled_from([None, None, None, "7", "16", "64"]),
)
big_control = st.builds(
    lambda opcode, payload: rawws.frame(opcode, payload),
    st.sampled_from([rawws.CLOSE, rawws.PING, rawws.PONG]),
    st.binary(min_size=126, max_size=2000),
)
small_control = st.builds(
    lambda opcode, payload: rawws.frame(opcode, payload),
    st.sampled_from([rawws.PING, rawws.PONG]),
    st.binary(max_size=125),
)
close_frame = st.builds(
    lambda code, reason, short: rawws.frame(rawws.CLOSE, b"\x03" if short else code.to_bytes(2, "big") + reason),
    st.integers(0, 65535) | st.sampled_from([1000, 1001, 1005, 1006, 1011, 1015, 2999, 3000, 4999, 5000]),
    st.binary(max_size=60) | st.text(max_size=40).map(lambda t: t.encode()),
    st.booleans(),
)
text_frame = st.builds(lambda data: rawws.frame(rawws.TEXT, data), mutated() | valid_chat.map(str.encode))
binary_frame = st.builds(
    lambda data: rawws.frame(rawws.BINARY, data), st.binary(max_size=200) | valid_chat.map(str.encode)
)
junk = st.binary(min_size=1, max_size=500)


@st.composite
def fragmented(draw) -> bytes:
    """A text message in fragments; sometimes with a ping in between, a
    continuation first, a second text start, or an opcode on a continuation."""
    data = draw(mutated() | valid_chat.map(str.encode))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=1, max_size=5)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out = []
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        opcode = rawws.TEXT if index == 0 else rawws.CONTINUATION
        if draw(st.integers(0, 9)) == 0:
            opcode = draw(st.sampled_from([rawws.TEXT, rawws.BINARY, rawws.CONTINUATION, 3, 11]))
        out.append(rawws.frame(opcode, piece, fin=last))
        if not last and draw(st.integers(0, 4)) == 0:
            out.append(draw(small_control | big_control))
    return b"".join(out)


chunk = st.one_of(random_frame, big_control, small_control, close_frame, text_frame, binary_frame, junk, fragmented())
example = st.fixed_dictionaries(
    {
        "path": st.sampled_from(PATHS),
        "chunks": st.lists(chunk, min_size=1, max_size=6),
        # Sometimes every chunk in its own write (the server parses across reads).
        "separate_writes": st.booleans(),
        "then_valid": st.booleans(),
        # reset-now: a reset right behind the last byte, before the replica answers.
        "ending": st.sampled_from(["fin", "reset", "reset-now", "close-frame"]),
    }
)


# --- the test ----------------------------------------------------------------------


def run_example(daphne: LiveDaphne, case: dict) -> tuple[int | None, list[int]]:
    """(the close code the replica sent or None, opcodes of the frames it sent)."""
    try:
        ws = rawws.RawWebSocket("127.0.0.1", daphne.port, case["path"], timeout=5)
    except rawws.HandshakeRefused as refused:
        raise AssertionError(f"a valid handshake was refused: {refused.status_line}") from None
    try:
        data = list(case["chunks"])
        if case["then_valid"]:
            data.append(rawws.frame(rawws.TEXT, b'{"message":"valid","request":"valid"}'))
        if case["separate_writes"]:
            for piece in data:
                if not ws.send_raw(piece):
                    break
        else:
            ws.send_raw(b"".join(data))
        if case["ending"] == "reset-now":
            return None, []
        frames = ws.frames_until_close(READ_SECONDS)
        if case["ending"] == "close-frame" and ws.close_code is None:
            ws.send_close(1000)
            frames += ws.frames_until_close(READ_SECONDS)
        return ws.close_code, [frame.opcode for frame in frames]
    finally:
        if case["ending"] in ("reset", "reset-now"):
            ws.abort()
        else:
            ws.close()


def test_random_and_mutated_frames_leave_the_replica_healthy_and_leak_nothing(redis_server):
    codes: collections.Counter = collections.Counter()
    unlogged_1011: list[str] = []
    examples = 0

    with LiveDaphne(
        redis_server.url, name="daphne-fuzz", CHANNEL_LAYER="redis-fanout", DRAIN_TIMEOUT_SECONDS="2"
    ) as daphne:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.explicit, Phase.generate],  # a dead replica cannot be shrunk against
            suppress_health_check=list(HealthCheck),
        )
        @given(case=example)
        # Found by this fuzzer: a frame cut short, then a reset at once, left
        # the socket counted (a slot leaked). Always tried first.
        @explicit(
            case={
                "path": "/ws/echo/",
                "separate_writes": False,
                "then_valid": False,
                "ending": "reset-now",
                "chunks": [rawws.frame(rawws.TEXT, b'{"message":"cut', length=5000)],
            }
        )
        def fuzz(case):
            nonlocal examples
            examples += 1
            log_mark = len(daphne.lines)
            code, _ = run_example(daphne, case)
            codes[code] += 1
            if code == 1011:
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    if any(log_level(line) in ("warning", "error", "critical") for line in daphne.lines[log_mark:]):
                        break
                    time.sleep(0.05)
                else:
                    unlogged_1011.append(repr(case)[:500])
            assert daphne.process.poll() is None, f"the replica died on this example: {case!r}"[:3000]

        started = time.monotonic()
        fuzz()
        elapsed = time.monotonic() - started
        gauge = wait_open_sockets({daphne.name: daphne.port}, 0, timeout=15)
        status = healthz(daphne.port)[0]
        alive = daphne.process.poll() is None
        lines = list(daphne.lines)

    errors = [line for line in lines if log_level(line) in ("error", "critical")]
    unhandled = [line for line in lines if any(marker in line for marker in UNHANDLED)]
    print(
        f"[frame fuzz] {examples} examples in {elapsed:.1f} s; close codes seen: "
        f"{dict(sorted(codes.items(), key=lambda item: (item[0] is None, item[0] or 0)))}; "
        f"replica log: {len(lines)} lines, {len(errors)} at error level, {traceback_lines(lines)} with a traceback"
    )
    assert alive and status == 200
    assert gauge == {daphne.name: 0}, f"open-socket gauge after every example ended: {gauge}"
    assert not unlogged_1011, f"{len(unlogged_1011)} closes with 1011 had no logged reason, e.g. {unlogged_1011[:3]}"
    assert not unhandled, f"{len(unhandled)} unhandled failures in the replica's log, e.g.:\n" + "\n".join(
        line[:1500] for line in unhandled[:3]
    )
