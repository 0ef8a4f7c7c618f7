"""Every consumer, exactly per the wire protocol, on the in-memory layer."""

import json

import pytest
from channels.layers import get_channel_layer

from tests.ws import connect, join


async def test_echo_returns_the_message_stamped_with_the_replica():
    socket, connected = await connect("/ws/echo/")
    assert connected
    await socket.send_json_to({"message": {"nested": [1, "two"]}, "ignored": True})
    assert await socket.receive_json_from() == {"message": {"nested": [1, "two"]}, "served_by": "pod-test"}
    await socket.disconnect()


async def test_api_answers_ok_with_the_request_data():
    socket, _ = await connect("/ws/api/")
    await socket.send_json_to({"request": [1, 2, 3]})
    assert await socket.receive_json_from() == {"status": "OK", "data": [1, 2, 3]}
    await socket.disconnect()


async def test_chat_welcomes_with_room_and_pod():
    socket, connected = await connect("/ws/chat/lobby/")
    assert connected
    assert await socket.receive_json_from() == {"type": "welcome", "room": "lobby", "pod": "pod-test"}
    await socket.disconnect()


async def test_chat_message_reaches_every_member_with_passthrough_fields():
    alice, bob = await join("room-1"), await join("room-1")
    await alice.send_json_to({"message": "hi", "id": "m-1", "sent_at": 12.5, "extra": "dropped"})
    expected = {
        "type": "chat.message",
        "message": "hi",
        "id": "m-1",
        "sent_at": 12.5,
        "origin": "pod-test",
        "served_by": "pod-test",
    }
    assert await alice.receive_json_from() == expected
    assert await bob.receive_json_from() == expected
    await alice.disconnect()
    await bob.disconnect()


async def test_rooms_are_isolated():
    alice, carol = await join("a"), await join("b")
    await alice.send_json_to({"message": "only a"})
    await alice.receive_json_from()
    assert await carol.receive_nothing(timeout=0.2)
    await alice.disconnect()
    await carol.disconnect()


async def test_disconnect_leaves_the_group():
    layer = get_channel_layer()
    alice = await join("leaving")
    assert len(layer.groups["chat.leaving"]) == 1
    await alice.disconnect()
    assert "chat.leaving" not in layer.groups or not layer.groups["chat.leaving"]


BAD_FRAMES = [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('"just a string"', "bad_json"),
    ("{}", "bad_schema"),
    ('{"message": 42}', "bad_schema"),
    ('{"message": null}', "bad_schema"),
]


@pytest.mark.parametrize("frame,code", BAD_FRAMES)
async def test_chat_bad_frames_get_an_error_and_the_socket_stays_usable(frame, code):
    socket = await join("errors")
    await socket.send_to(text_data=frame)
    error = await socket.receive_json_from()
    assert error["type"] == "error" and error["code"] == code and error["detail"]
    await socket.send_json_to({"message": "still here"})
    assert (await socket.receive_json_from())["message"] == "still here"
    await socket.disconnect()


async def test_binary_frames_are_refused_with_a_clear_error():
    for path in ("/ws/echo/", "/ws/api/", "/ws/chat/bin/"):
        socket, _ = await connect(path)
        if path.startswith("/ws/chat/"):
            await socket.receive_json_from()
        await socket.send_to(bytes_data=b"\x00\x01binary")
        reply = await socket.receive_json_from()
        assert "binary frames are not accepted" in json.dumps(reply)
        await socket.disconnect()


async def test_oversize_frames_get_too_large_and_the_socket_stays_usable(settings):
    settings.WS_MAX_MESSAGE_BYTES = 1024
    socket = await join("big")
    await socket.send_json_to({"message": "é" * 600})  # 1200 bytes of UTF-8, 600 characters
    assert (await socket.receive_json_from())["code"] == "too_large"
    await socket.send_json_to({"message": "small"})
    assert (await socket.receive_json_from())["message"] == "small"
    await socket.disconnect()


async def test_echo_and_api_report_bad_input_in_their_own_shape():
    echo, _ = await connect("/ws/echo/")
    await echo.send_to(text_data="{")
    assert (await echo.receive_json_from())["code"] == "bad_json"
    await echo.send_json_to({"no_message": 1})
    assert (await echo.receive_json_from())["code"] == "bad_schema"
    await echo.disconnect()

    api, _ = await connect("/ws/api/")
    await api.send_to(text_data="{")
    reply = await api.receive_json_from()
    assert reply["status"] == "error" and reply["error"].startswith("bad_json")
    await api.send_json_to({"not_request": 1})
    reply = await api.receive_json_from()
    assert reply["status"] == "error" and "request" in reply["error"]
    await api.send_json_to({"request": "ok"})
    assert await api.receive_json_from() == {"status": "OK", "data": "ok"}
    await api.disconnect()


@pytest.mark.parametrize("room", ["has space", "x" * 65, "semi;colon", "%C3%A9"])
async def test_invalid_room_names_are_refused_at_the_handshake(room):
    _, connected = await connect(f"/ws/chat/{room}/")
    assert not connected


async def test_unknown_paths_are_refused_at_the_handshake():
    _, connected = await connect("/ws/nowhere/")
    assert not connected


async def test_a_cross_site_origin_is_refused_at_the_handshake():
    _, connected = await connect("/ws/echo/", origin=(b"origin", b"https://evil.example"))
    assert not connected
