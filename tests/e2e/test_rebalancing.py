"""Rebalancing and the staggered drain, proven on the compose stack of the real images.

One stack for the module, with rebalancing quickened for a test (an override
file sets every 1 s, 5 % a round, 10 sockets over the mean; the defaults are
10 s, 2 % and 50, for replicas of thousands of sockets). The drain keeps its
production timeout, DRAIN_TIMEOUT_SECONDS = 20 s.

- Scale 3 -> 5 under 300 chat members: every replica's socket count (its own
  /metrics gauge) is inside the band, 1.2 x the mean (72), within
  CONVERGE_SECONDS of the new replicas being ready; the members moved (1012)
  resumed, and nobody lost a message or got one twice.
- SIGTERM one replica: its members are closed in batches (1001) and reconnect
  to the others at no more than the drain's stated rate, every one of them
  gets back in, and the replicas that stay count the drain as completed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter

import pytest
from realtime import rebalancing

from loadtest.compose_stack import ComposeStack, docker_inspect, run
from loadtest.fanout_check import FanoutReport, Message, publish_http, tally, wait_for_deliveries
from loadtest.room_member import RoomMember
from tests.metrics import metric_sum

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

CONFIG = rebalancing.RebalanceConfig(interval=1.0, min_excess=10, max_share=0.05)
OVERRIDE = f"""\
# tests/e2e/test_rebalancing.py: rebalancing quickened, so scaling converges in seconds.
services:
  daphne:
    environment:
      REBALANCE_INTERVAL_SECONDS: "{CONFIG.interval:g}"
      REBALANCE_MIN_EXCESS: "{CONFIG.min_excess}"
      REBALANCE_MAX_SHARE: "{CONFIG.max_share:g}"
"""
MEMBERS, ROOMS = 300, 6
# One address opens them all: nginx's per-address handshake limit allows a
# burst of 500, then 100 a second, so 300 at once and the reconnects pass.
# From the new replicas' readiness to every replica inside the band. Each of
# the three old replicas has about 28 sockets to hand on, 5 a second at most:
# about 6 s with every handshake going to the new ones, as the refusal above
# the band makes it (measured 7.5 s; 23 s before replicas above it refused).
CONVERGE_SECONDS = 30
DRAIN_TIMEOUT_SECONDS = 20.0  # the app's default: the compose stack sets none
PUBLISH_EVERY_SECONDS = 0.1


@pytest.fixture(scope="module")
def stack(offline_images, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rebalancing")
    override = directory / "rebalancing.override.yml"
    override.write_text(OVERRIDE)
    compose_stack = ComposeStack.create(directory, prefix="rebal", files=("docker-compose.yml", str(override)))
    try:
        compose_stack.make("up", REPLICAS=3)
        yield compose_stack
    finally:
        compose_stack.make("down")


def open_sockets(stack: ComposeStack) -> dict[str, int]:
    """Each running replica's blueprint_ws_open_sockets, read from its own /metrics."""
    counts = {}
    for name, container in stack.hostnames().items():
        try:
            counts[name] = int(metric_sum(f"{stack.address(container)}:8000", "blueprint_ws_open_sockets"))
        except OSError:  # stopping, or not yet answering
            continue
    return counts


def peak_per_second(times: list[float]) -> int:
    """The most of ``times`` within any one second."""
    ordered = sorted(times)
    return max((sum(1 for t in ordered if start <= t < start + 1) for start in ordered), default=0)


class Publisher:
    """The HTTP API publishing into every room, round robin, until stopped."""

    def __init__(self, stack: ComposeStack, rooms: list[str]):
        self.stack, self.rooms = stack, rooms
        self.published: list[Message] = []
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self):
        n = 0
        while not self.stop.is_set():
            room = self.rooms[n % len(self.rooms)]
            self.published.append(await publish_http(self.stack.base_url, room, self.stack.broadcast_token, f"{n}"))
            n += 1
            await asyncio.sleep(PUBLISH_EVERY_SECONDS)

    async def finish(self, members: list[RoomMember]) -> FanoutReport:
        """Stop, wait for every delivery, and judge every member's history."""
        self.stop.set()
        await self.task
        expected = {room: [m for m in self.published if m.room == room] for room in self.rooms}
        await wait_for_deliveries(members, expected, asyncio.get_running_loop().time() + 20)
        report = FanoutReport(self.stack.base_url, len(self.rooms), MEMBERS // len(self.rooms), 0)
        tally(report, members, expected)
        return report


async def join(stack: ComposeStack, rooms: list[str]) -> list[RoomMember]:
    loop = asyncio.get_running_loop()
    members = [RoomMember(stack.base_url, rooms[index % len(rooms)], backoff_cap=1.0) for index in range(MEMBERS)]
    await asyncio.gather(*(member.start(deadline=loop.time() + 60) for member in members))
    for member in members:
        member.deadline = loop.time() + 300  # keep coming back for the whole test
    return members


async def test_scaling_3_to_5_converges_and_the_moved_members_lose_nothing(stack):
    rooms = [f"rebalance-{secrets.token_hex(3)}" for _ in range(ROOMS)]
    members = await join(stack, rooms)
    publisher = Publisher(stack, rooms)
    try:
        before = open_sockets(stack)
        assert sum(before.values()) == MEMBERS and len(before) == 3, before
        # Older than the youngest socket a replica moves (three intervals).
        await asyncio.sleep(CONFIG.min_age + 1)
        scaling = time.monotonic()
        await asyncio.to_thread(stack.make, "scale", N=5)
        ready = time.monotonic()
        samples = []
        while time.monotonic() - ready < CONVERGE_SECONDS:
            counts = open_sockets(stack)
            samples.append((round(time.monotonic() - ready, 1), counts))
            mean = MEMBERS / 5
            if len(counts) == 5 and sum(counts.values()) == MEMBERS:
                if max(counts.values()) <= rebalancing.band(mean, CONFIG):
                    break
            await asyncio.sleep(0.5)
        converged = time.monotonic() - ready
        await asyncio.sleep(1)
        report = await publisher.finish(members)
        moved_by = {
            name: metric_sum(
                f"{stack.address(container)}:8000", "blueprint_ws_connections_refused_total", reason="rebalanced"
            )
            for name, container in stack.hostnames().items()
        }
    finally:
        await asyncio.gather(*(member.stop() for member in members), return_exceptions=True)
    reconnects = [reconnect for member in members for reconnect in member.reconnects]
    codes = Counter(close.code for member in members for close in member.closes)
    print(
        f"before the scale {before}; scale took {ready - scaling:.1f} s; "
        f"inside the band ({rebalancing.band(MEMBERS / 5, CONFIG):.0f}) after {converged:.1f} s: {counts}\n"
        f"moved by each replica: {moved_by}; reconnects by close code: {dict(codes)}\n"
        f"samples: {samples}\n{report.render_reconnects()}; {len(publisher.published)} messages published"
    )
    assert len(counts) == 5 and sum(counts.values()) == MEMBERS, counts
    assert max(counts.values()) <= rebalancing.band(MEMBERS / 5, CONFIG), (
        f"not inside the band within {CONVERGE_SECONDS} s: {samples}"
    )
    assert codes[1012] > 0, "converged without rebalancing: nothing was closed with 1012"
    assert sum(moved_by.values()) == codes[1012], "each 1012 a client saw is counted as rebalanced"
    moved = [reconnect for reconnect in reconnects if reconnect.lost.code == 1012]
    assert all(reconnect.welcome.recovered is True for reconnect in moved), "a moved member was not recovered"
    assert report.problems == [], report.render()


async def test_a_drain_sends_its_members_to_the_others_at_the_stated_rate(stack):
    rooms = [f"drain-{secrets.token_hex(3)}" for _ in range(ROOMS)]
    replicas = stack.hostnames()
    assert len(replicas) == 5, "runs after the scale to 5"
    members = await join(stack, rooms)
    publisher = Publisher(stack, rooms)
    try:
        victim = Counter(member.pod for member in members).most_common(1)[0][0]
        staying = next(container for name, container in replicas.items() if name != victim)
        on_victim = [member for member in members if member.pod == victim]
        sockets = len(on_victim)
        signalled = time.time()
        await asyncio.to_thread(run, ["docker", "stop", "--time", "40", replicas[victim]], 60)
        stopped = time.time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and not all(member.connected for member in members):
            await asyncio.sleep(0.2)
        all_back = all(member.connected for member in members)
        while loop.time() < deadline:  # the staying replicas count the drain within a few intervals
            if (
                metric_sum(f"{stack.address(staying)}:8000", "blueprint_deployment_drains_total", outcome="completed")
                >= 1
            ):
                break
            await asyncio.sleep(0.5)
        counted = metric_sum(f"{stack.address(staying)}:8000", "blueprint_deployment_drains_total", outcome="completed")
        report = await publisher.finish(members)
    finally:
        await asyncio.gather(*(member.stop() for member in members), return_exceptions=True)
    state = docker_inspect(replicas[victim])[0]["State"]
    drained = [r for m in on_victim for r in m.reconnects if r.lost.pod == victim and r.lost.at >= signalled]
    closes = [r.lost.at - signalled for r in drained]
    arrivals = [r.welcome.at - signalled for r in drained]
    peak, closing_peak = peak_per_second(arrivals), peak_per_second(closes)
    bound = rebalancing.drain_peak_per_second(sockets, DRAIN_TIMEOUT_SECONDS)
    batch = rebalancing.drain_schedule(sockets, DRAIN_TIMEOUT_SECONDS)[0]
    print(
        f"drained {victim} with {sockets} members: closed over {max(closes):.2f} s, "
        f"stopped after {stopped - signalled:.1f} s; {closing_peak} closes and {peak} reconnects at the others "
        f"in a second at most "
        f"(bound {bound}, a batch of {batch} every {rebalancing.DRAIN_TICK_SECONDS} s); "
        f"the drain counted by the others: {counted}; {report.render_reconnects()}"
    )
    assert state["ExitCode"] == 0 and not state["Running"], state
    assert all_back, [member.gave_up for member in members if not member.connected]
    assert len(drained) == sockets, f"{len(drained)} of the {sockets} members reconnected"
    assert {r.lost.code for r in drained} == {1001}
    assert all(r.welcome.pod != victim for r in drained)
    # Closed in batches, not at once: the replica's own rate, with a tick's
    # batch of slack at the edge of a second.
    assert closing_peak <= bound + batch, f"{closing_peak} closes in a second, bound {bound}"
    # What the others see adds each client's own way back (its jitter, its
    # handshake on a loaded host): a second of arrivals comes from the closes
    # of a second plus that delay. All at once would be every member in one.
    delay = max(arrival - close for arrival, close in zip(arrivals, closes, strict=True))
    assert delay < 2, f"a member took {delay:.2f} s to get back in"
    assert peak <= bound * (1 + delay) + batch, f"{peak} reconnects in a second, bound {bound}, delay {delay:.2f} s"
    if sockets > batch:
        assert max(closes) >= rebalancing.DRAIN_TICK_SECONDS, "every socket was closed at once"
    assert max(closes) <= rebalancing.drain_window(DRAIN_TIMEOUT_SECONDS) + 1
    assert counted >= 1, "the replicas that stay did not count the drain"
    assert report.problems == [], report.render()
