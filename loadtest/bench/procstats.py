"""What the stack's processes cost (CPU, RSS), and what machine they ran on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import psutil

# Python packages whose versions decide the numbers.
VERSIONED_PACKAGES = (
    "Django",
    "channels",
    "channels-redis",
    "daphne",
    "Twisted",
    "autobahn",
    "websockets",
    "redis",
    "python-socketio",
    "python-engineio",
    "uvicorn",
    "picows",
    "aiofastnet",
    "uvloop",
)
# Sockets of the generator, nginx (two connections per WebSocket) and the
# replicas all count against the open-file limit the stack inherits.
WANTED_OPEN_FILES = 65536


def listening_pids(port: int) -> list[int]:
    """Processes with a socket listening on ``port`` (an nginx master and its workers share one)."""
    return sorted(
        {
            connection.pid
            for connection in psutil.net_connections(kind="tcp")
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid
        }
    )


class CpuMeter:
    """CPU share (1.0 = one core) of groups of processes between ``start`` and ``read``."""

    def __init__(self, groups: dict[str, list[int]]):
        self.processes = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self.start()

    def _cpu(self) -> dict[str, float]:
        totals = {}
        for name, processes in self.processes.items():
            total = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += times.user + times.system
            totals[name] = total
        return totals

    def start(self) -> None:
        self.began, self.cpu = time.monotonic(), self._cpu()

    def read(self) -> dict[str, float]:
        """Shares since ``start``; ``seconds`` holds the CPU seconds themselves."""
        wall = time.monotonic() - self.began
        now = self._cpu()
        self.seconds = {name: now[name] - self.cpu[name] for name in now}
        return {name: round(used / wall, 3) for name, used in self.seconds.items()}


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise this process's open-file limit (children inherit it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        # Raising the hard limit needs root (CAP_SYS_RESOURCE); otherwise the hard limit is the ceiling.
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version_line(argv: list[str]) -> str:
    if not shutil.which(argv[0]):
        return "not found"
    result = subprocess.run(argv, capture_output=True, text=True)
    return (result.stdout or result.stderr).strip().splitlines()[0]


def machine(nginx: str) -> dict:
    """Cores, memory, CPU model, kernel and every version the numbers depend on."""
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: importlib.metadata.version(name) for name in VERSIONED_PACKAGES},
        "redis_server": _version_line(["redis-server", "--version"]),
        "nginx": _version_line([nginx, "-v"]),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]
