"""The compose stack end to end: real images, containers as replicas, nginx in front.

One stack for the module (`make up` with 3 daphne replicas, `make down` at
the end); the tests run in file order and each leaves it serving: fan-out
across containers, a killed replica, scaling out with sockets open, a Redis
restart and a Redis outage.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import urllib.request
from collections import defaultdict

import pytest

from loadtest.compose_stack import LOADTEST_IMAGE, ComposeStack, docker_inspect, run
from loadtest.fanout_check import (
    CheckError,
    FanoutReport,
    Member,
    Message,
    join,
    publish_http,
    run_fanout_check,
    tally,
    wait_for_deliveries,
)
from loadtest.room_member import RoomMember

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]
# After `docker compose restart redis`, the bound on a working fan-out again.
REDIS_RECOVERY_SECONDS = 10


def by_replica(members: list[Member]) -> dict[str, list[Member]]:
    grouped = defaultdict(list)
    for member in members:
        grouped[member.pod].append(member)
    return dict(grouped)


async def join_one_by_one(stack: ComposeStack, room: str, count: int, seconds: float = 20) -> list[Member]:
    deadline = asyncio.get_running_loop().time() + seconds
    return [await join(stack.base_url, room, deadline=deadline) for _ in range(count)]


async def join_until(stack: ComposeStack, room: str, enough, most: int, seconds: float = 30) -> list[Member]:
    """Join one at a time until ``enough(members)``: nginx picks a replica at
    random per handshake (it resolves the pool by DNS), so how many joins it
    takes to reach a given replica varies; ``most`` bounds it."""
    deadline = asyncio.get_running_loop().time() + seconds
    members: list[Member] = []
    while not enough(members):
        if len(members) >= most:
            await close_all(members)
            raise AssertionError(f"{most} handshakes did not get there: {by_replica(members).keys()}")
        members.append(await join(stack.base_url, room, deadline=deadline))
    return members


def on_every_replica(replicas, per_replica: int):
    return lambda members: all(len(by_replica(members).get(name, [])) >= per_replica for name in replicas)


async def assert_exactly_once(members: list[Member], room: str, messages: list[Message], seconds: float = 10) -> None:
    """Every member holds every message, once, with the right origin and served_by."""
    await wait_for_deliveries(members, {room: messages}, asyncio.get_running_loop().time() + seconds)
    report = FanoutReport("", 1, len(members), 0)
    tally(report, members, {room: messages})
    assert report.problems == []


async def close_all(members: list[Member]) -> None:
    await asyncio.gather(*(member.close() for member in members), return_exceptions=True)


async def test_every_container_replica_serves_and_delivers_across_containers(stack):
    report = await run_fanout_check(
        stack.base_url, rooms=3, clients_per_room=6, expect_replicas=3, broadcast_token=stack.broadcast_token
    )
    print(report.render())
    assert report.ok, report.render()
    # The replicas in the matrix are the daphne containers themselves (POD_NAME = hostname).
    assert report.replicas == set(stack.hostnames())
    assert report.http_origins, "the HTTP API's publishes are in the matrix too"


def test_containers_run_as_non_root_on_read_only_filesystems(stack):
    for container in docker_inspect(*stack.containers()):
        service = container["Config"]["Labels"]["com.docker.compose.service"]
        uid = stack.exec(container["Id"], "id", "-u").strip()
        # redis runs as the redis user of its image; everything of the blueprint as 10001.
        assert uid != "0" and (service == "redis" or uid == "10001"), f"{service} runs as uid {uid}"
        assert container["HostConfig"]["ReadonlyRootfs"], f"{service} has a writable root filesystem"
        assert container["State"]["Health"]["Status"] == "healthy", service


async def test_killed_replica_leaves_the_others_receiving_and_its_clients_reconnect(stack):
    room = f"kill-{secrets.token_hex(3)}"
    replicas = stack.hostnames()
    members = await join_until(stack, room, on_every_replica(replicas, 3), most=60)
    reconnected: list[Member] = []
    try:
        grouped = by_replica(members)
        assert set(grouped) == set(replicas), "every replica holds sockets of the room"
        victim = sorted(grouped)[0]
        survivors = [m for m in members if m.pod != victim]

        before = await publish_http(stack.base_url, room, stack.broadcast_token, "before the kill")
        await asyncio.to_thread(run, ["docker", "kill", replicas[victim]], 60)
        during = await publish_http(stack.base_url, room, stack.broadcast_token, "right after the kill")
        # Closed by nginx as soon as the upstream is gone, not left hanging.
        await asyncio.wait_for(asyncio.gather(*(m.closed.wait() for m in grouped[victim])), timeout=10)
        assert not [m for m in survivors if m.closed.is_set()]

        # Its clients reconnect through nginx, which passes them to live replicas.
        reconnected = await join_one_by_one(stack, room, len(grouped[victim]))
        assert victim not in {m.pod for m in reconnected}
        after = [await grouped[pod][0].publish(f"after the kill, from {pod}") for pod in grouped if pod != victim]
        after.append(await publish_http(stack.base_url, room, stack.broadcast_token, "after the kill"))
        await assert_exactly_once(survivors, room, [before, during, *after])
        await assert_exactly_once(reconnected, room, after)
    finally:
        await close_all(members + reconnected)
    # Back to three for the next tests: the killed container is started again.
    await asyncio.to_thread(stack.make, "scale", N=3)
    assert set(stack.hostnames()) == set(replicas)


async def test_nginx_stops_sending_handshakes_to_a_killed_replica_within_the_resolvers_validity(stack):
    """The pool is re-resolved every 5 s (nginx.conf.template): Docker's DNS
    drops a killed container at once, so nginx stops trying it within that,
    and until then passes a handshake that reaches it on to a live replica."""
    room = f"dns-{secrets.token_hex(3)}"
    replicas = stack.hostnames()
    victim = sorted(replicas)[-1]
    address = stack.address(replicas[victim])
    nginx = stack.one("nginx")
    await asyncio.to_thread(run, ["docker", "kill", replicas[victim]], 60)
    killed_at = time.time()
    tried_victim: list[float] = []
    served: list[Member] = []
    try:
        while time.time() - killed_at < 12:
            started = time.time()
            # Every handshake succeeds: on a refusal nginx tries the next replica.
            member = await join(stack.base_url, room, deadline=asyncio.get_running_loop().time() + 10)
            served.append(member)
            assert member.pod != victim
            await member.close()
            log = run(["docker", "logs", "--since", f"{started - 1:.3f}", nginx], 30)
            if f"{address}:8000" in log.stdout + log.stderr:
                tried_victim.append(time.time() - killed_at)
        assert len(served) >= 20
        # 5 s of validity, plus the second docker logs' --since rounds to.
        assert not [t for t in tried_victim if t > 7], f"handshakes still sent to {victim} at {tried_victim} s"
    finally:
        await close_all(served)
    await asyncio.to_thread(stack.make, "scale", N=3)
    assert set(stack.hostnames()) == set(replicas)


async def test_scaling_out_reaches_the_new_replica_and_leaves_open_sockets_alone(stack):
    room = f"scale-{secrets.token_hex(3)}"
    before = stack.hostnames()
    old = await join_one_by_one(stack, room, 6)
    newcomers: list[Member] = []
    try:
        await asyncio.to_thread(stack.make, "scale", N=4)
        new_replicas = set(stack.hostnames()) - set(before)
        assert len(new_replicas) == 1
        assert not [m for m in old if m.closed.is_set()], "scaling closed open sockets"

        newcomers = await join_until(
            stack, room, lambda members: {m.pod for m in members} & new_replicas, most=40, seconds=40
        )
        on_new = [m for m in newcomers if m.pod in new_replicas]
        messages = [
            await old[0].publish("from an old socket"),
            await on_new[0].publish("from the new replica"),
            await publish_http(stack.base_url, room, stack.broadcast_token, "from the HTTP API"),
        ]
        await assert_exactly_once(old + newcomers, room, messages)
        assert not [m for m in old if m.closed.is_set()]
    finally:
        await close_all(old + newcomers)


async def test_redis_restart_fan_out_works_again_within_10_s(stack):
    """Redis forgets every group and every room history when it restarts (no
    persistence): members opened before must be reached again within 10 s,
    and every one that was sent to resume must be told that history is lost."""
    loop = asyncio.get_running_loop()
    replicas = stack.hostnames()
    started = started_at(stack)
    room = f"redis-{secrets.token_hex(3)}"
    members: list[RoomMember] = []
    # One at a time until every replica holds some (nginx picks at random).
    while len(members) < 2 * len(replicas) or {member.pod for member in members} != set(replicas):
        assert len(members) < 40, f"40 handshakes left a replica out: {sorted({m.pod for m in members})}"
        members.append(RoomMember(stack.base_url, room))
        await members[-1].start(deadline=loop.time() + 20)
    try:
        await asyncio.to_thread(stack.compose, "restart", "redis")
        restarted = loop.time()

        reached_all = None
        while reached_all is None and loop.time() - restarted < REDIS_RECOVERY_SECONDS:
            try:
                message = await publish_http(stack.base_url, room, stack.broadcast_token, "after the redis restart")
            except CheckError:  # 503 while the layer reconnects: nothing was published
                await asyncio.sleep(0.1)
                continue
            deadline = loop.time() + 2
            while loop.time() < deadline and not all(m.received(message.id) for m in members):
                await asyncio.sleep(0.05)
            if all(m.received(message.id) for m in members):
                reached_all = loop.time() - restarted
        assert reached_all is not None, (
            f"members opened before the restart not reached within {REDIS_RECOVERY_SECONDS} s"
        )
        assert all(m.received(message.id) == 1 for m in members), "a member got the message twice"
        before = members[0].welcomes[0].epoch  # the history the restart lost
        for member in members:
            for reconnect in member.reconnects:
                # Sent to resume because the replica lost Redis or the epoch changed, and
                # told when it resumed from the lost history (a replica that noticed the
                # restart late may move a member again, within the new history).
                assert reconnect.lost.code in (1012, 4000), reconnect
                if reconnect.welcome.resumed_from.epoch == before:
                    assert reconnect.welcome.recovered is False, reconnect
    finally:
        await asyncio.gather(*(member.stop() for member in members), return_exceptions=True)

    report = await run_fanout_check(
        stack.base_url,
        rooms=2,
        clients_per_room=len(replicas),
        expect_replicas=len(replicas),
        broadcast_token=stack.broadcast_token,
        timeout=5,
    )
    assert report.ok, report.render()
    assert loop.time() - restarted <= REDIS_RECOVERY_SECONDS
    assert started_at(stack) == started, "a replica restarted with Redis"


def test_redis_outage_makes_replicas_unready_not_dead(stack):
    """With Redis away every replica answers /readyz 503 (nginx and Kubernetes
    stop sending it new sockets) but /healthz 200 (nobody restarts it), and is
    ready again once Redis is back. The restart is split into stop and start:
    a plain one is over within the app's Redis retries, too quick to see."""
    replicas = stack.hostnames()
    started = started_at(stack)
    stack.compose("stop", "redis")
    try:
        for pod, container in replicas.items():
            assert probe(stack, container, "/readyz") == (1, "answered 503"), f"{pod} still ready without Redis"
            assert probe(stack, container, "/healthz")[0] == 0, f"{pod} not alive without Redis"
    finally:
        stack.compose("start", "redis")
    deadline = time.monotonic() + REDIS_RECOVERY_SECONDS
    for pod, container in replicas.items():
        while probe(stack, container, "/readyz")[0] != 0:
            assert time.monotonic() < deadline, f"{pod} not ready {REDIS_RECOVERY_SECONDS} s after Redis came back"
    assert started_at(stack) == started, "a replica restarted with Redis"


def started_at(stack: ComposeStack) -> dict[str, tuple[bool, str]]:
    """Running state and start time of every daphne and gunicorn container."""
    ids = stack.containers("daphne") + stack.containers("gunicorn")
    return {c["Id"]: (c["State"]["Running"], c["State"]["StartedAt"]) for c in docker_inspect(*ids)}


def probe(stack: ComposeStack, container: str, path: str) -> tuple[int, str]:
    """deploy.healthcheck inside the replica: (exit code, the tail of what it said)."""
    result = subprocess.run(
        ["docker", "exec", container, "python", "-m", "deploy.healthcheck", f"http://127.0.0.1:8000{path}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    said = (result.stdout + result.stderr).strip()
    return result.returncode, said[said.rfind("answered") :] if "answered" in said else said


def test_loadtest_profile_runs_locust_from_its_own_image(stack):
    """`make up LOCUST_WORKERS=2`: master and workers run the load-test image
    (the app image has no locust) and the master counts both workers."""
    stack.make("up", REPLICAS=3, LOCUST_WORKERS=2)
    locust = stack.containers("locust-master") + stack.containers("locust-worker")
    assert len(locust) == 3
    assert {c["Config"]["Image"] for c in docker_inspect(*locust)} == {LOADTEST_IMAGE}
    address = stack.compose("--profile", "loadtest", "port", "locust-master", "8089").stdout.strip()
    deadline = time.monotonic() + 60
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:
        try:
            with urllib.request.urlopen(f"http://{address}/stats/requests", timeout=5) as response:
                workers = json.loads(response.read()).get("workers", [])
        except OSError:
            pass
        time.sleep(1)
    assert len(workers) == 2, f"the locust master counts {len(workers)} workers"
