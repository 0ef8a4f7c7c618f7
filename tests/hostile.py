"""What the hostile-client tests observe of a replica from outside: its metrics,
its memory, its health latency, its log; and well-behaved room members that
count every message and its latency while an attack runs."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import websockets

from loadtest.fanout_check import percentile
from loadtest.room_member import now_ms
from tests.metrics import metric_sum, scrape  # noqa: F401 (the hostile tests import scrape from here)
from tests.processes import Daphne

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


# --- metrics, memory -----------------------------------------------------------


def open_sockets(port: int) -> float:
    return metric_sum(port, "blueprint_ws_open_sockets")


def wait_open_sockets(ports: dict[str, int], expected: float = 0, timeout: float = 10.0) -> dict[str, float]:
    """Wait until every replica's open-socket gauge is ``expected``; returns the last readings."""
    deadline = time.monotonic() + timeout
    while True:
        readings = {name: open_sockets(port) for name, port in ports.items()}
        if all(value == expected for value in readings.values()) or time.monotonic() > deadline:
            return readings
        time.sleep(0.1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def healthz(port: int) -> tuple[int, float]:
    started = time.perf_counter()
    with _HTTP.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        response.read()
        return response.status, (time.perf_counter() - started) * 1000


# --- /healthz latency from another process -------------------------------------

_PROBE = r"""
import sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
urls, interval = sys.argv[1].split(","), float(sys.argv[2])
for url in urls:  # warm-up, not recorded: lazy imports, first connection
    try:
        opener.open(url, timeout=5).read()
    except Exception:
        pass
began = time.monotonic()
print("ready", flush=True)
while True:
    for url in urls:
        started = time.perf_counter()
        try:
            with opener.open(url, timeout=5) as response:
                response.read()
                status = response.status
        except Exception as error:
            status = getattr(error, "code", 0) or 0
        took_ms = round((time.perf_counter() - started) * 1000, 2)
        print(url, status, took_ms, round(time.monotonic() - began, 2), flush=True)
    time.sleep(interval)
"""


# A kubelet's default probe timeout: a slower answer counts as a failed probe.
PROBE_TIMEOUT_MS = 1000.0


class HealthProbe:
    """Polls /healthz of replicas from its own process (the test's busy event
    loop must not pass for a slow replica); ``results()`` after ``stop()``."""

    def __init__(self, ports: dict[str, int], interval: float = 0.2):
        self.ports = ports
        self.urls = {f"http://127.0.0.1:{port}/healthz": name for name, port in ports.items()}
        self.interval = interval
        self.lines: list[str] = []

    def __enter__(self) -> HealthProbe:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PROBE, ",".join(self.urls), str(self.interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._ready = threading.Event()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        self._ready.wait(10)
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip() == "ready":
                self._ready.set()
            self.lines.append(line.strip())

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=5)
        self._pump.join(timeout=5)

    def results(self) -> list[tuple[str, int, float, float]]:
        """(replica, status, latency ms, seconds since the probe started)."""
        parsed = []
        for line in self.lines:
            parts = line.split()
            if len(parts) == 4 and parts[0] in self.urls:
                parsed.append((self.urls[parts[0]], int(parts[1]), float(parts[2]), float(parts[3])))
        return parsed

    def problems(self, p99_ms: float = 100.0, ceiling_ms: float = PROBE_TIMEOUT_MS) -> list[str]:
        """Every probe 200, the 99th percentile under ``p99_ms``, none as slow as
        a kubelet's probe timeout. Single probes on a 2-core host shared by
        three replicas, nginx, Redis and the load are descheduled now and then
        (up to ~150 ms seen with no attack running), so the bar a user would
        notice is the percentile and the timeout, not the one worst probe."""
        results = self.results()
        if not results:
            return ["the health probe got no answer at all"]
        found = [
            f"{name} /healthz {status} in {ms:.0f} ms at {at:.1f} s"
            for name, status, ms, at in results
            if status != 200 or ms >= ceiling_ms
        ]
        p99 = percentile([ms for _, _, ms, _ in results], 99)
        if p99 >= p99_ms:
            found.append(f"/healthz p99 {p99:.0f} ms over {len(results)} probes")
        return found

    def summary(self) -> str:
        latencies = [ms for _, _, ms, _ in self.results()]
        if not latencies:
            return "no health probes"
        return f"{len(latencies)} health probes, max {max(latencies):.1f} ms, p99 {percentile(latencies, 99):.1f} ms"


# --- logs ------------------------------------------------------------------------


class CapturedLog(io.TextIOBase):
    """A LocalStack ``log=``: keeps every ``[name] line`` so a test can count a
    replica's lines (tracebacks, per-message spam) before and after an attack."""

    def __init__(self, echo=None):
        self.lines: list[str] = []
        self.echo = echo
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.lines.extend(line for line in text.splitlines() if line)
        if self.echo is not None:
            self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        pass

    def of(self, name: str) -> list[str]:
        prefix = f"[{name}] "
        with self._lock:
            return [line[len(prefix) :] for line in self.lines if line.startswith(prefix)]

    def count(self, name: str) -> int:
        return len(self.of(name))


def traceback_lines(lines: list[str]) -> int:
    return sum(1 for line in lines if "Traceback" in line)


def log_records(lines: list[str]) -> list[str]:
    """The app's own log records (JSON lines), without Daphne's access log,
    which the test's health probes fill."""
    return [line for line in lines if log_level(line) is not None]


def log_level(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("level") if isinstance(entry, dict) else None


class LiveDaphne(Daphne):
    """tests.processes.Daphne whose output is read while it runs, line by line."""

    def __enter__(self) -> LiveDaphne:
        self.lines: list[str] = []
        super().__enter__()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        return self

    def _read(self) -> None:
        for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def __exit__(self, exc_type, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._pump.join(timeout=5)
        self.output = "\n".join(self.lines)
        if exc_type is not None:
            print(f"--- {self.name} output (last 200 lines) ---\n" + "\n".join(self.lines[-200:]))


# --- well-behaved members ------------------------------------------------------------


class Member:
    """A chat member that reads everything, as a browser tab does: records
    every chat message's id and latency (now - sent_at) and every other frame."""

    def __init__(self, ws, pod: str, where: str):
        self.ws, self.pod, self.where = ws, pod, where
        self.ids: dict[str, int] = {}
        self.latencies: list[float] = []
        self.other: list[dict] = []
        self.close_code: int | None = None
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def join(cls, ws_url: str, origin: str, room: str, where: str = "", **options) -> Member:
        ws = await websockets.connect(
            f"{ws_url}/ws/chat/{room}/", origin=origin, max_size=None, open_timeout=10, **options
        )
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["type"] == "welcome", welcome
        return cls(ws, welcome["pod"], where)

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                received = now_ms()
                frame = json.loads(text)
                if frame.get("type") == "chat.message":
                    key = str(frame.get("id"))
                    self.ids[key] = self.ids.get(key, 0) + 1
                    if isinstance(frame.get("sent_at"), (int, float)):
                        self.latencies.append(received - frame["sent_at"])
                else:
                    self.other.append(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code

    def missing(self, ids: list[str]) -> list[str]:
        return [key for key in ids if self.ids.get(key, 0) != 1]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self.reader, 10)


class Publisher:
    """Publishes ``rate`` messages a second through ``sockets`` members in turn
    (each under the per-socket limit), ids ``<tag>-<n>``, stamped with sent_at."""

    def __init__(self, members: list[Member], rate: float, tag: str, size: int = 0):
        self.members, self.rate, self.tag = members, rate, tag
        self.body = "m" * size
        self.ids: list[str] = []
        self.errors: list[dict] = []

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        n = 0
        while loop.time() - started < seconds:
            due = int((loop.time() - started) * self.rate) + 1
            while n < due:
                member = self.members[n % len(self.members)]
                key = f"{self.tag}-{n}"
                await member.ws.send(json.dumps({"message": self.body or key, "id": key, "sent_at": now_ms()}))
                self.ids.append(key)
                n += 1
            await asyncio.sleep(0.005)


async def settle(members: list[Member], ids: list[str], timeout: float = 10.0) -> None:
    """Until every member has every id, or timeout (then the caller reports what is missing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(not member.missing(ids) for member in members):
            return
        await asyncio.sleep(0.1)


def delivery_problems(members: list[Member], ids: list[str]) -> list[str]:
    problems = []
    for member in members:
        lost = member.missing(ids)
        if lost:
            problems.append(
                f"member on {member.pod} ({member.where}) missed or duplicated {len(lost)} of {len(ids)}: "
                f"{lost[:5]}, close code {member.close_code}"
            )
        elif member.close_code is not None:
            problems.append(f"member on {member.pod} ({member.where}) was closed with {member.close_code}")
    return problems


def latency_summary(members: list[Member]) -> tuple[float, float, int]:
    latencies = [value for member in members for value in member.latencies]
    if not latencies:
        return math.nan, math.nan, 0
    return percentile(latencies, 50), percentile(latencies, 99), len(latencies)


def replica_pid(stack, name: str) -> int:
    """The pid of a LocalStack replica, found by the port on its command line."""
    port = str(stack.replica_ports[name])
    for pid in stack.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"realtime.server" in argv and port.encode() in argv:
            return pid
    raise RuntimeError(f"no process found for {name} (port {port})")


class RawPublisher:
    """Publishes ``rate`` chat messages a second through raw sockets (each
    under the per-socket limit) that read and discard what they receive: the
    publishing side of a busy room at little CPU cost to the test process."""

    def __init__(self, host: str, port: int, room: str, sockets: int):
        from tests import rawws

        self.rawws = rawws
        self.sockets = [rawws.RawWebSocket(host, port, f"/ws/chat/{room}/") for _ in range(sockets)]
        self.stopped = threading.Event()
        self.received_bytes = 0
        self.drains = []
        for ws in self.sockets:
            ws.duplex = True
            ws.sock.settimeout(0.2)
            drain = threading.Thread(target=self._drain, args=(ws,), daemon=True)
            drain.start()
            self.drains.append(drain)

    def _drain(self, ws) -> None:
        while not self.stopped.is_set():
            try:
                chunk = ws.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self.received_bytes += len(chunk)

    def run(self, rate: float, seconds: float, tag: str, size: int) -> list[str]:
        """Blocking (run it in a thread); returns the ids published."""
        body = "m" * size
        ids = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate) + 1
            while n < due:
                key = f"{tag}-{n}"
                frame = json.dumps({"message": body, "id": key, "sent_at": now_ms()})
                if not self.sockets[n % len(self.sockets)].send_text(frame):
                    raise AssertionError(f"publisher socket {n % len(self.sockets)} was closed by the replica")
                ids.append(key)
                n += 1
            time.sleep(0.004)
        return ids

    def close(self) -> None:
        self.stopped.set()
        for ws in self.sockets:
            ws.send_close(1000)
        for drain in self.drains:
            drain.join(2)
        for ws in self.sockets:
            ws.close()
