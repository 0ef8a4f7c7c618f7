"""Settings for every role of the blueprint, read from the environment.

The defaults run a single-process ``runserver`` with the in-memory channel
layer. Anything a production replica must set is checked here and fails with
one line naming the variable, rather than serving with an unsafe default.
The README's environment table lists every name read below.
"""

import os
import socket
from pathlib import Path

from config.env import ConfigError, env_bool, env_float, env_int, env_list, redis_hosts

BASE_DIR = Path(__file__).resolve().parent.parent

DEV_SECRET_KEY = "django-insecure-dev-only-never-deploy-this-key"

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", DEV_SECRET_KEY)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")


if not DEBUG:
    if SECRET_KEY == DEV_SECRET_KEY or not SECRET_KEY.strip():
        raise ConfigError("DJANGO_SECRET_KEY must be set to a long random value when DJANGO_DEBUG is off")
    if not ALLOWED_HOSTS:
        raise ConfigError("DJANGO_ALLOWED_HOSTS must list the served host names when DJANGO_DEBUG is off")

# The replica's name, stamped on every frame as origin / served_by. Kubernetes
# sets it from the downward API; compose and Docker leave the container hostname.
POD_NAME = os.environ.get("POD_NAME") or socket.gethostname()

INSTALLED_APPS = [
    "daphne",  # first: its runserver replaces Django's with an ASGI one
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "channels",
    "realtime",
]

MIDDLEWARE = [
    # First: probes and scrapes address pods by IP, which Host validation would refuse.
    "realtime.middleware.operational_endpoints",
    "django.middleware.security.SecurityMiddleware",
    # Static files straight from gunicorn, with hashed names and cache headers,
    # so nginx proxies /static/ and no volume is shared between images.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

# The app keeps no rows: sessions live in signed cookies, so no replica needs a
# writable database (the Kubernetes pods run with a read-only root filesystem).
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"

STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("DJANGO_STATIC_ROOT") or str(BASE_DIR.parent / "build" / "static")
# Production serves what `manage.py collectstatic` wrote (the image does it at
# build time, the local stack at start); debug serves the app folders as they are.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# Behind nginx: trust X-Forwarded-Proto for request.is_secure() only.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# --- Realtime -------------------------------------------------------------

WS_MAX_MESSAGE_BYTES = env_int("WS_MAX_MESSAGE_BYTES", 64 * 1024, minimum=128)
# Per socket: a token bucket of this many messages a second, this burst; a
# socket that keeps being refused for this many seconds (every refusal within
# a second of the one before, whatever it interleaves) is closed with 1008.
WS_RATE_LIMIT_PER_SECOND = env_float("WS_RATE_LIMIT_PER_SECOND", 50.0, minimum=0.1)
WS_RATE_LIMIT_BURST = env_float("WS_RATE_LIMIT_BURST", 100.0, minimum=1.0)
WS_RATE_LIMIT_CLOSE_AFTER_SECONDS = env_float("WS_RATE_LIMIT_CLOSE_AFTER_SECONDS", 3.0, minimum=0.1)
# Bytes queued for one client that is not reading them; past it the socket is
# closed with 4000 (fell behind: reconnect and resume). The replica-wide total
# of such queues has its own bound: past it, every socket that queues more is cut.
WS_MAX_PENDING_BYTES = env_int("WS_MAX_PENDING_BYTES", 1024 * 1024, minimum=64 * 1024)
WS_MAX_PENDING_BYTES_TOTAL = env_int("WS_MAX_PENDING_BYTES_TOTAL", 64 * 1024 * 1024, minimum=1024 * 1024)
# Group messages received from Redis and not yet handed to the replica's
# sockets (the fan-out layer). Past it the replica sheds: members that would
# miss a message are closed with 4000, and /readyz answers 503 until it drains.
FANOUT_MAX_BACKLOG_BYTES = env_int("FANOUT_MAX_BACKLOG_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024)
# Sockets one replica holds; beyond it new sockets are closed with 1013 (try again later).
WS_MAX_CONNECTIONS = env_int("WS_MAX_CONNECTIONS", 20000, minimum=1)
BROADCAST_TOKEN = os.environ.get("BROADCAST_TOKEN", "")
# Room history of the fan-out layer: the last ROOM_HISTORY_SIZE messages of a
# room (0: no history, no resume), forgotten ROOM_HISTORY_TTL_SECONDS after the
# room's last publish (0: kept until trimmed or evicted). A member that
# reconnects within that window gets what it missed (README, Wire protocol).
ROOM_HISTORY_SIZE = env_int("ROOM_HISTORY_SIZE", 1000, minimum=0)
ROOM_HISTORY_TTL_SECONDS = env_int("ROOM_HISTORY_TTL_SECONDS", 300, minimum=0)
# A replica that hears nothing on its Redis subscription link for this long
# (it PINGs five times as often) closes its room members with 1012, so they
# resume on another replica, and reports not ready until the link is back.
# Publishes and history reads give up after it too.
REDIS_LINK_TIMEOUT_SECONDS = env_float("REDIS_LINK_TIMEOUT_SECONDS", 5.0, minimum=0.5)
# How long /readyz waits for its channel-layer round trip before answering 503.
READYZ_TIMEOUT_SECONDS = env_float("READYZ_TIMEOUT_SECONDS", 2.0, minimum=0.1)
# /readyz answers from a result at most this old; one check at a time refreshes it.
READYZ_CACHE_SECONDS = env_float("READYZ_CACHE_SECONDS", 1.0, minimum=0.1)

# Rebalancing (realtime/rebalancing.py, realtime/peers.py). Every
# REBALANCE_INTERVAL_SECONDS a Daphne replica reports its open sockets to Redis
# and reads the others'. One holding more than REBALANCE_THRESHOLD x the
# deployment's mean and more than REBALANCE_MIN_EXCESS sockets above it closes
# at most REBALANCE_MAX_SHARE of its sockets with 1012 (they resume elsewhere),
# never going below that band. REBALANCE=0 turns the shedding off; the counts
# are still reported and drains still recorded. Empty means the default, as
# compose passes every variable it knows, set or not.
REBALANCE = env_bool("REBALANCE", True) if os.environ.get("REBALANCE", "").strip() else True
REBALANCE_INTERVAL_SECONDS = env_float("REBALANCE_INTERVAL_SECONDS", 10.0, minimum=0.5)
REBALANCE_THRESHOLD = env_float("REBALANCE_THRESHOLD", 1.2, minimum=1.0)
REBALANCE_MIN_EXCESS = env_int("REBALANCE_MIN_EXCESS", 50, minimum=1)
REBALANCE_MAX_SHARE = env_float("REBALANCE_MAX_SHARE", 0.02, minimum=0.001)
if REBALANCE_MAX_SHARE > 0.5:
    raise ConfigError(f"REBALANCE_MAX_SHARE={REBALANCE_MAX_SHARE:g} must be at most 0.5 (a share of the sockets)")


def _with_connection_options(host) -> dict:
    """Connection behaviour for every Redis host of the layer.

    redis-py's asyncio connections do not retry by default: the first command
    on a pooled connection that a Redis restart closed raises, and a consumer
    waiting on it dies with 1011. Retrying with jittered backoff reconnects
    instead; connecting gives up fast so /readyz answers within its own
    timeout. (No health_check_interval: its PING on a blocked BZPOPMIN
    connection left cancelled receives hanging, which stalled drains.)
    """
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    options = {
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "socket_connect_timeout": 2,
        "socket_keepalive": True,
    }
    return {**host, **options} if isinstance(host, dict) else {"address": host, **options}


# CHANNEL_LAYER's Redis values and their backends.
REDIS_LAYER_BACKENDS = {
    "redis": "channels_redis.core.RedisChannelLayer",
    "redis-pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
    # The fan-out layer, or channels_redis' pub/sub layer where the fan-out
    # layer's channels_redis internals are untested (realtime.compat).
    "redis-fanout": "realtime.layers.fanout_or_stock",
}


def _channel_layers(kind: str) -> dict:
    if kind == "memory":
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    if kind not in REDIS_LAYER_BACKENDS:
        raise ConfigError(f"CHANNEL_LAYER={kind!r} is not one of memory, {', '.join(REDIS_LAYER_BACKENDS)}")
    if "REDIS_URL" not in os.environ:
        raise ConfigError(f"REDIS_URL must be set when CHANNEL_LAYER={kind}")
    hosts = [_with_connection_options(host) for host in redis_hosts(os.environ["REDIS_URL"])]
    # One prefix per deployment: replicas that share it share groups.
    config = {"hosts": hosts, "prefix": os.environ.get("CHANNEL_LAYER_PREFIX", "asgi")}
    if kind != "redis":
        # The pub/sub layers keep groups in process memory: no capacity, no expiry.
        return {"default": {"BACKEND": REDIS_LAYER_BACKENDS[kind], "CONFIG": config}}
    config.update(
        # Per-channel queue bound: a consumer that falls this far behind starts
        # losing messages rather than growing Redis without limit.
        capacity=env_int("CHANNEL_CAPACITY", 1000, minimum=1),
        # A member that is not refreshed within this many seconds drops out of
        # its group: the bound on how long a killed replica's sockets cost
        # group_send time.
        # Channels' default is a day; the membership keeper refreshes live
        # members every third of this, so it can be short.
        group_expiry=env_int("CHANNEL_GROUP_EXPIRY", 300, minimum=3),
    )
    return {"default": {"BACKEND": REDIS_LAYER_BACKENDS["redis"], "CONFIG": config}}


CHANNEL_LAYER = os.environ.get("CHANNEL_LAYER", "memory").strip().lower()
CHANNEL_LAYERS = _channel_layers(CHANNEL_LAYER)

# JSON lines by default (what log pipelines ingest); LOG_FORMAT=plain for a terminal.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain" if DEBUG else "json")
if LOG_FORMAT not in ("json", "plain"):
    raise ConfigError(f"LOG_FORMAT={LOG_FORMAT!r} is not one of json, plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "config.logging.JsonFormatter"},
        "plain": {"format": f"%(asctime)s %(levelname)s {POD_NAME} %(name)s: %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
