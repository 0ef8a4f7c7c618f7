"""The deployment as each Daphne replica sees it, through Redis: how many
sockets every replica holds, and how drains ended.

Every ``REBALANCE_INTERVAL_SECONDS`` (with a random offset, so replicas started
together do not report in step) a replica runs one script on Redis that
records its open sockets under its name, stamped with Redis's own clock, and
returns every report younger than three intervals (older ones are removed:
a replica killed or gone stops counting within that) together with the
deployment's drain outcomes. From the counts it decides whether to shed
(``realtime.rebalancing``), and closes the sockets it picked with 1012.

A draining replica withdraws its report at once (the sockets it closes land
on the others, which must not read that as an imbalance against it) and, as
its drain ends, adds its outcome to the deployment's count: ``completed``
(every socket closed and every consumer gone in time) or ``timed_out``
(sockets still open at ``DRAIN_TIMEOUT_SECONDS``). A process that exits right
after its drain is never scraped again, so the replicas that stay export the
count: each adds what it reads to ``blueprint_deployment_drains_total``, from
what Redis held when it first read it (a drain that ended before a replica's
first read is counted by the replicas that ran then).

Keys, under ``CHANNEL_LAYER_PREFIX`` on the first Redis shard (every replica
lists the shards in the same order): ``<prefix>:replica-sockets``, a hash of
replica name to ``<open sockets>:<Redis time in ms>`` that expires when
nobody reports; ``<prefix>:replica-drains``, a hash of outcome to count, with
no expiry (a few bytes; ``volatile-lru`` never evicts it; a Redis restart
starts it again, which the counters read as nothing new).

While it is above that band it also refuses new sockets with 503 (nginx
retries the handshake on another replica), so that neither the sockets it
closes nor new ones land on it again: where nginx picks a replica at random
(a DNS-resolved pool) most of them would, and a replica would shed the same
sockets over and over. The refusal lasts two intervals from the census that
found it above, and lapses by itself.

Redis unreachable: nothing is shed or refused, the report lapses (the others leave this
replica out of the mean), one warning per outage, and the loop keeps trying.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from django.conf import settings
from redis.commands.core import AsyncScript

from realtime import close_codes, metrics, rebalancing, ws_protocol
from realtime.layers import LAYER_ERRORS
from realtime.replica import state

logger = logging.getLogger(__name__)

COMPLETED, TIMED_OUT = "completed", "timed_out"
OUTCOMES = (COMPLETED, TIMED_OUT)
# A draining replica gives Redis this long to take its withdrawal and its
# outcome: the drain must end within DRAIN_TIMEOUT_SECONDS all the same.
DRAIN_RECORD_TIMEOUT_SECONDS = 1.0
# Endpoints whose sockets carry no state: a client reconnects and goes on.
STATELESS_PATHS = (b"/ws/echo/", b"/ws/api/")
CHAT_PATH = b"/ws/chat/"

# KEYS[1] the reports, KEYS[2] the drain outcomes. ARGV[1] this replica's
# name, ARGV[2] its open sockets ('' to report nothing), ARGV[3] how long a
# report counts, in ms. Returns {name, count, name, count, ...} of the fresh
# reports, and {outcome, count, ...}.
EXCHANGE_SCRIPT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. string.format('%d', now_ms))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local fresh = {}
local reports = redis.call('HGETALL', KEYS[1])
for i = 1, #reports, 2 do
  local count, at = string.match(reports[i + 1], '^(%d+):(%d+)$')
  if at and now_ms - tonumber(at) <= ttl then
    table.insert(fresh, reports[i])
    table.insert(fresh, count)
  else
    redis.call('HDEL', KEYS[1], reports[i])
  end
end
return {fresh, redis.call('HGETALL', KEYS[2])}
"""
_EXCHANGE = AsyncScript(None, EXCHANGE_SCRIPT.encode())


@dataclass(frozen=True)
class Census:
    sockets: dict[str, int]  # replica -> open sockets, fresh reports only (this one's included)
    drains: dict[str, int]  # outcome -> drains that ended so, deployment-wide, since Redis started


def _pairs(flat: list) -> dict[str, int]:
    return {
        (key.decode() if isinstance(key, bytes) else str(key)): int(value)
        for key, value in zip(flat[::2], flat[1::2], strict=True)
    }


def redis_configured() -> bool:
    """A Redis channel layer is configured: the replicas share a Redis."""
    return "hosts" in settings.CHANNEL_LAYERS["default"].get("CONFIG", {})


def chat_members_resume() -> bool:
    """A chat member closed now gets what it misses when it reconnects: the
    fan-out layer with room history serves the consumers (as ChatConsumer.has_history)."""
    from channels.layers import get_channel_layer

    from realtime import compat
    from realtime.layers import FanoutChannelLayer

    return (
        settings.ROOM_HISTORY_SIZE > 0
        and compat.fast(compat.CONSUMERS)
        and isinstance(get_channel_layer(), FanoutChannelLayer)
    )


def movable(protocol, now: float, chat_resumes: bool) -> rebalancing.Movable:
    path = getattr(protocol, "path", b"") or b""
    resumable = path.startswith(STATELESS_PATHS) or (chat_resumes and path.startswith(CHAT_PATH))
    opened = getattr(protocol, "socket_opened", now)  # Daphne's, set as the handshake starts
    return rebalancing.Movable(protocol, rebalancing.Socket(now - opened, protocol.queued_bytes, resumable))


class Deployment:
    """This replica's view of the others, and its part in the deployment's counts."""

    def __init__(self, config: rebalancing.RebalanceConfig | None = None) -> None:
        self.config = config or rebalancing.RebalanceConfig.from_settings()
        self.task: asyncio.Task | None = None
        self._redis = None
        self._unreachable = False
        self._drains_seen: dict[str, int] | None = None
        self._chat_resumes: bool | None = None
        self.last: Census | None = None

    # --- Redis ----------------------------------------------------------------

    def _client(self):
        if self._redis is None:
            from channels_redis.utils import create_pool
            from redis.asyncio import Redis

            host = settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0]
            self._redis = Redis(connection_pool=create_pool(host if isinstance(host, dict) else {"address": host}))
        return self._redis

    @property
    def _keys(self) -> tuple[str, str]:
        prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"].get("prefix", "asgi")
        return f"{prefix}:replica-sockets", f"{prefix}:replica-drains"

    async def exchange(self, open_sockets: int | None) -> Census:
        """Report ``open_sockets`` (None: report nothing) and read the deployment."""
        report = "" if open_sockets is None else str(max(0, open_sockets))
        ttl_ms = int(self.config.report_ttl * 1000)
        sockets, drains = await asyncio.wait_for(
            _EXCHANGE(self._keys, (metrics.REPLICA, report, ttl_ms), client=self._client()),
            settings.REDIS_LINK_TIMEOUT_SECONDS,
        )
        return Census(_pairs(sockets), _pairs(drains))

    # --- the loop -------------------------------------------------------------

    def start(self) -> asyncio.Task:
        for outcome in OUTCOMES:
            # Present from the start at 0: Prometheus sees the first drain as an increase.
            metrics.DEPLOYMENT_DRAINS.labels(metrics.REPLICA, outcome)
        self.task = asyncio.ensure_future(self.run())
        return self.task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, self.config.interval))
        while not state.draining:
            started = loop.time()
            await self.once()
            await asyncio.sleep(max(0.0, self.config.interval - (loop.time() - started)))

    async def once(self) -> int:
        """One report and decision; how many sockets it closed."""
        try:
            census = await self.exchange(None if state.draining else state.open_sockets)
        except LAYER_ERRORS as error:
            if not self._unreachable:
                logger.warning("could not report to Redis, not rebalancing until it answers: %r", error)
            self._unreachable = True
            state.above_mean_until = 0.0
            return 0
        except Exception:  # a bug here must not end the loop, nor the replica
            logger.exception("the deployment census failed")
            state.above_mean_until = 0.0
            return 0
        if self._unreachable:
            logger.info("reporting to Redis again")
        self._unreachable = False
        self.last = census
        self.observe_drains(census.drains)
        return self.rebalance(census)

    def observe_drains(self, drains: dict[str, int]) -> None:
        if self._drains_seen is None:
            self._drains_seen = {outcome: drains.get(outcome, 0) for outcome in OUTCOMES}
            return
        for outcome in OUTCOMES:
            now, seen = drains.get(outcome, 0), self._drains_seen[outcome]
            if now > seen:
                metrics.DEPLOYMENT_DRAINS.labels(metrics.REPLICA, outcome).inc(now - seen)
                if outcome == TIMED_OUT:
                    logger.warning("%d drain(s) in the deployment hit DRAIN_TIMEOUT_SECONDS", now - seen)
            # Below: Redis lost the counts (a restart); from here on, these.
            self._drains_seen[outcome] = now

    def rebalance(self, census: Census) -> int:
        """Refuse new sockets while well above the mean, and close what the
        decision says with 1012; how many were closed."""
        state.above_mean_until = 0.0
        if state.draining or state.redis_links_down:
            return 0
        mine = state.open_sockets
        others = [count for name, count in census.sockets.items() if name != metrics.REPLICA]
        if rebalancing.above_band(mine, others, self.config):
            # Until the next census, and one more in case it is late: a
            # refusal that outlived the census would starve this replica.
            state.above_mean_until = time.monotonic() + 2 * self.config.interval
        count = rebalancing.sockets_to_shed(mine, others, self.config)
        if not count:
            return 0
        if self._chat_resumes is None:
            self._chat_resumes = chat_members_resume()
        now = time.time()
        candidates = [
            movable(protocol, now, self._chat_resumes)
            for protocol in list(ws_protocol.open_protocols)
            if protocol.state == ws_protocol.ServerCloseProtocol.STATE_OPEN
        ]
        chosen = rebalancing.choose(candidates, count, self.config.min_age)
        closed = 0
        for protocol in chosen:
            try:
                protocol.serverClose(code=close_codes.SERVICE_RESTART)
                closed += 1
            except Exception as error:  # one broken socket must not stop the others
                logger.warning("could not close %s for rebalancing: %r", protocol, error)
        if closed:
            metrics.CONNECTIONS_REFUSED.labels(metrics.REPLICA, "rebalanced").inc(closed)
        mean = (mine + sum(others)) / (len(others) + 1)
        logger.info(
            "rebalancing: %d sockets here, %.0f the mean of %d replicas (band %.0f): closed %d of %d with 1012",
            mine,
            mean,
            len(others) + 1,
            rebalancing.band(mean, self.config),
            closed,
            count,
        )
        return closed

    # --- the drain ------------------------------------------------------------

    async def withdraw(self) -> None:
        """Draining: stop reporting, and take this replica out of the mean now."""
        if self.task is not None:
            self.task.cancel()
        try:
            await asyncio.wait_for(self._client().hdel(self._keys[0], metrics.REPLICA), DRAIN_RECORD_TIMEOUT_SECONDS)
        except Exception as error:  # its report lapses within three intervals anyway
            logger.warning("could not withdraw this replica's report from Redis: %r", error)

    async def record_drain(self, outcome: str) -> None:
        """Add this drain's outcome to the deployment's count."""
        try:
            await asyncio.wait_for(self._client().hincrby(self._keys[1], outcome, 1), DRAIN_RECORD_TIMEOUT_SECONDS)
        except Exception as error:
            logger.warning("could not record the drain (%s) in Redis; no alert will see it: %r", outcome, error)


deployment: Deployment | None = None


def start() -> Deployment | None:
    """Run the census on this replica's loop, where the replicas share a Redis."""
    global deployment
    if not redis_configured():
        return None
    deployment = Deployment()
    deployment.start()
    return deployment
