"""Property: whatever frame arrives, the consumer answers it and stays usable.

Hypothesis throws random text and binary frames (JSON-shaped and not) at each
consumer; after every frame the same socket must still answer a valid message.
"""

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ws import connect

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Objects that look almost right: the protocol's field names with values of any type.
near_miss_objects = st.dictionaries(
    st.sampled_from(["message", "request", "id", "sent_at", "type"]) | st.text(max_size=6), json_values, max_size=5
)
frames = st.one_of(
    st.text(max_size=300).map(lambda text: ("text", text)),
    st.binary(max_size=300).map(lambda data: ("bytes", data)),
    json_values.map(lambda value: ("text", json.dumps(value))),
    near_miss_objects.map(lambda value: ("text", json.dumps(value))),
    # Lone surrogates survive json.loads: they must not break the reply's encoding.
    st.just(("text", '{"message": "\\ud800", "id": "\\udfff"}')),
)

CONSUMERS = {
    "/ws/echo/": ({"message": "ping"}, lambda reply: reply.get("message") == "ping"),
    "/ws/api/": ({"request": "ping"}, lambda reply: reply == {"status": "OK", "data": "ping"}),
    "/ws/chat/fuzz/": (
        {"message": "ping"},
        lambda reply: reply.get("type") == "chat.message" and reply["message"] == "ping",
    ),
}


async def survives(path: str, kind: str, payload) -> None:
    socket, connected = await connect(path)
    assert connected
    if path.startswith("/ws/chat/"):
        await socket.receive_json_from()  # welcome
    # send_input, not send_to: the communicator refuses empty frames, a real client may not.
    await socket.send_input({"type": "websocket.receive", kind: payload})
    valid, is_answer = CONSUMERS[path]
    await socket.send_json_to(valid)
    # The random frame gets a reply or an error frame, then the valid one is answered.
    for _ in range(3):
        reply = json.loads(await socket.receive_from(timeout=2))
        if is_answer(reply):
            break
    else:
        raise AssertionError(f"{path} stopped answering after {kind} frame {payload!r}")
    await socket.disconnect()


fuzz_settings = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz_settings
@given(frame=frames)
def test_echo_survives_any_frame(frame):
    asyncio.run(survives("/ws/echo/", *frame))


@fuzz_settings
@given(frame=frames)
def test_api_survives_any_frame(frame):
    asyncio.run(survives("/ws/api/", *frame))


@fuzz_settings
@given(frame=frames)
def test_chat_survives_any_frame(frame):
    asyncio.run(survives("/ws/chat/fuzz/", *frame))
