"""The configurations the benchmark compares: each is a local stack, 3 replicas behind nginx.

The same nginx, Redis, generator and workload for all: the Daphne replicas
with each channel layer (and the default without room history: what the
delivery guarantees cost), python-socketio (the peer a Python team picks
instead), and two servers with no framework at all, ``websockets`` (the
baseline every ratio is read against, as in earlier runs) and picows (the
fastest Python WebSocket stack: the Python limit).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.stack import LocalStack

BASELINE = "raw"
DEFAULT = "daphne-fanout"
NO_HISTORY = "daphne-fanout-nohistory"
PEER = "socketio"
LIMIT = "picows"


@dataclass(frozen=True)
class Configuration:
    name: str
    summary: str
    channel_layer: str = "redis"
    env: dict[str, str] = field(default_factory=dict)
    # argv of one replica on 127.0.0.1:port; None runs the stack's own Daphne replica.
    replica_command: Callable[[int], list[str]] | None = None
    # What the generator's members speak (loadgen.MEMBER_KINDS): the blueprint's JSON frames or Socket.IO.
    wire: str = "json"


def _module_replica(module: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", module, "--port", str(port)]

    return argv


raw_replica = _module_replica("loadtest.bench.raw_server")
picows_replica = _module_replica("loadtest.bench.picows_server")
socketio_replica = _module_replica("loadtest.bench.socketio_server")


CONFIGURATIONS = [
    Configuration("daphne-redis", "Daphne + RedisChannelLayer (the Channels docs' default)", "redis"),
    Configuration("daphne-pubsub", "Daphne + RedisPubSubChannelLayer", "redis-pubsub"),
    Configuration(DEFAULT, "Daphne + the blueprint's fan-out layer (realtime.layers), the default", "redis-fanout"),
    # The cost of the delivery guarantees: the default without room history
    # (every publish then a plain PUBLISH, no offsets, no resume).
    Configuration(
        NO_HISTORY,
        "the default without room history (ROOM_HISTORY_SIZE=0)",
        "redis-fanout",
        env={"ROOM_HISTORY_SIZE": "0"},
    ),
    Configuration(
        PEER,
        "python-socketio AsyncServer + AsyncRedisManager on uvicorn (Socket.IO over WebSocket)",
        replica_command=socketio_replica,
        wire="socketio",
    ),
    Configuration(
        BASELINE, "raw baseline: websockets + redis.asyncio pub/sub, no Channels", replica_command=raw_replica
    ),
    Configuration(LIMIT, "the Python limit: picows + redis.asyncio pub/sub on uvloop", replica_command=picows_replica),
]


# The benchmark places sockets on purpose (a memory batch on one replica at a
# time, the idle sockets a third on each): the replicas' rebalancing would
# refuse or move them, measuring itself instead (README, Rebalancing).
BENCH_ENV = {"REBALANCE": "0"}


def start_stack(configuration: Configuration, log) -> LocalStack:
    """A local stack for the configuration: 3 replicas behind nginx, its output to ``log``.
    Use it as a context manager, which starts and stops it."""
    return LocalStack(
        replicas=3,
        channel_layer=configuration.channel_layer,
        env={**BENCH_ENV, **configuration.env},
        log=log,
        replica_command=configuration.replica_command,
    )


def by_name(names: list[str]) -> list[Configuration]:
    known = {configuration.name: configuration for configuration in CONFIGURATIONS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown configuration {', '.join(unknown)}: choose from {', '.join(known)}")
    return [known[name] for name in names]
