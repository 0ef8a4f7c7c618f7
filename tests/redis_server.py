"""The tests' Redis: the same class the local stack runs (deploy/redis_server.py)."""
from deploy.ports import free_port
from deploy.redis_server import RedisServer

__all__ = ["RedisServer", "free_port"]
