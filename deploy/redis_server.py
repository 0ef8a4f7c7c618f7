"""A real redis-server on a loopback port: the local stack's channel layer and the tests' Redis."""

from __future__ import annotations

import shutil
import socket
import time
from typing import TextIO

from deploy.ports import free_port
from deploy.processes import ManagedProcess


class RedisServer:
    """Start, stop and restart one redis-server; no persistence, like the channel layer's."""

    def __init__(self, port: int | None = None, password: str | None = None, log: TextIO | None = None):
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not shutil.which(binary):
            raise RuntimeError(
                "redis-server is not installed: apt-get install redis-server (make test installs it in CI)"
            )
        self.binary = binary
        self.port = port or free_port()
        self.password = password
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if password:
            args += ["--requirepass", password]
        self._process = ManagedProcess("redis", args, log=log)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def process(self):
        """The running ``subprocess.Popen``, or None when stopped."""
        return self._process.popen if self._process.running() else None

    def pids(self) -> list[int]:
        return self._process.pids()

    def start(self, timeout: float = 10.0) -> None:
        self._process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._process.running():
                raise RuntimeError(f"redis-server exited with {self._process.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self._process.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        self._process.stop()
