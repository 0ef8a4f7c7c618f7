"""The rebalancing decision and the drain's batches (realtime/rebalancing.py), and the refusal it sets."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from realtime import rebalancing
from realtime.rebalancing import Movable, RebalanceConfig, Socket
from realtime.replica import state

from tests.ws import connect

DEFAULTS = RebalanceConfig()
# What the compose test runs: small deployments, quick intervals.
SMALL = RebalanceConfig(interval=1.0, min_excess=10, max_share=0.05)


# --- how many to shed -------------------------------------------------------------


def test_the_defaults_are_the_documented_ones():
    config = DEFAULTS
    assert (config.enabled, config.interval, config.threshold, config.min_excess, config.max_share) == (
        True,
        10.0,
        1.2,
        50,
        0.02,
    )
    assert DEFAULTS.report_ttl == 30.0 and DEFAULTS.min_age == 30.0


@pytest.mark.parametrize(
    "mine,others,config,expected",
    [
        (20_000, [], DEFAULTS, 0),  # alone: nobody to hand sockets to
        (20_000, [20_000, 20_000], DEFAULTS, 0),  # even
        (12_000, [10_000, 8_000], DEFAULTS, 0),  # 1.2 x the mean of 10,000: not above it
        (12_001, [9_999, 8_000], DEFAULTS, 1),  # just above: the excess over the band, not the step
        (20_000, [8_000, 8_000], DEFAULTS, 400),  # 2 % of 20,000
        (20_000, [0, 0, 0, 0], DEFAULTS, 400),  # new replicas: the mean is 4,000, the band 4,800
        (100, [100, 100, 0, 0], DEFAULTS, 0),  # 1.67 x the mean of 60, but only 40 above it
        (100, [100, 100, 0, 0], SMALL, 5),  # 5 % of 100 (band 72)
        (100, [100, 100, 0, 0], RebalanceConfig(min_excess=10, max_share=0.5), 28),  # down to the band, no further
        (150, [20], RebalanceConfig(min_excess=10), 3),  # ceil(2 % of 150)
        (60, [10], RebalanceConfig(min_excess=10), 2),  # at least one a round, ceil(1.2)
        (0, [0, 0], DEFAULTS, 0),
        (20_000, [0, 0], RebalanceConfig(enabled=False), 0),  # REBALANCE=0
    ],
)
def test_how_many_a_replica_sheds(mine, others, config, expected):
    assert rebalancing.sockets_to_shed(mine, others, config) == expected


@given(
    mine=st.integers(0, 50_000),
    others=st.lists(st.integers(0, 50_000), max_size=12),
    threshold=st.floats(1.0, 3.0),
    min_excess=st.integers(1, 500),
    max_share=st.floats(0.001, 0.5),
)
def test_a_replica_never_sheds_below_the_mean_nor_more_than_its_share(mine, others, threshold, min_excess, max_share):
    config = RebalanceConfig(threshold=threshold, min_excess=min_excess, max_share=max_share)
    shed = rebalancing.sockets_to_shed(mine, others, config)
    assert shed >= 0
    if shed:
        mean = (mine + sum(others)) / (len(others) + 1)
        assert mine > mean * threshold and mine > mean + min_excess, "shed while not well above the mean"
        assert mine - shed >= mean, "shed below the mean"
        assert shed <= max(1, math.ceil(mine * max_share))


@pytest.mark.parametrize(
    "mine,others,config,above",
    [
        (100, [100, 100, 0, 0], SMALL, True),
        (72, [72, 72, 42, 42], SMALL, False),  # on the band's edge (mean 60): takes sockets again
        (100, [100, 100, 0, 0], DEFAULTS, False),
        (100, [], SMALL, False),
        (100, [0], RebalanceConfig(enabled=False), False),
    ],
)
def test_above_the_band_a_replica_both_sheds_and_refuses(mine, others, config, above):
    assert rebalancing.above_band(mine, others, config) is above
    assert (rebalancing.sockets_to_shed(mine, others, config) > 0) is above


async def test_a_replica_above_the_mean_refuses_new_sockets_until_the_census_lapses(monkeypatch):
    monkeypatch.setattr(state, "above_mean_until", time.monotonic() + 60)
    assert state.above_mean
    _, connected = await connect("/ws/echo/")
    assert not connected, "accepted a socket while above the mean"
    monkeypatch.setattr(state, "above_mean_until", time.monotonic() - 0.1)
    socket, connected = await connect("/ws/echo/")
    assert connected
    await socket.disconnect()


# --- which sockets ------------------------------------------------------------------


def movable(name: str, age: float = 100.0, queued: int = 0, resumable: bool = True) -> Movable[str]:
    return Movable(name, Socket(age, queued, resumable))


def test_only_sockets_that_lose_nothing_by_moving_are_picked():
    sockets = [
        movable("settled"),
        movable("young", age=5.0),  # just moved here, perhaps
        movable("slow", queued=4096),  # its queue would go with the close
        movable("no-history", resumable=False),  # a chat member with nothing to resume from
        movable("also-settled"),
    ]
    assert sorted(rebalancing.choose(sockets, 10, min_age=30.0)) == ["also-settled", "settled"]
    assert rebalancing.choose(sockets, 0, min_age=30.0) == []


def test_the_pick_is_random_so_no_room_moves_at_once():
    sockets = [movable(f"s{index}") for index in range(100)]
    first = rebalancing.choose(sockets, 5, 30.0, random.Random(1))
    second = rebalancing.choose(sockets, 5, 30.0, random.Random(2))
    assert len(first) == len(set(first)) == 5 and first != second


# --- the drain's batches ------------------------------------------------------------


@pytest.mark.parametrize(
    "timeout,window", [(20.0, 15.0), (60.0, 45.0), (5.0, 3.75), (2.0, 1.0), (1.0, 0.0), (0.5, 0.0)]
)
def test_the_drain_window_leaves_a_margin_of_a_quarter_at_least_a_second(timeout, window):
    assert rebalancing.drain_window(timeout) == window


@pytest.mark.parametrize("sockets", [0, 1, 4, 5, 8, 40, 99, 100, 321, 1_000, 20_000, 50_000])
@pytest.mark.parametrize("timeout", [20.0, 5.0, 2.0, 1.0])
def test_every_socket_is_closed_within_the_window_at_a_bounded_rate(sockets, timeout):
    batches = rebalancing.drain_schedule(sockets, timeout)
    tick = rebalancing.DRAIN_TICK_SECONDS
    window = rebalancing.drain_window(timeout)
    assert sum(batches) == sockets and all(batch > 0 for batch in batches)
    assert (len(batches) - 1) * tick <= window + 1e-9, "a batch after the window"
    ticks = math.floor(window / tick + 1e-9) + 1
    per_tick = max(math.ceil(rebalancing.DRAIN_MIN_RATE * tick), math.ceil(sockets / ticks))
    assert max(batches, default=0) <= per_tick
    assert rebalancing.drain_peak_per_second(sockets, timeout) <= per_tick * round(1 / tick)


def test_the_stated_bounds_at_the_default_timeout():
    # README, Operating it: 20 s -> closes over 15 s, at most max(20, N / 15 s) a second.
    assert rebalancing.drain_peak_per_second(20_000, 20.0) == 1_320
    assert rebalancing.drain_peak_per_second(1_500, 20.0) == 100
    assert rebalancing.drain_peak_per_second(100, 20.0) == 20
    assert len(rebalancing.drain_schedule(20_000, 20.0)) == 76  # one batch every 0.2 s over 15 s
    # A few dozen sockets go at once, as before the drain was staggered.
    assert rebalancing.drain_schedule(4, 20.0) == [4]
    assert rebalancing.drain_schedule(24, 20.0) == [4, 4, 4, 4, 4, 4]


def test_a_batch_is_recomputed_from_what_is_left():
    window = rebalancing.drain_window(20.0)
    # Half the sockets left by themselves: the rest spread over the ticks left.
    assert rebalancing.drain_batch(760, 0.0, window) == 10
    assert rebalancing.drain_batch(380, 7.4, window) == 10
    # A tick that came late, past the window: everything at once.
    assert rebalancing.drain_batch(380, 15.5, window) == 380
    assert rebalancing.drain_batch(0, 1.0, window) == 0
