"""A Sentinel failover under a replica, with real processes: a master, its
replica and three Sentinels (redis-server in sentinel mode, as Debian's
redis-sentinel runs it). The master is killed; the Sentinels promote the
replica; the app replica follows the new master, and every member either
resumes with what it missed or is told ``recovered: false``.
"""

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import websockets

from deploy.ports import free_port
from tests.integration.test_history import FANOUT, chats, join, publish
from tests.processes import Daphne, status_of, wait_for

pytestmark = pytest.mark.redis

MASTER = "blueprint"


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class SentinelSet:
    """A master, a replica and three Sentinels on loopback, in a temporary directory."""

    def __init__(self, directory: Path):
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.directory = directory
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "wb")  # noqa: SIM115 - the server writes to it until stop()
        self.processes[name] = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "SentinelSet":
        # --dir: a replica writes the full sync it receives to disk.
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self._start("master", ["--port", str(self.master_port), *common])
        self._start(
            "replica", ["--port", str(self.replica_port), *common, "--replicaof", "127.0.0.1", str(self.master_port)]
        )
        for index, port in enumerate(self.sentinel_ports):
            config = self.directory / f"sentinel-{index}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
            )
            self._start(f"sentinel-{index}", [str(config), "--sentinel"])
        wait_for(
            lambda: all(answers(port) for port in [self.master_port, self.replica_port, *self.sentinel_ports]),
            10,
            "redis up",
        )
        replica = redis.Redis(port=self.replica_port)
        wait_for(lambda: replica.info("replication")["master_link_status"] == "up", 10, "replica in sync")
        sentinel = redis.Redis(port=self.sentinel_ports[0])
        wait_for(lambda: sentinel.sentinel_master(MASTER)["num-other-sentinels"] == 2, 15, "sentinels know each other")
        wait_for(lambda: sentinel.sentinel_master(MASTER)["num-slaves"] == 1, 15, "sentinels know the replica")
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()

    @property
    def url(self) -> str:
        return "sentinel://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports) + f"/{MASTER}/0"

    def master(self) -> int:
        host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER)
        return int(port)


@pytest.fixture
def sentinels(tmp_path):
    with SentinelSet(tmp_path) as sentinel_set:
        yield sentinel_set


def test_members_resume_or_are_told_after_a_sentinel_failover(sentinels):
    async def scenario(daphne):
        member, _ = await join(daphne, "failover")
        publisher, _ = await join(daphne, "failover")
        await publish(publisher, ["before"])
        (before,) = await chats(member, 1)
        await chats(publisher, 1)

        sentinels.processes["master"].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: sentinels.master() == sentinels.replica_port, 30, "the Sentinels to promote the replica")
        promoted = time.monotonic() - killed
        # The member is sent to resume, by the lost link (1012) or by the new
        # epoch of the next message (4000).
        wait_for(lambda: status_of(f"http://{daphne.base}/readyz") == 200, 30, "the replica on the new master")
        publisher, _ = await join(daphne, "failover")
        await publish(publisher, ["after"])
        # Its own copy back: published, and in the new master's history, before
        # the member resumes (a publish can still be finding the new master).
        await chats(publisher, 1, timeout=15)
        with pytest.raises(websockets.ConnectionClosed):
            await chats(member, 5, timeout=15)
        back, welcome = await join(daphne, "failover", {"epoch": before["epoch"], "offset": before["offset"]})
        frames = await chats(back, welcome["replayed"])
        await publish(publisher, ["later"])
        frames += await chats(back, 1)
        return member.close_code, promoted, welcome, frames

    with Daphne(sentinels.url, REDIS_LINK_TIMEOUT_SECONDS="2", **FANOUT) as daphne:
        close_code, promoted, welcome, frames = asyncio.run(scenario(daphne))
    print(f"promoted {promoted:.1f} s after the kill; member closed with {close_code}; welcome {welcome}")
    assert close_code in (1012, 4000)
    # The new master's history is not trusted (it may lack the last writes): a new epoch.
    assert welcome["recovered"] is False
    assert [frame["message"] for frame in frames] == ["after", "later"]
    assert [frame["offset"] for frame in frames] == [1, 2]
    assert {frame["epoch"] for frame in frames} == {welcome["epoch"]}
