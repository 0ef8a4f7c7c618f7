"""The deployment census on a real Redis (realtime/peers.py): reports that
lapse, the decision acted on, drain outcomes counted, Redis away.

The replica's sockets are stand-ins with what the census reads of a real one;
tests/integration/test_rebalancing.py moves real sockets between replicas.
"""

from __future__ import annotations

import time

import pytest
import redis
from django.test import override_settings
from realtime import close_codes, metrics, peers, ws_protocol
from realtime.rebalancing import RebalanceConfig
from realtime.replica import state

pytestmark = pytest.mark.redis

CONFIG = RebalanceConfig(interval=1.0, min_excess=10, max_share=0.1)


class FakeSocket:
    """What the census reads of a ServerCloseProtocol, and the close it sends."""

    state = ws_protocol.ServerCloseProtocol.STATE_OPEN

    def __init__(self, path: bytes, age: float = 60.0, queued: int = 0):
        self.path = path
        self.socket_opened = time.time() - age
        self.queued_bytes = queued
        self.closed_with: int | None = None

    def serverClose(self, code=None):
        self.closed_with = code
        self.state = ws_protocol.ServerCloseProtocol.STATE_CLOSING


@pytest.fixture(autouse=True)
def refusal_undone(monkeypatch):
    """The census sets the process's refusal of new sockets: undone after each test."""
    monkeypatch.setattr(state, "above_mean_until", 0.0)


@pytest.fixture
def layer_on(redis_server):
    hosts = [{"address": redis_server.url}]
    layers = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": hosts}}}
    with override_settings(CHANNEL_LAYERS=layers):
        yield redis.Redis.from_url(redis_server.url)


@pytest.fixture
def sockets(monkeypatch):
    """This replica's open sockets: 100 members of chat rooms, none of which may move (no history
    on the core layer), and 100 echo sockets, of which 10 are too young and 10 have a queue."""
    chat = [FakeSocket(b"/ws/chat/lobby/") for _ in range(100)]
    echo = [FakeSocket(b"/ws/echo/") for _ in range(80)]
    echo += [FakeSocket(b"/ws/echo/", age=1.0) for _ in range(10)]
    echo += [FakeSocket(b"/ws/echo/", queued=1024) for _ in range(10)]
    everything = chat + echo
    monkeypatch.setattr(ws_protocol, "open_protocols", set(everything))
    monkeypatch.setattr(state, "open_sockets", len(everything))
    return chat, echo


def report(client: redis.Redis, name: str, count: int, age_ms: int = 0) -> None:
    """Another replica's report, as the exchange script writes it (Redis's clock)."""
    seconds, micros = client.time()
    client.hset("asgi:replica-sockets", name, f"{count}:{seconds * 1000 + micros // 1000 - age_ms}")


def refused(reason: str) -> float:
    return metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, reason)._value.get()


def drains(outcome: str) -> float:
    return metrics.DEPLOYMENT_DRAINS.labels(metrics.REPLICA, outcome)._value.get()


async def test_a_replica_well_above_the_mean_closes_movable_sockets_with_1012(layer_on, sockets):
    chat, echo = sockets
    client = layer_on
    report(client, "daphne-new", 0)
    report(client, "daphne-even", 200)
    report(client, "daphne-gone", 5000, age_ms=4000)  # older than three intervals: not counted
    before = refused("rebalanced")
    deployment = peers.Deployment(CONFIG)

    closed = await deployment.once()

    # Mean (200 + 0 + 200) / 3 = 133, band 160: 10 % of 200 is 20, within the 40 over it.
    assert closed == 20
    assert set(deployment.last.sockets) == {metrics.REPLICA, "daphne-new", "daphne-even"}
    assert not client.hexists("asgi:replica-sockets", "daphne-gone"), "a lapsed report was left behind"
    count, _ = client.hget("asgi:replica-sockets", metrics.REPLICA).decode().split(":")
    assert int(count) == 200
    moved = [s for s in echo if s.closed_with is not None]
    assert len(moved) == 20 and {s.closed_with for s in moved} == {close_codes.SERVICE_RESTART}
    assert all(s.queued_bytes == 0 and time.time() - s.socket_opened > CONFIG.min_age for s in moved)
    assert not [s for s in chat if s.closed_with is not None], "a chat member without history was moved"
    assert refused("rebalanced") - before == 20
    # Above the band: new sockets are refused (503) until the next census says otherwise.
    assert state.above_mean and state.above_mean_until <= time.monotonic() + 2 * CONFIG.interval
    report(client, "daphne-new", 150)
    await deployment.once()
    assert not state.above_mean, "still refusing once inside the band"


async def test_nothing_moves_while_draining_alone_or_disabled(layer_on, sockets, monkeypatch):
    client = layer_on
    deployment = peers.Deployment(CONFIG)
    assert await deployment.once() == 0, "alone: nobody to hand sockets to"
    report(client, "daphne-new", 0)
    assert await peers.Deployment(RebalanceConfig(enabled=False)).once() == 0
    reported = client.hget("asgi:replica-sockets", metrics.REPLICA)
    monkeypatch.setattr(state, "draining", True)
    time.sleep(0.01)
    assert await deployment.once() == 0
    # A draining replica reports nothing more (and withdraws what it reported, below).
    assert client.hget("asgi:replica-sockets", metrics.REPLICA) == reported


async def test_redis_away_means_no_shedding_and_no_crash(sockets, caplog, monkeypatch):
    monkeypatch.setattr(state, "above_mean_until", time.monotonic() + 60)
    layers = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": "redis://127.0.0.1:9/0", "socket_connect_timeout": 0.5}]},
        }
    }
    with override_settings(CHANNEL_LAYERS=layers, REDIS_LINK_TIMEOUT_SECONDS=1.0):
        deployment = peers.Deployment(CONFIG)
        assert await deployment.once() == 0
        assert not state.above_mean, "refusing sockets on a stale view of the deployment"
        assert await deployment.once() == 0
    warnings = [r for r in caplog.records if r.getMessage().startswith("could not report to Redis")]
    assert len(warnings) == 1, "one warning per outage"


async def test_drain_outcomes_are_counted_by_the_replicas_that_stay(layer_on, monkeypatch):
    client = layer_on
    monkeypatch.setattr(state, "open_sockets", 0)
    client.hset("asgi:replica-drains", mapping={"completed": 7, "timed_out": 2})  # before this replica started
    staying = peers.Deployment(CONFIG)
    completed, timed_out = drains("completed"), drains("timed_out")
    await staying.once()
    assert (drains("completed"), drains("timed_out")) == (completed, timed_out), "the past is not counted"

    draining = peers.Deployment(CONFIG)
    await draining.record_drain(peers.TIMED_OUT)
    await draining.record_drain(peers.COMPLETED)
    await staying.once()
    assert (drains("completed") - completed, drains("timed_out") - timed_out) == (1, 1)

    client.delete("asgi:replica-drains")  # a Redis restart forgets them: nothing new to count
    await staying.once()
    await draining.record_drain(peers.TIMED_OUT)
    await staying.once()
    assert (drains("completed") - completed, drains("timed_out") - timed_out) == (1, 2)


async def test_a_draining_replica_withdraws_its_report(layer_on, monkeypatch):
    client = layer_on
    monkeypatch.setattr(state, "open_sockets", 3)
    deployment = peers.Deployment(CONFIG)
    await deployment.once()
    assert client.hexists("asgi:replica-sockets", metrics.REPLICA)
    await deployment.withdraw()
    assert not client.hexists("asgi:replica-sockets", metrics.REPLICA)
