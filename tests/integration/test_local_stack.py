"""The whole scaled topology on one machine: fan-out across every pair of replicas through nginx."""

import asyncio
import signal

import pytest

from loadtest.fanout_check import run_fanout_check
from tests.integration.running_stack import checked_stack, local_stack  # noqa: F401 (fixture)
from tests.processes import status_of

pytestmark = pytest.mark.stack


async def test_sixty_sockets_in_six_rooms_get_every_message_from_every_replica_and_the_api(local_stack):  # noqa: F811
    report = await run_fanout_check(
        local_stack.url, rooms=6, clients_per_room=10, expect_replicas=3, broadcast_token=local_stack.broadcast_token
    )
    print(report.render())
    assert report.ok, report.render()
    assert report.replicas == set(local_stack.replica_names)
    assert sum(report.sockets.values()) == 60
    # Every socket got one message from each replica and one from the API:
    # a column of the matrix is the number of sockets on that replica.
    for origin in [*local_stack.replica_names, "gunicorn"]:
        for served_by in local_stack.replica_names:
            assert report.matrix[(origin, served_by)] == report.sockets[served_by], report.render()
    assert "gunicorn" in report.render() and "p99" in report.render()

    # Metrics are scraped from each replica, never served through the entry point.
    assert status_of(f"{local_stack.url}/metrics") == 404
    for name, port in local_stack.replica_ports.items():
        assert status_of(f"http://127.0.0.1:{port}/metrics") == 200, name


async def test_the_check_fails_when_replicas_do_not_share_a_channel_layer():
    # Each replica with its own in-memory layer: the topology the blueprint
    # exists to avoid. The check must see every cross-replica loss.
    with checked_stack(replicas=2, channel_layer="memory") as stack:
        report = await run_fanout_check(
            stack.url, rooms=2, clients_per_room=4, expect_replicas=2, broadcast_token=stack.broadcast_token, timeout=3
        )
    assert not report.ok
    assert report.matrix.get(("daphne-1", "daphne-2"), 0) == 0
    assert any("never got daphne-1's message" in problem for problem in report.problems), report.problems
    assert "no delivery from daphne-1 to a socket on daphne-2" in report.problems
    assert "verdict: FAIL" in report.render()


async def test_members_resume_through_a_killed_and_restarted_replica_and_get_every_message_once(local_stack):  # noqa: F811
    # kill -9 of a replica while a round is being published and delivered, and
    # two other members losing their sockets to the network: every member keeps
    # its identity, resumes, and the check still passes, each message once.
    stack, victim = local_stack, "daphne-2"
    chaos = {}

    async def before_round(number, members):
        if number == 2:

            async def kill():
                await asyncio.sleep(0.05)  # after this round's publishes are on their way
                await asyncio.to_thread(stack.kill_replica, victim, signal.SIGKILL)

            chaos["kill"] = asyncio.ensure_future(kill())
        elif number == 3:
            await chaos["kill"]
            bystanders = [m for m in members if m.welcomes[0].pod != victim and m.connected][:2]
            chaos["dropped"] = bystanders
            for member in bystanders:
                await member.drop()
            await asyncio.to_thread(stack.start_replica, victim)

    report = await run_fanout_check(
        stack.url,
        rooms=3,
        clients_per_room=6,
        expect_replicas=3,
        broadcast_token=stack.broadcast_token,
        rounds=4,
        round_interval=0.3,
        before_round=before_round,
    )
    print(report.render())
    assert report.ok, report.render()
    moved = [r for r in report.reconnects if r.lost.pod == victim]
    # Every member of the killed replica came back on another one, with nothing missed.
    assert len(moved) == report.sockets[victim] > 0, report.render()
    assert all(r.welcome.pod != victim for r in moved)
    assert len(report.reconnects) == len(moved) + 2, report.render()
    assert all(r.lost.code == 1006 for r in report.reconnects)  # no close frame from a dead replica, nor a cut
    assert all(r.welcome.recovered is True for r in report.reconnects), report.render()
    assert report.unrecovered_resumes == report.told_missing == 0
    for member in chaos["dropped"]:
        assert len(member.welcomes) == 2 and member.connected is False  # stopped at the end of the check
    assert f"through {len(report.reconnects)} reconnects" in report.render()
