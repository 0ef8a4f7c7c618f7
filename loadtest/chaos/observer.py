"""What the replicas look like from outside, once a second: which daphne
containers run, whether each answers ``/readyz`` 200, and its resident memory.

Readiness is asked over the project's network from this machine (the
containers' own addresses, no port published), memory read from the
container's main process in /proc: nothing runs inside the containers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from loadtest.compose_stack import ComposeStack, docker_inspect, replica_name
from loadtest.fanout_check import HTTP

SAMPLE_SECONDS = 1.0
DAPHNE_PORT = 8000


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    replica: str  # the replica's POD_NAME
    running: bool
    ready: bool
    rss_bytes: int


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def ready(address: str) -> bool:
    try:
        with HTTP.open(f"http://{address}:{DAPHNE_PORT}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:  # URLError is one
        return False


@dataclass
class Observer:
    stack: ComposeStack
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            self.samples += await asyncio.to_thread(self.sample)
            await asyncio.sleep(max(0.0, SAMPLE_SECONDS - (time.monotonic() - started)))

    def sample(self) -> list[Sample]:
        ids = self.stack.containers("daphne", all_states=True)
        found = []
        now = time.time()
        for container in docker_inspect(*ids) if ids else []:
            state = container["State"]
            running = bool(state["Running"]) and not state["Paused"]
            address = next(iter(container["NetworkSettings"]["Networks"].values()), {}).get("IPAddress")
            found.append(
                Sample(
                    now,
                    replica_name(container),
                    running,
                    running and bool(address) and ready(address),
                    rss_bytes(state["Pid"]) if running else 0,
                )
            )
        return found

    def healthy_at(self, after: float, replicas: int) -> float | None:
        """The first sample time at or after ``after`` when ``replicas`` daphne
        containers run and every running one answers ready."""
        by_time: dict[float, list[Sample]] = {}
        for sample in self.samples:
            if sample.at >= after:
                by_time.setdefault(sample.at, []).append(sample)
        for at in sorted(by_time):
            running = [s for s in by_time[at] if s.running]
            if len(running) == replicas and all(s.ready for s in running):
                return at
        return None

    def peak_rss(self, start: float, end: float) -> tuple[int, str]:
        inside = [s for s in self.samples if start <= s.at < end]
        peak = max(inside, key=lambda s: s.rss_bytes, default=None)
        return (peak.rss_bytes, peak.replica) if peak else (0, "")
