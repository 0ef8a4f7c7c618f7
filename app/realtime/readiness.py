"""Readiness of this process, cheap to ask for.

/readyz used to run a channel-layer round trip per request, and under gunicorn
a new event loop per request too (async_to_sync): about 105 ms each, and 16
probes in parallel raised the broadcast API's latency from 6 ms to 770 ms.
Now one check at a time runs per process, and its result is reused:

- a result younger than READYZ_CACHE_SECONDS is the answer;
- an older one is still the answer while it is younger than READYZ_CACHE_SECONDS
  + READYZ_TIMEOUT_SECONDS, and one check starts in the background to replace
  it. A check started when a result expires ends within READYZ_TIMEOUT_SECONDS,
  so requests that keep coming never wait;
- with no result that recent (the first request, or the first after a quiet
  spell, such as a kubelet probing every few seconds) the request waits for
  the check, which READYZ_TIMEOUT_SECONDS bounds. No answer comes from a check
  that ended more than READYZ_CACHE_SECONDS + READYZ_TIMEOUT_SECONDS ago.

Draining, overload and a lost Redis subscription link are read at request
time: they need no check.

Under Daphne the check is a task on the server's own loop, so it goes through
the connections the consumers use. gunicorn's sync workers have no loop: one
daemon thread per worker runs one for the checks, which also keeps the layer's
Redis connections from one check to the next.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from channels.layers import get_channel_layer
from django.conf import settings

from realtime.replica import state

logger = logging.getLogger(__name__)

# A check ends within READYZ_TIMEOUT_SECONDS by itself; waiting this much
# longer only guards against a loop that stopped running checks at all.
WAIT_MARGIN_SECONDS = 1.0
TIMED_OUT = "channel layer: timed out"


@dataclass(frozen=True)
class Result:
    reason: str  # why the replica is not ready; empty when the layer answered
    finished: float  # time.monotonic() when the check ended


class Readiness:
    def __init__(self) -> None:
        self._result: Result | None = None
        self._task: asyncio.Task | None = None  # Daphne: the check in flight
        self._future: concurrent.futures.Future | None = None  # gunicorn: the check in flight
        self._loop: asyncio.AbstractEventLoop | None = None  # gunicorn: the checks' own loop
        self._lock = threading.Lock()  # gunicorn's threaded workers: one check, one loop
        self._channel: tuple[object, str] | None = None  # (layer, channel) the checks reuse
        self._reported = ""

    async def reason_async(self) -> str:
        """Why this replica is not ready ("" when it is), from a request on a running loop."""
        if reason := self._local_reason():
            return self._report(reason)
        result, stale = self._cached()
        if stale:
            task = self._task
            # A task of another loop (a test's, a closed one) would never finish here.
            if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
                task = self._task = asyncio.ensure_future(self._check())
            if result is None:
                # asyncio.wait, not await: a client that hangs up cancels its
                # request, and must not cancel the check other requests share.
                await asyncio.wait({task}, timeout=settings.READYZ_TIMEOUT_SECONDS + WAIT_MARGIN_SECONDS)
                result = self._result if task.done() else None
        return self._report(result.reason if result else TIMED_OUT)

    def reason_sync(self) -> str:
        """Why this replica is not ready ("" when it is), from a request in a thread without a loop."""
        if reason := self._local_reason():
            return self._report(reason)
        result, stale = self._cached()
        if stale:
            with self._lock:
                future = self._future
                if future is None or future.done():
                    future = self._future = asyncio.run_coroutine_threadsafe(self._check(), self._checks_loop())
            if result is None:
                concurrent.futures.wait([future], timeout=settings.READYZ_TIMEOUT_SECONDS + WAIT_MARGIN_SECONDS)
                result = self._result if future.done() else None
        return self._report(result.reason if result else TIMED_OUT)

    @staticmethod
    def _local_reason() -> str:
        if state.draining:
            return "draining"
        if state.overloaded:
            return "overloaded"
        if state.redis_links_down:
            return "lost the Redis subscription link"
        return ""

    def _cached(self) -> tuple[Result | None, bool]:
        """(the result to answer from, if any; whether to start a check)."""
        result = self._result
        if result is None:
            return None, True
        age = time.monotonic() - result.finished
        usable = age <= settings.READYZ_CACHE_SECONDS + settings.READYZ_TIMEOUT_SECONDS
        return (result if usable else None), age > settings.READYZ_CACHE_SECONDS

    async def _check(self) -> None:
        try:
            await asyncio.wait_for(self._round_trip(), settings.READYZ_TIMEOUT_SECONDS)
            reason = ""
        except TimeoutError:
            reason = TIMED_OUT
        except Exception as error:  # whatever the layer raises, the replica is not ready
            reason = f"channel layer: {type(error).__name__}: {error}"
        if reason:
            # The pub/sub layers drop a channel whose receive was cancelled; a
            # reply to this check could also still arrive on it. Next time, a new one.
            self._channel = None
        self._result = Result(reason, time.monotonic())

    async def _round_trip(self) -> None:
        layer = get_channel_layer()
        # One channel for every check while they succeed: the pub/sub layers
        # keep a channel subscribed until a receive on it is cancelled, so a
        # new channel per check would add a Redis subscription per check.
        if self._channel is None or self._channel[0] is not layer:
            # The default prefix, as the consumers' channels: the core layer
            # keeps all of a process's channels of one prefix in one Redis
            # list, read by one receive at a time. A channel of its own prefix
            # lands in another list, which a consumer's pending receive does
            # not read: readiness then timed out whenever a socket was open.
            self._channel = (layer, await layer.new_channel())
        channel = self._channel[1]
        nonce = secrets.token_hex(8)
        await layer.send(channel, {"type": "readyz.ping", "nonce": nonce})
        message = await layer.receive(channel)
        if message.get("nonce") != nonce:
            raise RuntimeError("round trip returned another message")

    def _checks_loop(self) -> asyncio.AbstractEventLoop:
        # Started on first use, in the worker: a thread started before
        # gunicorn forks would not exist in the workers.
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="readyz-checks", daemon=True).start()
            self._loop = loop
        return self._loop

    def _report(self, reason: str) -> str:
        # Once per change, not once per probe. The reason may name Redis's
        # address: it goes to the log and to direct requests only.
        if reason != self._reported:
            if reason:
                logger.warning("not ready: %s", reason)
            else:
                logger.info("ready again: the channel layer answers")
            self._reported = reason
        return reason


readiness = Readiness()
