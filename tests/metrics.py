"""A replica's own /metrics, read from outside (never through nginx, which hides it)."""

from __future__ import annotations

import re
import urllib.request

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(address: str | int) -> str:
    """The exposition of the replica at ``host:port`` (a bare port: on 127.0.0.1)."""
    if isinstance(address, int):
        address = f"127.0.0.1:{address}"
    with _HTTP.open(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(address: str | int, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in scrape(address).splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total
