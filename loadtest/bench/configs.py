"""The configurations the benchmark compares: each is a local stack, 3 replicas behind nginx."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

BASELINE = "raw"


@dataclass(frozen=True)
class Configuration:
    name: str
    summary: str
    channel_layer: str = "redis"
    env: dict[str, str] = field(default_factory=dict)
    # argv of one replica on 127.0.0.1:port; None runs the stack's own Daphne replica.
    replica_command: Callable[[int], list[str]] | None = None


def raw_replica(port: int) -> list[str]:
    return [sys.executable, "-m", "loadtest.bench.raw_server", "--port", str(port)]


CONFIGURATIONS = [
    Configuration("daphne-redis", "Daphne + RedisChannelLayer (the Channels docs' default)", "redis"),
    Configuration("daphne-pubsub", "Daphne + RedisPubSubChannelLayer", "redis-pubsub"),
    Configuration(
        "daphne-fanout", "Daphne + the blueprint's fan-out layer (realtime.layers), the default", "redis-fanout"
    ),
    # The cost of the delivery guarantees: the default without room history
    # (every publish then a plain PUBLISH, no offsets, no resume).
    Configuration(
        "daphne-fanout-nohistory",
        "the default without room history (ROOM_HISTORY_SIZE=0)",
        "redis-fanout",
        env={"ROOM_HISTORY_SIZE": "0"},
    ),
    Configuration(
        BASELINE, "raw baseline: websockets + redis.asyncio pub/sub, no Channels", replica_command=raw_replica
    ),
]


def by_name(names: list[str]) -> list[Configuration]:
    known = {configuration.name: configuration for configuration in CONFIGURATIONS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown configuration {', '.join(unknown)}: choose from {', '.join(known)}")
    return [known[name] for name in names]
