"""What the benchmark's two frameworkless servers (raw_server, picows_server) share:
their settings from the environment LocalStack gives a replica, stopping on
SIGTERM/SIGINT, and the command line ``--host H --port P``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Callable, Coroutine

from redis.asyncio import BlockingConnectionPool, Redis

REDIS_CONNECTIONS = 50


def server_settings(default_pod: str) -> dict:
    """The keyword arguments both servers' state takes, from the replica's environment."""
    return {
        "pod": os.environ.get("POD_NAME", default_pod),
        # Publishes wait for a free connection instead of failing: redis-py's
        # default pool raises MaxConnectionsError past 100 at once, which under
        # overload killed publishing sockets with 1011.
        "redis": Redis(
            connection_pool=BlockingConnectionPool.from_url(os.environ["REDIS_URL"], max_connections=REDIS_CONNECTIONS)
        ),
        "prefix": os.environ.get("CHANNEL_LAYER_PREFIX", "asgi"),
        "max_message_bytes": int(os.environ.get("WS_MAX_MESSAGE_BYTES", 64 * 1024)),
    }


def stop_on_signals() -> asyncio.Future:
    """Resolved by the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    return stop


def main(
    description: str,
    serve_forever: Callable[[str, int], Coroutine],
    run: Callable = asyncio.run,
    argv: list[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    run(serve_forever(args.host, args.port))
