"""Rebalancing and the staggered drain with real replicas (the local stack, real Redis).

- A replica holding every socket, next to one that just started, hands
  sockets over with 1012 until it is inside the band; the members resume on
  the new one with nothing lost or twice.
- A drain closes its sockets in batches over its window, not all at once;
  its outcome (completed, or timed_out when a client holds its socket past
  DRAIN_TIMEOUT_SECONDS) is counted by the replicas that stay.

The compose proof, with scaling 3 -> 5, is tests/e2e/test_rebalancing.py.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from realtime import rebalancing
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loadtest.fanout_check import FanoutReport, publish_http, tally, wait_for_deliveries
from loadtest.room_member import RoomMember
from tests.integration.running_stack import checked_stack
from tests.metrics import metric_sum
from tests.processes import Daphne, wait_for
from tests.rawws import RawWebSocket

pytestmark = [pytest.mark.stack, pytest.mark.redis]

QUICK = {"REBALANCE_INTERVAL_SECONDS": "0.5", "REBALANCE_MIN_EXCESS": "5", "REBALANCE_MAX_SHARE": "0.2"}
ROOMS = ("rebalance-a", "rebalance-b")
MEMBERS = 40


def test_a_full_replica_hands_sockets_to_a_new_one_and_nothing_is_lost():
    with checked_stack(replicas=2, env=QUICK) as stack:
        full, new = (f"127.0.0.1:{port}" for port in stack.replica_ports.values())
        time.sleep(1.5)  # daphne-1's first look at the deployment's drain count
        stack.kill_replica("daphne-2", signal.SIGTERM)  # a drain of nothing: completed
        wait_for(
            lambda: metric_sum(full, "blueprint_deployment_drains_total", outcome="completed") == 1, 5, "the count"
        )

        async def scenario():
            loop = asyncio.get_running_loop()
            members = [RoomMember(stack.url, ROOMS[index % 2], backoff_cap=0.5) for index in range(MEMBERS)]
            await asyncio.gather(*(member.start(deadline=loop.time() + 20) for member in members))
            assert {member.pod for member in members} == {"daphne-1"}
            for member in members:
                member.deadline = loop.time() + 60
            published, stop = [], asyncio.Event()

            async def publish():
                n = 0
                while not stop.is_set():
                    room = ROOMS[n % 2]
                    published.append(await publish_http(stack.url, room, stack.broadcast_token, f"{room} {n}"))
                    n += 1
                    await asyncio.sleep(0.05)

            publisher = asyncio.ensure_future(publish())
            await asyncio.sleep(2)  # older than the youngest a replica moves (3 intervals)
            await asyncio.to_thread(stack.start_replica, "daphne-2")
            started = loop.time()
            # Mean 20, band max(1.2 x 20, 20 + 5) = 25: down to 25 on daphne-1, the rest on daphne-2.
            while loop.time() - started < 15:
                counts = [metric_sum(base, "blueprint_ws_open_sockets") for base in (full, new)]
                if counts[0] <= 25 and sum(counts) == MEMBERS:
                    break
                await asyncio.sleep(0.2)
            converged = loop.time() - started
            await asyncio.sleep(1)
            stop.set()
            await publisher
            expected = {room: [m for m in published if m.room == room] for room in ROOMS}
            await wait_for_deliveries(members, expected, loop.time() + 10)
            report = FanoutReport(stack.url, len(ROOMS), MEMBERS // 2, 2)
            tally(report, members, expected)
            await asyncio.gather(*(member.stop() for member in members))
            return members, counts, converged, report

        members, counts, converged, report = asyncio.run(scenario())
        print(f"converged to {counts} in {converged:.1f} s; {report.render_reconnects()}")
        assert counts[0] <= 25 and sum(counts) == MEMBERS, f"not converged within 15 s: {counts}"
        assert report.problems == [], report.render()
        moved = [reconnect for member in members for reconnect in member.reconnects]
        assert moved, "nothing was moved"
        assert {reconnect.lost.code for reconnect in moved} == {1012}
        assert all(reconnect.welcome.recovered is True for reconnect in moved), "a moved member was not recovered"
        assert metric_sum(full, "blueprint_ws_connections_refused_total", reason="rebalanced") == len(moved)
        assert MEMBERS - 25 <= len(moved) <= MEMBERS // 2 + 5, f"{len(moved)} moved for 15 needed"


async def _open_echo_sockets(daphne: Daphne, count: int) -> list:
    return list(
        await asyncio.gather(*(connect(daphne.ws("/ws/echo/"), origin=daphne.origin, proxy=None) for _ in range(count)))
    )


async def _close_times(sockets: list, timeout: float) -> list[float]:
    async def closed(socket) -> float:
        try:
            await asyncio.wait_for(socket.recv(), timeout)
        except ConnectionClosed:
            assert socket.close_code == 1001
            return time.monotonic()
        raise AssertionError("the socket got a frame, not its close")

    return list(await asyncio.gather(*(closed(socket) for socket in sockets)))


def test_a_drain_closes_in_batches_within_its_window_and_the_others_count_it(redis_server):
    sockets, timeout = 100, 5.0
    fanout = {"CHANNEL_LAYER": "redis-fanout", "REBALANCE_INTERVAL_SECONDS": "0.5"}
    with Daphne(redis_server.url, name="daphne-stays", **fanout) as staying:
        time.sleep(1)  # its first look at the drain count
        with Daphne(redis_server.url, name="daphne-drains", DRAIN_TIMEOUT_SECONDS=str(timeout), **fanout) as drained:

            async def scenario():
                opened = await _open_echo_sockets(drained, sockets)
                signalled = time.monotonic()
                drained.process.send_signal(signal.SIGTERM)
                return signalled, await _close_times(opened, timeout + 2)

            signalled, closes = asyncio.run(scenario())
            drained.process.wait(timeout=timeout + 5)
        assert drained.process.returncode == 0, drained.output
        assert f"drained {sockets} sockets; 0 still open at exit" in drained.output
        after = sorted(close - signalled for close in closes)
        window = rebalancing.drain_window(timeout)
        peak = max(sum(1 for t in after if start <= t < start + 1) for start in after)
        bound = rebalancing.drain_peak_per_second(sockets, timeout)
        print(
            f"{sockets} closes over {after[-1]:.2f} s (window {window} s), at most {peak} in a second (bound {bound})"
        )
        # Spread: not all at once, none after the window (plus the loop's and the client's lag).
        assert after[-1] >= window * 0.8 and after[-1] <= window + 0.5
        # 5 ticks of the batch size in any second, give or take a tick at the edges.
        assert peak <= bound + rebalancing.drain_schedule(sockets, timeout)[0]
        assert redis.Redis.from_url(redis_server.url).hget("asgi:replica-drains", "completed") == b"1"
        wait_for(
            lambda: metric_sum(staying.base, "blueprint_deployment_drains_total", outcome="completed") == 1,
            5,
            "the staying replica to count the drain",
        )


def test_a_drain_that_hits_its_timeout_is_counted_as_timed_out(redis_server):
    """A client that never answers the close frame holds its socket until
    autobahn's close handshake timeout drops it (1 s, in timer buckets of
    0.2 s), past a drain timeout of 0.05 s."""
    with Daphne(redis_server.url, name="daphne-stays", REBALANCE_INTERVAL_SECONDS="0.5") as staying:
        time.sleep(1)
        with Daphne(redis_server.url, name="daphne-drains", DRAIN_TIMEOUT_SECONDS="0.05") as drained:
            client = RawWebSocket("127.0.0.1", drained.port, "/ws/echo/", origin=drained.origin)
            wait_for(lambda: metric_sum(drained.base, "blueprint_ws_open_sockets") == 1, 5, "the socket to count")
            drained.process.send_signal(signal.SIGTERM)
            drained.process.wait(timeout=10)
            client.close()
        assert "drained 1 sockets; 1 still open at exit" in drained.output
        assert redis.Redis.from_url(redis_server.url).hget("asgi:replica-drains", "timed_out") == b"1"
        wait_for(
            lambda: metric_sum(staying.base, "blueprint_deployment_drains_total", outcome="timed_out") == 1,
            5,
            "the staying replica to count the timed-out drain",
        )
