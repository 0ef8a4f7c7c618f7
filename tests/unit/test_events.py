"""The event the fan-out layer shares among a room's members: read-only all the way down."""

import copy
import json

import msgpack
import pytest
from realtime.events import SharedEvent


def shared() -> SharedEvent:
    return SharedEvent.frozen(
        {"type": "chat.message", "message": "hi", "id": {"tags": ["a", "b"]}}, offset=3, epoch="e"
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda event: event.__setitem__("message", "changed"),
        lambda event: event.__delitem__("message"),
        lambda event: event.update(message="changed"),
        lambda event: event.setdefault("extra", 1),
        lambda event: event.pop("message"),
        lambda event: event.popitem(),
        lambda event: event.clear(),
        lambda event: event.__ior__({"message": "changed"}),
        lambda event: event["id"].__setitem__("tags", []),
    ],
)
def test_every_change_to_a_shared_event_raises_and_changes_nothing(change):
    event = shared()
    with pytest.raises(TypeError, match="read-only: change a copy"):
        change(event)
    assert event == {"type": "chat.message", "message": "hi", "id": {"tags": ("a", "b")}, "offset": 3, "epoch": "e"}


def test_arrays_in_a_shared_event_are_tuples():
    with pytest.raises(AttributeError):
        shared()["id"]["tags"].append("c")


def test_a_copy_is_a_plain_dict_to_change():
    event = shared()
    for mine in (dict(event), copy.copy(event), copy.deepcopy(event)):
        mine["message"] = "mine"
        assert type(mine) is dict and event["message"] == "hi"


def test_a_shared_event_encodes_as_the_message_it_came_from():
    event = shared()
    expected = {"type": "chat.message", "message": "hi", "id": {"tags": ["a", "b"]}, "offset": 3, "epoch": "e"}
    assert json.loads(json.dumps(event)) == expected
    assert msgpack.unpackb(msgpack.packb(event)) == expected


def test_what_is_made_of_an_event_is_made_once():
    event, calls = shared(), []

    def frame(of: SharedEvent) -> str:
        calls.append(of)
        return json.dumps(of)

    assert event.made(frame) is event.made(frame)
    assert len(calls) == 1
