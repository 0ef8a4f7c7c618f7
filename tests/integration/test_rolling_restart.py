"""A rolling restart of every replica, one at a time, under traffic.

Each drained replica closes its sockets with 1001; clients reconnect through
nginx to the others; every client ends connected, and every message published
after a client's last (re)connection reaches it.
"""

import asyncio
import signal
import time

import pytest

from loadtest.fanout_check import join, now_ms, publish_http
from tests.integration.running_stack import checked_stack

pytestmark = pytest.mark.stack

ROOMS = ["roll-a", "roll-b", "roll-c"]
CLIENTS_PER_ROOM = 6


class ReconnectingClient:
    """Stays in its room: on every close it joins again (with jittered backoff, via join)."""

    def __init__(self, base_url: str, room: str):
        self.base_url, self.room = base_url, room
        self.member = None
        self.joined_at = 0.0
        self.close_codes: list[int | None] = []
        self.pods: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self.member = await join(self.base_url, self.room, deadline=loop.time() + 30)
            self.joined_at = now_ms()
            self.pods.append(self.member.pod)
            closed = asyncio.ensure_future(self.member.closed.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel(), stopped.cancel()
            if self.member.closed.is_set():
                self.close_codes.append(self.member.ws.close_code)


async def traffic(stack):
    stop = asyncio.Event()
    clients = [ReconnectingClient(stack.url, room) for room in ROOMS for _ in range(CLIENTS_PER_ROOM)]
    runners = [asyncio.ensure_future(client.run(stop)) for client in clients]
    published = []

    async def publish_forever():
        while not stop.is_set():
            for room in ROOMS:
                published.append(await publish_http(stack.url, room, stack.broadcast_token, "tick"))
            await asyncio.sleep(0.1)

    publisher = asyncio.ensure_future(publish_forever())
    while not all(client.member for client in clients):
        await asyncio.sleep(0.05)
    for name in stack.replica_names:
        await asyncio.to_thread(stack.kill_replica, name, signal.SIGTERM)
        await asyncio.to_thread(stack.start_replica, name)
        await asyncio.sleep(1)
    await asyncio.sleep(2)
    stop.set()
    await publisher
    await asyncio.sleep(1)  # let the last publishes arrive
    await asyncio.gather(*runners)
    for client in clients:
        client.connected_at_end = not client.member.closed.is_set()
        await client.member.close()
    return clients, published


def test_rolling_restart_under_traffic_loses_no_client_and_no_message():
    with checked_stack(replicas=3, env={"DRAIN_TIMEOUT_SECONDS": "5"}) as stack:
        started = time.monotonic()
        clients, published = asyncio.run(traffic(stack))
        print(
            f"rolling restart of 3 replicas took {time.monotonic() - started:.1f} s, {len(published)} messages "
            "published"
        )
        problems = []
        for client in clients:
            assert client.connected_at_end, f"a client in {client.room} ended disconnected"
            due = [m.id for m in published if m.room == client.room and m.sent_at > client.joined_at]
            missing = [message_id for message_id in due if not client.member.deliveries.get(message_id)]
            if missing:
                problems.append(f"{client.room} on {client.member.pod}: {len(missing)} of {len(due)} missing")
            assert all(code == 1001 for code in client.close_codes), f"closes were not 1001: {client.close_codes}"
        assert not problems, problems
        moved = sum(1 for client in clients if len(client.pods) > 1)
        assert moved == len(clients), f"only {moved} of {len(clients)} clients were drained and reconnected"
