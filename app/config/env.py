"""Parsing of the environment into settings values.

Kept apart from settings.py so every rule (what counts as true, how a Redis
URL list or a Sentinel address is read) is a plain function with a test.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlsplit


class ConfigError(SystemExit):
    """A setting that cannot be served with.

    A SystemExit, so a replica that imports bad settings stops with exit code 1
    and this one line on stderr (no traceback to dig through), whichever of
    daphne, gunicorn or manage.py loaded them.
    """

    def __init__(self, reason: str):
        super().__init__(f"configuration error: {reason}")


TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default or [])
    return [item.strip() for item in raw.split(",") if item.strip()]


SENTINEL_SCHEMES = ("sentinel", "redis+sentinel")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_hosts(value: str) -> list:
    """Turn REDIS_URL into the ``hosts`` list that channels_redis expects.

    Accepted forms:
      * one URL: ``redis://:password@redis:6379/0`` (``rediss://`` for TLS);
      * shards: ``redis://a:6379/0,redis://b:6379/0``; channels_redis spreads
        channels and groups over them by consistent hashing, so every replica
        must list the same shards in the same order;
      * Sentinel: ``sentinel://:password@h1:26379,h2:26379/mymaster/0``; the
        password is the master's, the optional ``?sentinel_password=`` the
        Sentinels' own.
    """
    value = value.strip()
    if not value:
        raise ConfigError(
            "REDIS_URL is empty: give redis://host:6379/0, a comma-separated shard list or sentinel://h1:26379,h2:26379/mymaster"
        )
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in SENTINEL_SCHEMES:
        return [_sentinel_host(value)]
    urls = [part.strip() for part in value.split(",") if part.strip()]
    for url in urls:
        url_scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if url_scheme not in REDIS_SCHEMES:
            raise ConfigError(f"REDIS_URL entry {_redact(url)!r} must start with redis://, rediss:// or unix://")
    return urls


def _sentinel_host(value: str) -> dict:
    parts = urlsplit(value)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[1]) if ":" in credentials else None
    sentinels = []
    for hostport in netloc.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"REDIS_URL sentinel {hostport!r} must be host:port")
        sentinels.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError("REDIS_URL sentinel form needs the master name: sentinel://h1:26379,h2:26379/mymaster")
    host: dict = {"sentinels": sentinels, "master_name": path[0]}
    if len(path) > 1:
        host["db"] = int(path[1])
    if password:
        host["password"] = password
    query = parse_qs(parts.query)
    if "sentinel_password" in query:
        host["sentinel_kwargs"] = {"password": query["sentinel_password"][0]}
    return host


def _redact(url: str) -> str:
    """Hide a password before a URL goes into an error message or a log."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(parts.password, "***")
    return url
