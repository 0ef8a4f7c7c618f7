"""The faults, injected the way they happen in production, on the compose stack.

Each fault is a coroutine that breaks something, waits as the fault lasts,
and repairs what an orchestrator would (a killed container is started again,
as the kubelet restarts a pod). It returns a ``Window``: when the fault began
and ended, and how long the *whole service* could not deliver because of it
(a paused or failing-over Redis; zero when only one replica is hit), which
sets the stall a member may see.

Faults act on the project's own containers only: signals to their
processes, ``iptables`` inside a replica's network namespace (entered with
``nsenter``), docker and ``make scale`` for restarts and scaling.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from base64 import b64encode
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.chaos.observer import DAPHNE_PORT, Observer
from loadtest.chaos.workload import Workload
from loadtest.compose_stack import ComposeStack, run
from loadtest.fanout_check import HTTP

SENTINEL_MASTER = "blueprint"  # the name docker-compose.sentinel.yml monitors
REDIS_SERVICES = ("redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3")
# How long a killed container stays down before it is started again (a
# kubelet restarts a crashed container after about that).
RESTART_DELAY_SECONDS = 5.0
DRAIN_WAIT_SECONDS = 40.0


@dataclass
class Window:
    name: str
    kind: str
    start: float  # time.time()
    end: float = 0.0  # when the fault was over (repaired)
    outage_seconds: float = 0.0  # how long no replica could deliver
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # fault-specific verdicts
    next_start: float = 0.0  # the next window's start: this one's aftermath ends there
    replicas: int = 3  # daphne replicas the stack runs once the fault is over


@dataclass
class Chaos:
    """What a fault acts on."""

    stack: ComposeStack
    workload: Workload
    observer: Observer
    replicas: int = 3  # how many daphne replicas the stack should run

    async def docker(self, *args: str, timeout: float = 120) -> str:
        return (await asyncio.to_thread(run, ["docker", *args], timeout)).stdout

    def busiest_replica(self) -> tuple[str, str]:
        """(hostname, container id) of the replica holding most members."""
        hostnames = self.stack.hostnames()
        counts = Counter(m.pod for m in self.workload.all_members if m.connected and m.pod in hostnames)
        name = counts.most_common(1)[0][0] if counts else sorted(hostnames)[0]
        return name, hostnames[name]

    async def wait_ready(self, replicas: int, timeout: float = 90) -> None:
        """Until ``replicas`` daphne containers run and all answer ready."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            running = [s for s in await asyncio.to_thread(self.observer.sample) if s.running]
            if len(running) == replicas and all(s.ready for s in running):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{replicas} ready daphne replicas not seen within {timeout} s")


Fault = Callable[[Chaos], Awaitable[Window]]


def kill_replica(chaos_name: str = "kill -9 one replica") -> Fault:
    async def fault(chaos: Chaos) -> Window:
        name, container = chaos.busiest_replica()
        window = Window(chaos_name, "kill", time.time(), notes=[f"killed {name}"])
        await chaos.docker("kill", "--signal", "KILL", container)
        await asyncio.sleep(RESTART_DELAY_SECONDS)
        await chaos.docker("start", container)
        window.end = time.time()
        return window

    return fault


def drain_replica() -> Fault:
    async def fault(chaos: Chaos) -> Window:
        name, container = chaos.busiest_replica()
        window = Window("SIGTERM one replica (drain)", "drain", time.time(), notes=[f"drained {name}"])
        await chaos.docker("kill", "--signal", "TERM", container)
        end = time.monotonic() + DRAIN_WAIT_SECONDS
        while chaos.stack.inspect(container)["State"]["Running"] and time.monotonic() < end:
            await asyncio.sleep(0.2)
        state = chaos.stack.inspect(container)["State"]
        window.notes.append(f"exited with {state['ExitCode']} after the drain")
        window.checks["drained and exited 0"] = not state["Running"] and state["ExitCode"] == 0
        await chaos.docker("start", container)
        window.end = time.time()
        return window

    return fault


def rolling_restart() -> Fault:
    async def fault(chaos: Chaos) -> Window:
        window = Window("rolling restart of every replica", "rolling", time.time())
        for name, container in sorted(chaos.stack.hostnames().items()):
            # docker restart: SIGTERM (the drain), at most 30 s, then start.
            await chaos.docker("restart", "--time", "30", container, timeout=90)
            await chaos.wait_ready(chaos.replicas)
            window.notes.append(f"restarted {name}")
        window.end = time.time()
        return window

    return fault


def scale(steps: tuple[int, ...] = (5, 2, 3), pause: float = 10.0) -> Fault:
    async def fault(chaos: Chaos) -> Window:
        window = Window(f"scale {chaos.replicas} → {' → '.join(map(str, steps))} (nginx reloads)", "scale", time.time())
        for count in steps:
            await asyncio.to_thread(chaos.stack.make, "scale", N=count)
            chaos.replicas = count
            window.notes.append(f"{count} replicas at +{time.time() - window.start:.0f} s")
            await asyncio.sleep(pause)
        await old_nginx_workers_gone(chaos, window)
        window.end = time.time()
        return window

    return fault


def redis_addresses(chaos: Chaos) -> list[str]:
    return [chaos.stack.address(c) for service in REDIS_SERVICES for c in chaos.stack.containers(service)]


async def iptables(pid: int, *rule: str) -> None:
    """One iptables command inside the network namespace of process ``pid``."""
    await asyncio.to_thread(run, ["nsenter", "--target", str(pid), "--net", "iptables", "-w", *rule], 30)


def cut_from_redis(seconds: float) -> Fault:
    async def fault(chaos: Chaos) -> Window:
        name, container = chaos.busiest_replica()
        pid = chaos.stack.host_pid(container)
        addresses = redis_addresses(chaos)
        rules = [
            rule
            for address in addresses
            for rule in (("INPUT", "-s", address, "-j", "DROP"), ("OUTPUT", "-d", address, "-j", "DROP"))
        ]
        window = Window(
            f"one replica cut from Redis for {seconds:g} s (iptables DROP)",
            "cut",
            time.time(),
            notes=[f"cut {name} from {', '.join(addresses)}"],
        )
        for chain, *rest in rules:
            await iptables(pid, "-I", chain, *rest)
        try:
            await asyncio.sleep(seconds)
        finally:
            for chain, *rest in rules:
                await iptables(pid, "-D", chain, *rest)
        window.end = time.time()
        return window

    return fault


def freeze_replica(link_timeout: float) -> Fault:
    """One replica frozen (the cgroup freezer, as a pod throttled to its CPU
    limit or a paused VM is) for longer than the Redis link timeout. Its link
    to Redis is intact and holds what was published meanwhile: it must not
    take its own silence for Redis's and send its members to reconnect."""
    seconds = link_timeout + 3

    async def fault(chaos: Chaos) -> Window:
        name, container = chaos.busiest_replica()
        # Its members stall for the freeze: for them the service is out.
        window = Window(
            f"one replica frozen for {seconds:g} s (docker pause)", "freeze", time.time(), outage_seconds=seconds
        )
        frozen = [member for member in chaos.workload.all_members if member.connected and member.pod == name]
        await chaos.docker("pause", container)
        try:
            await asyncio.sleep(seconds)
        finally:
            await chaos.docker("unpause", container)
        window.end = time.time()
        # Past another link timeout: a replica that blamed Redis has closed them by now.
        await asyncio.sleep(link_timeout + 2)
        reconnected = sum(any(r.lost.at >= window.start for r in member.reconnects) for member in frozen)
        window.notes.append(f"froze {name}; {reconnected} of its {len(frozen)} members reconnected")
        window.checks["the frozen replica's members kept their sockets"] = bool(frozen) and reconnected == 0
        return window

    return fault


async def master_container(chaos: Chaos) -> str:
    """The container Redis's master runs in: `redis`, or after a failover the
    one the Sentinels name."""
    sentinels = chaos.stack.containers("sentinel-1")
    if not sentinels:
        return chaos.stack.one("redis")
    address = (
        await asyncio.to_thread(
            chaos.stack.exec,
            sentinels[0],
            "sh",
            "-c",
            f'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p 26379 SENTINEL get-master-addr-by-name {SENTINEL_MASTER}',
        )
    ).split()[0]
    for service in ("redis", "redis-replica"):
        for container in chaos.stack.containers(service):
            if chaos.stack.address(container) == address:
                return container
    raise RuntimeError(f"no container has the master's address {address}")


def pause_redis(seconds: float) -> Fault:
    async def fault(chaos: Chaos) -> Window:
        pid = chaos.stack.host_pid(await master_container(chaos))
        window = Window(f"Redis paused (SIGSTOP) for {seconds:g} s", "pause", time.time(), outage_seconds=seconds)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        window.end = time.time()
        return window

    return fault


def restart_redis() -> Fault:
    async def fault(chaos: Chaos) -> Window:
        window = Window("Redis restarted (history lost)", "restart", time.time())
        await asyncio.to_thread(chaos.stack.compose, "restart", "redis")
        window.end = time.time()
        window.outage_seconds = window.end - window.start
        return window

    return fault


def sentinel_failover(promotion_timeout: float = 60) -> Fault:
    async def fault(chaos: Chaos) -> Window:
        old = await master_container(chaos)
        window = Window("Sentinel failover (master killed)", "failover", time.time())
        await chaos.docker("kill", "--signal", "KILL", old)
        end = time.monotonic() + promotion_timeout
        promoted = None
        while time.monotonic() < end:
            try:
                promoted = await master_container(chaos)
            except (RuntimeError, IndexError):
                promoted = None
            if promoted and promoted != old:
                break
            await asyncio.sleep(0.5)
        window.outage_seconds = time.time() - window.start
        window.checks["a replica was promoted"] = bool(promoted and promoted != old)
        # What the Sentinels say of it: each election starts a new epoch (more
        # than one means split votes, retried after twice the failover
        # timeout); a Sentinel in TILT mode (its timer ran late) acts on
        # nothing for 30 s; an abort means no replica was fit to promote.
        said = Counter()
        for sentinel in ("sentinel-1", "sentinel-2", "sentinel-3"):
            log = (await asyncio.to_thread(run, ["docker", "logs", chaos.stack.one(sentinel)], 30)).stdout
            said.update({event: log.count(event) for event in ("+new-epoch", "+tilt", "-failover-abort")})
        window.notes.append(
            f"promoted after {window.outage_seconds:.1f} s; the Sentinels logged {said['+new-epoch']} new epochs, "
            f"{said['+tilt']} TILT entries, {said['-failover-abort']} aborts"
        )
        await chaos.docker("start", old)  # back as a replica of the new master
        window.end = time.time()
        return window

    return fault


# --- members that stop reading -------------------------------------------

SLOW_RECEIVE_BUFFER = 4096
BULK_MESSAGE_BYTES = 32 * 1024
BULK_RATE = 20.0  # messages per second into the slow members' room


def open_slow_socket(host: str, port: int, room: str) -> socket.socket:
    """A WebSocket handshake on a socket with a tiny receive buffer, after
    which nothing is ever read: the client stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER)
    sock.settimeout(10)
    sock.connect((host, port))
    key = b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/chat/{room}/ HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://{host}:{port}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    return sock


def slow_consumer_closes(chaos: Chaos) -> int:
    """Members the running replicas closed for falling behind (their metric)."""
    total = 0
    for container in chaos.stack.containers("daphne"):
        for line in scrape(chaos.stack.address(container)).splitlines():
            if line.startswith("blueprint_ws_connections_refused_total{") and '"slow_consumer"' in line:
                total += int(float(line.split()[-1]))
    return total


def scrape(address: str) -> str:
    with HTTP.open(f"http://{address}:{DAPHNE_PORT}/metrics", timeout=5) as response:
        return response.read().decode()


def slow_members(count: int = 3, limit: float = 60) -> Fault:
    async def fault(chaos: Chaos) -> Window:
        room = next(iter(chaos.workload.members))
        window = Window(f"{count} members stop reading", "slow", time.time())
        before = await asyncio.to_thread(slow_consumer_closes, chaos)
        host, port = "127.0.0.1", chaos.stack.port
        sockets = [await asyncio.to_thread(open_slow_socket, host, port, room) for _ in range(count)]
        # Their room gets big messages, so their queues fill in seconds.
        bulk = asyncio.ensure_future(chaos.workload.bulk(room, BULK_MESSAGE_BYTES, BULK_RATE))
        closed, started = 0, time.monotonic()
        try:
            while closed < count and time.monotonic() - started < limit:
                await asyncio.sleep(0.5)
                closed = await asyncio.to_thread(slow_consumer_closes, chaos) - before
        finally:
            bulk.cancel()
            await asyncio.gather(bulk, return_exceptions=True)
            for sock in sockets:
                sock.close()
        window.notes.append(
            f"{closed} of {count} closed for falling behind (4000) within {time.monotonic() - started:.1f} s"
        )
        window.checks["every slow member was closed with 4000"] = closed == count
        window.end = time.time()
        return window

    return fault


def old_nginx_workers(master_pid: int) -> int:
    """nginx workers still finishing after a reload: they hold the sockets
    opened before it, until worker_shutdown_timeout closes them."""
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master_pid:
                count += b"shutting down" in (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return count


async def old_nginx_workers_gone(chaos: Chaos, window: Window, timeout: float = 90) -> None:
    """The end of a reload: its old workers have closed their sockets (the
    members reconnect and resume), so what that costs counts in this window."""
    master = chaos.stack.host_pid(chaos.stack.one("nginx"))
    started = time.monotonic()
    while old_nginx_workers(master) and time.monotonic() - started < timeout:
        await asyncio.sleep(0.5)
    window.checks["old nginx workers gone"] = not old_nginx_workers(master)
    window.notes.append(f"old nginx workers gone after {time.monotonic() - started:.0f} s")


def reload_nginx() -> Fault:
    async def fault(chaos: Chaos) -> Window:
        window = Window("nginx reloaded", "reload", time.time())
        await chaos.docker("exec", chaos.stack.one("nginx"), "/etc/nginx/blueprint/docker-entrypoint.sh", "reload")
        await old_nginx_workers_gone(chaos, window)
        window.end = time.time()
        return window

    return fault
