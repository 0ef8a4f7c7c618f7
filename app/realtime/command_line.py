"""The replica's command line, one definition for the image's entrypoint, the
local stack and the tests: ``python -m realtime.server --bind HOST --port PORT``.

realtime.server puts OPTIONS before the arguments it is given and the
application after them, so whatever starts a replica runs it as production
does (an option given again on the command line wins: argparse keeps the last).
"""

from __future__ import annotations

import os

# Pings keep idle sockets inside nginx's proxy_read_timeout (75 s; a test
# holds the two together) and find dead clients: one unanswered for the
# timeout is closed.
PING_INTERVAL_SECONDS = 20
PING_TIMEOUT_SECONDS = 30
# --proxy-headers: the client address is nginx's X-Forwarded-For.
OPTIONS = (
    "--proxy-headers",
    "--ping-interval",
    str(PING_INTERVAL_SECONDS),
    "--ping-timeout",
    str(PING_TIMEOUT_SECONDS),
)
APPLICATION = "config.asgi:application"


def argv(python: str, host: str, port: int) -> list[str]:
    """How to start a replica listening on host:port."""
    return [python, "-m", "realtime.server", "--bind", host, "--port", str(port)]


def access_log_on() -> bool:
    """LOG_ACCESS=1: a line per handshake, connect and disconnect. Off by
    default: nginx logs every request at the edge, with the client's address."""
    return os.environ.get("LOG_ACCESS") == "1"


def complete(args: list[str]) -> list[str]:
    """What realtime.server hands Daphne's command line for ``args``."""
    access_log = ("--access-log", "-" if access_log_on() else os.devnull)
    return [*OPTIONS, *access_log, *args, APPLICATION]
