"""A connection's ASGI input queue, lighter than the ``asyncio.Queue`` Daphne makes.

Daphne gives every connection an ``asyncio.Queue``: the protocol puts the
client's events in (``put_nowait``) and the application awaits them
(``receive``, the queue's ``get``). That queue holds four deques (its items,
its getters, its putters, its ``Event``'s waiters), about 3 KiB on every
socket, most of it empty for the socket's whole life: a profile of idle
sockets (make bench-profile) found it the largest single cost of an idle
Daphne socket after the protocol objects themselves.

This queue does the same two things in a few hundred bytes: its items are in
a deque only while some are waiting, and one getter waits at a time (an ASGI
application awaits ``receive`` from one task; Channels' consumers do). The
server uses it where Daphne's internals are verified (realtime.compat).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class InputQueue:
    __slots__ = ("_items", "_getter")

    def __init__(self) -> None:
        self._items: collections.deque | None = None
        self._getter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            if self._getter is not None:
                raise RuntimeError("an InputQueue is read by one task at a time")
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                # Cancelled or woken: the items stay for the next get.
                self._getter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item
