"""The connection input queue the replicas use instead of Daphne's asyncio.Queue."""

import asyncio
import collections
import sys

import pytest
from realtime.input_queue import InputQueue


async def test_items_come_out_in_order_and_a_waiting_get_is_woken_by_a_put():
    queue = InputQueue()
    queue.put_nowait({"type": "websocket.connect"})
    assert await queue.get() == {"type": "websocket.connect"}
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert await waiting == 1
    assert await asyncio.wait_for(queue.get(), 1) == 2
    nothing_left = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0.01)
    assert not nothing_left.done()
    nothing_left.cancel()


async def test_a_cancelled_get_loses_nothing():
    queue = InputQueue()
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queue.put_nowait("after")
    assert await asyncio.wait_for(queue.get(), 1) == "after"


async def test_two_tasks_reading_at_once_is_refused_not_left_hanging():
    queue = InputQueue()
    first = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one task at a time"):
        await queue.get()
    queue.put_nowait("x")
    assert await first == "x"


def test_an_idle_queue_is_a_fraction_of_an_asyncio_queue():
    # What the socket holds while it waits: the queue's own object, no deque.
    # (An empty deque alone is over 600 bytes; asyncio.Queue holds four.)
    queue = InputQueue()
    queue.put_nowait("connect")
    asyncio.run(queue.get())
    assert sys.getsizeof(queue) < 100 and queue._items is None  # no deque held between events
    assert sys.getsizeof(collections.deque()) > 500


def test_it_is_truthy_as_daphne_expects_of_an_application_queue():
    # Daphne's HTTP protocol tests ``if self.application_queue:``.
    assert InputQueue()
