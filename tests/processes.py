"""Real app processes for tests: start, wait on real readiness, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from realtime import command_line

from deploy.ports import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll until predicate() is true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start(args: list[str], env: dict) -> subprocess.Popen:
    """Start a process in app/ with a clean environment (no stray Django/Redis settings)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHANNEL_", "REDIS_", "POD_", "WS_"))}
    return subprocess.Popen(
        args, cwd=REPO / "app", env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def stop(process: subprocess.Popen) -> str:
    """Terminate (then kill) and return everything the process printed."""
    if process.poll() is None:
        process.terminate()
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output.decode(errors="replace")


class Daphne:
    """One replica on Redis, started as production starts it: ``python -m realtime.server``."""

    def __init__(self, redis_url: str, name: str = "daphne-test", wait_path: str = "/readyz", **env: str):
        self.port = free_port()
        self.wait_path = wait_path
        self.name = name
        self.base = f"127.0.0.1:{self.port}"
        self.env = {
            "CHANNEL_LAYER": "redis",
            "REDIS_URL": redis_url,
            "DJANGO_SECRET_KEY": "process-test-key",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
            "POD_NAME": name,
            **env,
        }
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Daphne:
        args = command_line.argv(sys.executable, "127.0.0.1", self.port)
        self.process = start(args, self.env)
        wait_for(lambda: status_of(f"http://{self.base}{self.wait_path}") == 200, 30, f"{self.name} {self.wait_path}")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.output = stop(self.process)
        if exc_type is not None:  # the replica's own account goes into the failure report
            print(f"--- {self.name} output ---\n{self.output}")

    def ws(self, path: str) -> str:
        return f"ws://{self.base}{path}"

    @property
    def origin(self) -> str:
        return f"http://{self.base}"
