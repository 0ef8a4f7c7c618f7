"""Even socket counts across the replicas, and drains that do not storm them:
the decisions, as plain functions (``realtime.peers`` and ``realtime.server``
act on them).

**Rebalancing.** Sockets live for hours, and nginx only places new ones: after
a scale-out the new replicas get new sockets while the old ones stay as full
as they were (and with a DNS-resolved pool, nginx places them at random, not
on the emptiest replica). So every replica reports its open sockets and reads
the others' (``realtime.peers``), and one holding well above the deployment's
mean hands a few of its sockets on each interval: it closes them with 1012
(service restart) and the clients reconnect through nginx and resume from
their last position, losing nothing (README, Wire protocol). Meanwhile it
refuses new sockets with 503, which nginx retries on another replica: the
sockets it hands on, and new ones, land elsewhere even where nginx picks a
replica at random.

"Well above" is above both ``REBALANCE_THRESHOLD`` x the mean (1.2: a replica
20 % busier than the rest costs little; moving a socket costs its client a
reconnect) and the mean + ``REBALANCE_MIN_EXCESS`` (50: a few dozen sockets
more or less are nothing to a replica, and small deployments stay still). A
replica sheds at most ``REBALANCE_MAX_SHARE`` of its sockets per interval
(2 % per 10 s: at 20,000 sockets, 400 handshakes per 10 s for the rest of the
deployment, 40 a second from each replica above the band) and never so many that it would fall under that
band, so never under the mean: a replica at 20,000 where the mean is 12,000
is inside the band (14,400) after about 17 intervals, three minutes.

The sockets it picks are ones that lose nothing by moving: open at least three
intervals (a socket just moved here is not moved again at once), nothing
queued for the client, and either a chat member that resumes from history or
a socket of the stateless echo and API endpoints.

**Staggered drain.** A draining replica closes its sockets with 1001 in
batches, one every ``DRAIN_TICK_SECONDS``, spread over its drain window:
``DRAIN_TIMEOUT_SECONDS`` minus a margin of a quarter of it (at least 1 s),
in which the last ones finish their close handshakes and leave their groups.
Each batch is the remaining sockets over the ticks left, and at least
``DRAIN_MIN_RATE`` a second (a replica with a few dozen sockets drains at
once, as before). So the rest of the deployment sees at most
max(``DRAIN_MIN_RATE``, N / window) new handshakes a second from a drain of N
sockets (plus a tick's batch at the edges of a second): with the default 20 s
timeout, N / 15 s (1,320 a second for 20,000 sockets, where all at once was
20,000 within the clients' backoff jitter).
Sockets waiting for their batch are served as before: the replica stays
subscribed until it exits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

# --- rebalancing ----------------------------------------------------------------


@dataclass(frozen=True)
class RebalanceConfig:
    enabled: bool = True
    interval: float = 10.0  # seconds between reports, and between decisions
    threshold: float = 1.2  # shed only above this times the mean...
    min_excess: int = 50  # ...and this many sockets above it
    max_share: float = 0.02  # of the replica's sockets, at most, per interval

    @classmethod
    def from_settings(cls) -> RebalanceConfig:
        from django.conf import settings

        return cls(
            enabled=settings.REBALANCE,
            interval=settings.REBALANCE_INTERVAL_SECONDS,
            threshold=settings.REBALANCE_THRESHOLD,
            min_excess=settings.REBALANCE_MIN_EXCESS,
            max_share=settings.REBALANCE_MAX_SHARE,
        )

    @property
    def report_ttl(self) -> float:
        """How long a replica's report counts: it is renewed every interval, so
        two missed reports are forgiven, and a replica gone (killed, drained)
        drops out of the mean within this."""
        return 3 * self.interval

    @property
    def min_age(self) -> float:
        """Seconds a socket must have been open before it may be moved."""
        return 3 * self.interval


def band(mean: float, config: RebalanceConfig) -> float:
    """The most sockets a replica may hold before it sheds."""
    return max(mean * config.threshold, mean + config.min_excess)


def above_band(mine: int, others: Sequence[int], config: RebalanceConfig) -> bool:
    """Whether a replica with ``mine`` sockets holds well above the mean of
    its own and the ``others``' counts (those that serve: a draining replica
    reports none): then it sheds, and refuses new sockets."""
    if not config.enabled or not others or mine <= 0:
        return False
    return mine > band((mine + sum(others)) / (len(others) + 1), config)


def sockets_to_shed(mine: int, others: Sequence[int], config: RebalanceConfig) -> int:
    """How many of its ``mine`` sockets a replica closes this interval."""
    if not above_band(mine, others, config):
        return 0
    mean = (mine + sum(others)) / (len(others) + 1)
    ceiling = band(mean, config)
    step = max(1, math.ceil(mine * config.max_share))
    # Down to the band at most: ceiling >= mean + min_excess > mean.
    return min(step, mine - math.floor(ceiling))


@dataclass(frozen=True)
class Socket:
    """What the choice needs to know of one socket."""

    age: float  # seconds open
    queued_bytes: int  # waiting for a client that has not read them
    resumable: bool  # loses nothing by reconnecting (a chat member with history, an echo or API socket)


T = TypeVar("T")


@dataclass(frozen=True)
class Movable(Generic[T]):
    item: T
    socket: Socket


def choose(sockets: Sequence[Movable[T]], count: int, min_age: float, rng: random.Random | None = None) -> list[T]:
    """Up to ``count`` sockets that lose nothing by moving, picked at random
    (so no room moves all at once)."""
    if count <= 0:
        return []
    eligible = [
        movable.item
        for movable in sockets
        if movable.socket.resumable and movable.socket.age >= min_age and movable.socket.queued_bytes == 0
    ]
    return (rng or random).sample(eligible, min(count, len(eligible)))


# --- the staggered drain --------------------------------------------------------

DRAIN_TICK_SECONDS = 0.2
DRAIN_MIN_RATE = 20.0  # sockets a second: fewer than that are no storm


def drain_window(timeout: float) -> float:
    """Seconds from the signal over which a drain's closes are spread."""
    return max(0.0, timeout - max(1.0, timeout / 4))


def drain_batch(
    remaining: int,
    elapsed: float,
    window: float,
    tick: float = DRAIN_TICK_SECONDS,
    min_rate: float = DRAIN_MIN_RATE,
) -> int:
    """Sockets to close now, ``elapsed`` seconds into a drain with ``remaining`` open.

    Recomputed every tick from what is left, so sockets that leave by
    themselves, or a tick that comes late, even out; past the window, all.
    """
    if remaining <= 0:
        return 0
    ticks_left = max(1, math.floor((window - elapsed) / tick + 1e-9) + 1)
    return min(remaining, max(math.ceil(min_rate * tick), math.ceil(remaining / ticks_left)))


def drain_schedule(sockets: int, timeout: float, tick: float = DRAIN_TICK_SECONDS) -> list[int]:
    """The batches, one per tick from the signal on, for ``sockets`` open
    sockets that wait for their batch (none leaves by itself)."""
    window, batches, remaining = drain_window(timeout), [], sockets
    while remaining > 0:
        batch = drain_batch(remaining, len(batches) * tick, window, tick)
        batches.append(batch)
        remaining -= batch
    return batches


def drain_peak_per_second(sockets: int, timeout: float, tick: float = DRAIN_TICK_SECONDS) -> int:
    """The most sockets a drain closes within any one second: the handshakes a
    second it sends to the rest of the deployment, before client jitter."""
    batches = drain_schedule(sockets, timeout, tick)
    per_second = max(1, round(1 / tick))
    return max((sum(batches[start : start + per_second]) for start in range(len(batches))), default=0)
