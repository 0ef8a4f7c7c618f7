"""Settings refuse unsafe production values with one line naming the variable.

Each case imports the real settings module in a fresh interpreter, the way
daphne, gunicorn and manage.py load it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAFE = {"DJANGO_SECRET_KEY": "a-long-random-production-key", "DJANGO_ALLOWED_HOSTS": "example.com"}


def load_settings(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHANNEL_", "REDIS_"))}
    clean.update(env, PYTHONPATH=str(REPO / "app"), DJANGO_SETTINGS_MODULE="config.settings")
    code = "from django.conf import settings; print(settings.CHANNEL_LAYERS['default']['BACKEND'])"
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "env,variable",
    [
        ({"DJANGO_ALLOWED_HOSTS": "example.com"}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_SECRET_KEY": "x" * 40}, "DJANGO_ALLOWED_HOSTS"),
        ({**SAFE, "CHANNEL_LAYER": "redis"}, "REDIS_URL"),
        ({**SAFE, "CHANNEL_LAYER": "rabbit"}, "CHANNEL_LAYER"),
        ({**SAFE, "WS_MAX_MESSAGE_BYTES": "ten"}, "WS_MAX_MESSAGE_BYTES"),
        ({**SAFE, "DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
    ],
)
def test_unsafe_settings_stop_the_process_with_one_line(env, variable):
    result = load_settings(env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error: ") and variable in lines[0]


def test_debug_mode_runs_on_defaults_with_the_in_memory_layer():
    result = load_settings({"DJANGO_DEBUG": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "channels.layers.InMemoryChannelLayer"


@pytest.mark.parametrize(
    "layer,backend",
    [
        ("redis", "channels_redis.core.RedisChannelLayer"),
        ("redis-pubsub", "channels_redis.pubsub.RedisPubSubChannelLayer"),
        ("redis-fanout", "realtime.layers.fanout_or_stock"),
    ],
)
def test_channel_layer_selects_the_redis_backends(layer, backend):
    result = load_settings({**SAFE, "CHANNEL_LAYER": layer, "REDIS_URL": "redis://redis:6379/0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == backend
