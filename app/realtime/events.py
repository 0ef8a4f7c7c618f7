"""Events handed to many handlers at once: read-only, and what is made of them made once.

The fan-out layer decodes a group message once per replica and awaits every
member's handler with that one object (``realtime.layers``). A handler that
changed it would change what its roommates get, so it is a ``SharedEvent``:
a dict whose every mutating method raises, with the objects and arrays in it
frozen too (an array becomes a tuple). ``dict(event)`` is a copy to change.

What each member would make of the event the same way, its frame above all,
is made by the first and kept on the event for the others (``made``); the
frame, a ``SharedFrame``, keeps the WebSocket frame autobahn builds from it
the same way (``prepared``). Nothing is cached by identity anywhere else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

Made = TypeVar("Made")


class SharedEvent(dict):
    __slots__ = ("_made",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._made: dict | None = None

    @classmethod
    def frozen(cls, message: dict, **fields) -> SharedEvent:
        """``message`` and ``fields``, read-only all the way down."""
        return cls({key: _frozen(value) for key, value in message.items()}, **fields)

    def _read_only(self, *args, **kwargs):
        raise TypeError(
            "this event is shared by every member of the room on the replica and is read-only: "
            "change a copy, dict(event)"
        )

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __copy__(self) -> dict:
        return dict(self)

    def __deepcopy__(self, memo) -> dict:
        return copy.deepcopy(dict(self), memo)

    def made(self, make: Callable[[SharedEvent], Made]) -> Made:
        """``make(self)``, made by the first caller and kept for the others."""
        made = self._made
        if made is None:
            made = self._made = {}
        try:
            return made[make]
        except KeyError:
            result = made[make] = make(self)
            return result


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return SharedEvent.frozen(value)
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value


class SharedFrame(str):
    """A text frame sent to many sockets: framed once for all of them."""

    def prepared(self, factory):
        """autobahn's prepared message for this text, built by the first socket.

        Every socket of a replica has the same factory; a frame is rebuilt
        for another one all the same, rather than sent with its options.
        """
        try:
            built_by, message = self._prepared
            if built_by is factory:
                return message
        except AttributeError:
            pass
        message = factory.prepareMessage(self.encode("utf8"))
        self._prepared = (factory, message)
        return message
