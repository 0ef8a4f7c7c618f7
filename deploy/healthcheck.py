"""Container health probe: exit 0 when the URL answers 2xx, 1 otherwise.

The images have no curl (the offline Python base is Debian's python3 alone),
so Docker's HEALTHCHECK and compose run this with the image's own Python:

    python -m deploy.healthcheck http://127.0.0.1:8000/healthz
    python -m deploy.healthcheck tcp://locust-master:5557    # a port accepts connections
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

TIMEOUT_SECONDS = 3.0
# Straight to the address given, whatever proxy variables the container carries.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str) -> str:
    """What answered, or raise OSError saying what did not."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        if not parts.hostname or not parts.port:
            raise ValueError(f"tcp:// needs a host and a port, got {url!r}")
        with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_SECONDS):
            return f"{parts.hostname}:{parts.port} accepts connections"
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http://, https:// or tcp:// URL, got {url!r}")
    with _OPENER.open(url, timeout=TIMEOUT_SECONDS) as response:
        return f"{url} answered {response.status}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m deploy.healthcheck URL", file=sys.stderr)
        return 2
    try:
        print(probe(argv[0]))
    except urllib.error.HTTPError as error:
        print(f"{argv[0]} answered {error.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"{argv[0]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
