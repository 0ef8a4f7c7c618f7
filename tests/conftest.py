import pytest

from deploy.redis_server import RedisServer


@pytest.fixture
def redis_server():
    """A fresh redis-server per test, stopped afterwards whatever the test did."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
