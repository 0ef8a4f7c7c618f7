"""kill -9 of one Daphne replica while clients are connected.

Its sockets are closed (not left hanging), new sockets go to the live
replicas, and sockets on the other replicas keep receiving every message
published afterwards, exactly once. Started again, the replica takes new
sockets and its messages reach everyone.
"""

import asyncio
from collections import defaultdict

import pytest

from loadtest.fanout_check import FanoutReport, join, publish_http, tally, wait_for_deliveries
from tests.integration.running_stack import local_stack  # noqa: F401 (fixture)

pytestmark = pytest.mark.stack
ROOM = "failover"
VICTIM = "daphne-2"


async def deliver_exactly_once(url, members, publishers, token, deadline):
    """Every member gets one message from each publisher and from the HTTP API, once."""
    for member in members:
        member.deliveries.clear()  # count this round only
    messages = [await member.publish(f"after the kill, from {member.pod}") for member in publishers]
    messages.append(await publish_http(url, ROOM, token, "after the kill, from the API"))
    await wait_for_deliveries(members, {ROOM: messages}, deadline)
    report = FanoutReport(url, 1, len(members), 0)
    tally(report, members, {ROOM: messages})
    assert report.problems == []


async def test_killing_a_replica_leaves_every_other_socket_receiving(local_stack):  # noqa: F811
    stack = local_stack
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    # One at a time: least_conn deals them out evenly, three per replica.
    members = [await join(stack.url, ROOM, deadline=deadline) for _ in range(9)]
    by_pod = defaultdict(list)
    for member in members:
        by_pod[member.pod].append(member)
    assert {pod: len(m) for pod, m in by_pod.items()} == {name: 3 for name in stack.replica_names}

    await asyncio.to_thread(stack.kill_replica, VICTIM)
    # Closed by nginx once the upstream is gone, not hung until some timeout.
    await asyncio.wait_for(asyncio.gather(*(m.closed.wait() for m in by_pod[VICTIM])), timeout=5)

    survivors = [m for m in members if m.pod != VICTIM]
    publishers = [by_pod[name][0] for name in stack.replica_names if name != VICTIM]
    await deliver_exactly_once(stack.url, survivors, publishers, stack.broadcast_token, loop.time() + 10)

    # The dead replica has the fewest sockets, so least_conn tries it first:
    # refused there, nginx passes the handshake on to a live replica.
    newcomer = await join(stack.url, ROOM, deadline=loop.time() + 5, reconnect=False)
    assert newcomer.pod != VICTIM
    survivors.append(newcomer)

    await asyncio.to_thread(stack.start_replica, VICTIM)
    # nginx skips a replica for fail_timeout (5 s) after a failure; the first
    # socket after that lands on the restarted one, which has the fewest.
    returned = None
    restart_deadline = loop.time() + 15
    while returned is None:
        member = await join(stack.url, ROOM, deadline=restart_deadline, reconnect=False)
        if member.pod == VICTIM:
            returned = member
        else:
            await member.close()
            assert loop.time() < restart_deadline, f"no socket reached the restarted {VICTIM}"
            await asyncio.sleep(0.5)
    everyone = [*survivors, returned]
    await deliver_exactly_once(stack.url, everyone, [returned, *publishers], stack.broadcast_token, loop.time() + 10)
    await asyncio.gather(*(member.close() for member in everyone))
