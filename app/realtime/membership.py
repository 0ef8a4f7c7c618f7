"""Keeps this replica's group memberships alive in the core Redis layer.

channels_redis' RedisChannelLayer stores a group as a sorted set of channel
names scored by the time they joined, and group_send prunes members older
than ``group_expiry``. Two things follow:

* a socket open longer than ``group_expiry`` silently stops receiving, unless
  its membership is refreshed: this keeper re-adds every membership of the
  process every ``group_expiry / 3`` seconds;
* a SIGKILLed replica's members stay in Redis, and every group_send keeps
  writing to their dead channels, until they are ``group_expiry`` old: the
  blueprint therefore sets a short, bounded CHANNEL_GROUP_EXPIRY.

A Redis restart (the layer has no persistence) forgets every group. The
keeper checks each shard every couple of seconds and re-adds all memberships
as soon as a shard answers again after failing, or answers with a new
``run_id`` (a restart quicker than a check), so fan-out resumes in seconds.

The pub/sub layer needs none of this: its groups live in process memory and
redis-py resubscribes after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time

from channels_redis.core import RedisChannelLayer
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 2.0
# Memberships re-added at once; bounds Redis round trips in flight.
REFRESH_BATCH = 200


class MembershipKeeper:
    def __init__(self) -> None:
        self.memberships: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None
        self._run_ids: dict[int, str] = {}
        self.refreshes = 0

    def track(self, layer, group: str, channel: str) -> None:
        if not isinstance(layer, RedisChannelLayer):
            return
        self.memberships.add((group, channel))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep(layer))

    def forget(self, group: str, channel: str) -> None:
        self.memberships.discard((group, channel))

    async def _keep(self, layer: RedisChannelLayer) -> None:
        refresh_every = layer.group_expiry / 3
        last_refresh = time.monotonic()
        # Checked at once, not after the first pause: a restart that happens
        # before any run_id is known would otherwise go unnoticed.
        unreachable = False
        while self.memberships:
            try:
                restarted = await self._redis_restarted(layer)
                if unreachable or restarted:
                    logger.warning("Redis is back: re-adding %d memberships", len(self.memberships))
                if unreachable or restarted or time.monotonic() - last_refresh >= refresh_every:
                    await self.refresh(layer)
                    last_refresh = time.monotonic()
                unreachable = False
            except (TimeoutError, OSError, RedisError) as error:
                # Redis is down: /readyz says so; try again next round.
                if not unreachable:
                    logger.warning("membership check failed, Redis unreachable: %r", error)
                unreachable = True
            await asyncio.sleep(min(CHECK_INTERVAL_SECONDS, refresh_every))

    async def _redis_restarted(self, layer: RedisChannelLayer) -> bool:
        restarted = False
        for index in range(layer.ring_size):
            info = await layer.connection(index).info("server")
            run_id = info["run_id"]
            if self._run_ids.get(index, run_id) != run_id:
                restarted = True
            self._run_ids[index] = run_id
        return restarted

    async def refresh(self, layer: RedisChannelLayer) -> None:
        memberships = list(self.memberships)
        for start in range(0, len(memberships), REFRESH_BATCH):
            batch = memberships[start : start + REFRESH_BATCH]
            await asyncio.gather(*(layer.group_add(group, channel) for group, channel in batch))
            # A socket that left while its membership was being re-added must not stay a member.
            left = [membership for membership in batch if membership not in self.memberships]
            await asyncio.gather(*(layer.group_discard(group, channel) for group, channel in left))
        self.refreshes += 1


keeper = MembershipKeeper()
