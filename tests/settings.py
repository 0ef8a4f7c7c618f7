"""Test settings: the production settings module, fed a test environment.

Production values are read from the environment at import, so the tests set
the environment first instead of re-declaring settings.
"""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-never-deployed")
os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
os.environ.setdefault("BROADCAST_TOKEN", "test-broadcast-token")
os.environ.setdefault("POD_NAME", "pod-test")
# Redis-backed tests configure their layers explicitly against the fixture's server.
os.environ["CHANNEL_LAYER"] = "memory"

from config.settings import *  # noqa: F403

# Templates render without a collectstatic run.
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
# WhiteNoise serves STATIC_ROOT and warns when it is missing; tests render
# templates without a collectstatic run, so an empty one is enough.
os.makedirs(STATIC_ROOT, exist_ok=True)  # noqa: F405
