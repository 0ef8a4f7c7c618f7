"""Where the time and the memory go: profiles of the replicas, per configuration.

The rate benchmark says how fast each configuration is; this says why, so a
missed target names the code that costs it instead of a guess.

**CPU.** Each configuration's 3-replica stack (configs.start_stack, as the
benchmark runs it) carries the benchmark's rooms while the generator offers
one fixed publish rate that every configuration sustains without loss (the
step is checked: a profile of a step that lost messages is refused). py-spy
samples every replica from outside, native frames included, so time inside
C and Cython (picows, uvloop, the JSON and msgpack accelerators, the
interpreter, syscalls) is seen too; the replica runs unchanged. Each sample
is charged to the innermost frame on its stack that belongs to a library or
to our own code, not to the standard library, the interpreter or libc: the
library on whose behalf the CPU was spent ("json.dumps called by channels"
is channels' time). The shares, times the replica CPU per delivery measured
in the same step, are microseconds per delivery per library. A second view
charges each sample to its innermost frame as it is (the interpreter,
syscalls, JSON ...). The collapsed stacks are written beside the report
(``<out>-stacks/<configuration>-<replica>.folded``) for speedscope or
flamegraph.pl.

**Memory.** One replica of each configuration runs under tracemalloc
(loadtest.bench.traced_replica); ``idle_sockets`` idle sockets are opened
straight to it, and the difference between its snapshots before and after,
per socket, is charged by the same rule to the code that allocated it. The
same number of sockets opened to an untraced replica of the same stack gives
the RSS per socket they are read against: what tracemalloc does not see
(allocator overhead and fragmentation, C libraries' own malloc) is the rest.

    python -m loadtest.bench.profiling [--smoke] [--configs daphne-fanout,picows] [--out loadtest/reports/bench-profile]

``make bench-profile`` runs it; ``make bench`` does not (sampling slows the
replicas it measures, so its numbers are not the benchmark's).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.stack import LocalStack, probe
from loadtest.bench import procstats, standalone
from loadtest.bench.configs import BASELINE, DEFAULT, LIMIT, PEER, Configuration, by_name, start_stack
from loadtest.bench.loadgen import Fleet, interleaved
from loadtest.bench.runner import Bench, Plan

PROFILE_CONFIGURATIONS = (DEFAULT, PEER, BASELINE, LIMIT)
SMOKE_PROFILE_CONFIGURATIONS = (DEFAULT, LIMIT)
# Lines of each table: the libraries or functions that cost the most.
TOP = 12
# How long py-spy may take past its sampling to write its stacks.
SAMPLER_GRACE_SECONDS = 30.0
# Our own code, under the names it has on the replicas' sys.path.
OWN_CODE = {"realtime": "the blueprint (app/realtime)", "config": "the blueprint (app/config)"}
BENCH_SERVERS = "loadtest"
INTERPRETER = "CPython interpreter"
SYSTEM = "libc and kernel"
# The standard library's event loop is a layer of its own, not time spent for
# whoever called run_forever (Twisted's reactor, uvicorn, a main()).
EVENT_LOOP = {"asyncio", "selectors"}
# Native libraries named by their file, by the package that ships them.
NATIVE_PACKAGES = {"loop": "uvloop", "_cmsgpack": "msgpack", "hiredis": "hiredis"}
SOCKET_SYSCALLS = "socket syscalls (send, recv)"
SOCKET_IO = {"send", "sendmsg", "sendto", "write", "writev", "recv", "recvmsg", "recvfrom", "read", "readv"}
# Where a thread waits rather than works: py-spy's native stacks keep these
# samples, which are not CPU time.
WAITING = (
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "__poll",
    "select",
    "pselect",
    "futex",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
    "sem_clockwait",
    "nanosleep",
    "clock_nanosleep",
    "accept",
    # A thread blocked on a lock or a queue (Daphne's and asyncio's thread
    # pools), or waiting for the GIL.
    "PyThread_acquire_lock_timed",
    "take_gil",
)


@dataclass(frozen=True)
class ProfilePlan:
    rooms: int = 10
    room_size: int = 30
    # Publishes a second: every profiled configuration sustains it without loss
    # (the slowest, python-socketio, passed at least 338 in every round of the kept run).
    rate: float = 200.0
    sample_seconds: float = 20.0
    # py-spy pauses a replica for each sample: often enough to be read, rarely enough to leave it the work.
    sample_rate: int = 100
    idle_sockets: int = 2000
    # The room of the sampled broadcasts, a third on each replica.
    broadcast_sockets: int = 6000


SMOKE_PROFILE_PLAN = ProfilePlan(
    rooms=3, room_size=10, rate=20.0, sample_seconds=3.0, idle_sockets=60, broadcast_sockets=60
)
# The longest one sampled broadcast may take to reach everyone.
BROADCAST_LIMIT_SECONDS = 30.0


# --- charging samples to code -------------------------------------------------


def owner(frame: str) -> str:
    """Who a py-spy frame ``function (file:line)`` or ``function (library.so)`` belongs to:
    a library (its top-level package), our own code, the standard library
    (``stdlib:module``), the interpreter, or libc and the kernel."""
    location = frame.rsplit(" (", 1)[-1].rstrip(")")
    path = location.rsplit(":", 1)[0] if location.rsplit(":", 1)[-1].isdigit() else location
    if path.startswith("<frozen "):
        return f"stdlib:{path.removeprefix('<frozen ').split('.')[0].rstrip('>')}"
    if path.endswith((".py", ".pyx", ".pxd")):
        top = path.split("/", 1)[0].removesuffix(".py")
        if top in EVENT_LOOP:
            return "asyncio event loop"
        if top in sys.stdlib_module_names:
            return f"stdlib:{top}"
        return OWN_CODE.get(top, top)
    name = path.rsplit("/", 1)[-1]
    if name.startswith(("libc.", "libpthread", "ld-linux", "linux-vdso")) or name.startswith("0x"):
        return SYSTEM
    if name.startswith("libpython") or name.endswith(".c") or name.endswith(".h"):
        return INTERPRETER
    top = name.split(".", 1)[0]
    if top.lstrip("_") in sys.stdlib_module_names or top in sys.stdlib_module_names:
        return f"stdlib:{top.lstrip('_')}"
    # A native library of a package: picows.cpython-311-x86_64-linux-gnu.so, libuv inside uvloop's loop.so ...
    return NATIVE_PACKAGES.get(top, top)


def is_code_of_a_library(who: str) -> bool:
    return not (who.startswith("stdlib:") or who in (INTERPRETER, SYSTEM))


def charged(stack: list[str]) -> str:
    """The innermost frame's owner that is a library or our code; the innermost as it is if none is.
    Socket reads and writes are a bucket of their own, whoever calls them: every
    configuration makes them (a send per socket per message), some from their
    own code, some through asyncio's or uvloop's transports."""
    if owner(stack[-1]) == SYSTEM and function(stack[-1]) in SOCKET_IO:
        return SOCKET_SYSCALLS
    for frame in reversed(stack):
        who = owner(frame)
        if is_code_of_a_library(who):
            return who
    return owner(stack[-1])


def function(frame: str) -> str:
    return frame.rsplit(" (", 1)[0].lstrip("_")


def waiting(frames: list[str]) -> bool:
    """Whether the stack is a thread waiting: its innermost named frame (native
    frames of a library without symbols are only addresses) is a wait."""
    for frame in reversed(frames):
        if not function(frame).startswith("0x"):
            return function(frame) in WAITING
    return False


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output, one ``frame;frame;...;frame count`` line per distinct stack,
    outermost first, without the stacks of a thread that was waiting."""
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit() and not waiting(stack := frames.split(";")):
            stacks.append((stack, int(count)))
    return stacks


def cpu_shares(stacks: list[tuple[list[str], int]]) -> dict:
    """The samples by library (charged) and by innermost frame, as shares of all."""
    total = sum(count for _, count in stacks)
    by_library: Counter = Counter()
    by_self: Counter = Counter()
    by_function: Counter = Counter()
    for frames, count in stacks:
        by_library[charged(frames)] += count
        by_self[owner(frames[-1])] += count
        by_function[frames[-1]] += count

    def shares(counter: Counter) -> dict[str, float]:
        return {name: round(n / total, 4) for name, n in counter.most_common(TOP)} if total else {}

    return {
        "samples": total,
        "by_library": shares(by_library),
        "by_innermost": shares(by_self),
        "top_functions": shares(by_function),
    }


# --- CPU: sampling the replicas under a fixed rate ---------------------------------


def start_sampler(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            str(rate),
            "--native",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_sampler(sampler: subprocess.Popen, out: Path) -> None:
    try:
        output, _ = sampler.communicate(timeout=SAMPLER_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        sampler.kill()
        output, _ = sampler.communicate()
    if sampler.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed on {out.name} (code {sampler.returncode}): {output[-1000:]}")


class Sampling:
    """py-spy on every replica for ``seconds``, from ``start`` to ``stacks``."""

    def __init__(self, replica_pids: dict[str, list[int]], plan: ProfilePlan, stacks_dir: Path, prefix: str):
        self.outs = {name: stacks_dir / f"{prefix}-{name}.folded" for name in replica_pids}
        self.samplers = {
            name: start_sampler(pids[0], plan.sample_seconds, plan.sample_rate, self.outs[name])
            for name, pids in replica_pids.items()
        }

    async def stacks(self) -> list[tuple[list[str], int]]:
        for name, sampler in self.samplers.items():
            await asyncio.to_thread(finish_sampler, sampler, self.outs[name])
        return [stack for out in self.outs.values() for stack in read_folded(out)]


def charge(stacks: list[tuple[list[str], int]], per_delivery: float) -> dict:
    """The shares of the samples, and the replica CPU per delivery divided by them."""
    shares = cpu_shares(stacks)
    return {
        "replica_cpu_us_per_delivery": per_delivery,
        **shares,
        "us_per_delivery_by_library": {
            name: round(share * per_delivery, 1) for name, share in shares["by_library"].items()
        },
    }


async def sampled_step(stack: LocalStack, configuration: Configuration, plan: ProfilePlan, stacks_dir: Path) -> dict:
    """The steady fan-out: rooms of ``room_size`` at ``rate`` publishes a second."""
    bench = Bench(stack, Plan(rooms=plan.rooms, room_size=plan.room_size), configuration.wire, configuration.name)
    for number in range(plan.rooms):
        await bench.fleet.open(f"profile-{number}", plan.room_size)
    publishers = interleaved(bench.fleet.rooms)
    # A short step first, unsampled: the replicas' first messages (imports, caches) are not the steady cost.
    await bench.step(publishers, plan.rate, seconds=1.0)
    sampling = Sampling(bench.replica_pids, plan, stacks_dir, f"{configuration.name}-fanout")
    step = await bench.step(publishers, plan.rate, seconds=plan.sample_seconds)
    stacks = await sampling.stacks()
    await bench.fleet.close()
    if step["lost"] or step["duplicates"] or step["errors"] or step["sockets_closed"]:
        raise RuntimeError(f"{configuration.name}: the sampled step did not deliver everything: {step}")
    return {
        "deliveries_per_s": step["deliveries_per_s"],
        "p99_ms": step["p99_ms"],
        **charge(stacks, step["replica_cpu_us_per_delivery"]),
    }


async def sampled_broadcasts(
    stack: LocalStack, configuration: Configuration, plan: ProfilePlan, stacks_dir: Path
) -> dict:
    """The big broadcast: one message to a room of ``broadcast_sockets`` (a third
    straight to each replica, as the idle phase has them), again as soon as the
    last got it, for as long as py-spy samples."""
    fleets = [
        Fleet(f"http://127.0.0.1:{port}", configuration.wire, configuration.name)
        for port in stack.replica_ports.values()
    ]
    for fleet in fleets:
        await fleet.open("broadcast", plan.broadcast_sockets // len(fleets), within=OPEN_SECONDS)
    members = sum(len(fleet.members) for fleet in fleets)
    ledger = fleets[0].measure()
    for fleet in fleets[1:]:
        fleet.ledger = ledger
    replica_pids = {name: procstats.listening_pids(port) for name, port in stack.replica_ports.items()}
    meter = procstats.CpuMeter(replica_pids)
    sampling = Sampling(replica_pids, plan, stacks_dir, f"{configuration.name}-broadcast")
    # Each broadcast from the next member: one socket sending them all would
    # meet the replicas' per-socket rate limit (WS_RATE_LIMIT_PER_SECOND).
    publishers, broadcasts, slowest = itertools.cycle(fleets[0].rooms["broadcast"]), 0, 0.0
    ends = time.monotonic() + plan.sample_seconds
    while time.monotonic() < ends:
        sent_at = next(publishers).publish(fleets[0].next_id(), owed=members)
        await fleets[0].settle(time.monotonic() + BROADCAST_LIMIT_SECONDS)
        slowest, broadcasts = max(slowest, ledger.last_arrival - sent_at), broadcasts + 1
    meter.read()
    stacks = await sampling.stacks()
    for fleet in fleets:
        await fleet.close()
    if ledger.outstanding or ledger.duplicates:
        raise RuntimeError(
            f"{configuration.name}: {broadcasts} sampled broadcasts to {members} sockets lost {ledger.outstanding}, "
            f"duplicated {ledger.duplicates}; errors {[dict(fleet.errors) for fleet in fleets]}, "
            f"sockets closed {[dict(fleet.lost_sockets) for fleet in fleets]}"
        )
    replica_seconds = sum(meter.seconds.values())
    return {
        "sockets": members,
        "broadcasts": broadcasts,
        "slowest_broadcast_seconds": round(slowest, 3),
        **charge(stacks, round(replica_seconds / ledger.received * 1e6, 1)),
    }


# --- memory: tracemalloc on one replica ----------------------------------------------

TRACED, UNTRACED = "daphne-1", "daphne-2"
# Refused handshakes are retried this long (a replica above refuses with 503 while it recovers).
OPEN_SECONDS = 60.0
# After the sockets open, how long the replicas' memory is left to settle before it is read.
SETTLE_SECONDS = 2.0


def traced_stack(configuration: Configuration, log, snapshots: Path) -> LocalStack:
    """The configuration's stack with its first replica run under traced_replica."""
    stack = start_stack(configuration, log)
    plain, traced_port = stack.replica_command, stack.replica_ports[TRACED]

    def command(port: int) -> list[str]:
        python, dash_m, module, *args = plain(port)
        if port != traced_port:
            return [python, dash_m, module, *args]
        return [python, dash_m, "loadtest.bench.traced_replica", module, *args]

    stack.replica_command = command
    stack.extra_env["TRACEMALLOC_SNAPSHOT_DIR"] = str(snapshots)
    return stack


async def snapshot(pid: int, snapshots: Path, timeout: float = 120.0) -> tracemalloc.Snapshot:
    """Ask the traced replica for a snapshot (SIGUSR1) and read it once it is whole."""
    before = set(snapshots.glob(f"{pid}-*.snapshot"))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(snapshots.glob(f"{pid}-*.snapshot")) - before
        if new:
            return tracemalloc.Snapshot.load(str(new.pop()))
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the traced replica (pid {pid}) wrote no snapshot within {timeout:g} s")


def allocation_frame(frame: tracemalloc.Frame) -> str:
    """A tracemalloc frame as py-spy names one, so that ``owner`` reads both; paths
    are cut to the part below the sys.path entry they are found in."""
    name = frame.filename
    for entry in sorted((entry for entry in sys.path if entry), key=len, reverse=True):
        if name.startswith(entry.rstrip("/") + "/"):
            name = name[len(entry.rstrip("/")) + 1 :]
            break
    return f"? ({name}:{frame.lineno})"


def memory_shares(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, sockets: int) -> dict:
    """Bytes per socket that the sockets added, by library (charged) and by allocating line."""
    by_library: Counter = Counter()
    by_line: Counter = Counter()
    for difference in after.compare_to(before, "traceback"):
        # Oldest frame first, as py-spy's stacks are.
        frames = [allocation_frame(frame) for frame in difference.traceback]
        by_library[charged(frames)] += difference.size_diff
        by_line[location(frames[-1])] += difference.size_diff
    total = sum(by_library.values())
    return {
        "python_bytes_per_socket": round(total / sockets),
        "bytes_per_socket_by_library": per_socket(by_library, sockets),
        "bytes_per_socket_by_line": per_socket(by_line, sockets),
    }


def location(frame: str) -> str:
    """``file:line`` of a frame named ``function (file:line)``."""
    return frame.rsplit(" (", 1)[-1].rstrip(")")


def per_socket(sizes: Counter, sockets: int) -> dict[str, int]:
    """The largest of ``sizes`` per socket, leaving out what the sockets did not add to."""
    return {name: round(n / sockets) for name, n in sizes.most_common(TOP) if n / sockets >= 1}


async def steady_again(port: int, steady: float = 3.0, timeout: float = 90.0) -> None:
    """Until the replica's /readyz has answered 200 for ``steady`` seconds in a row:
    a snapshot holds the replica's event loop for seconds, and once it runs
    again it may find its Redis link silent for too long and refuse sockets
    (503) until the link is back."""
    deadline, since = time.monotonic() + timeout, None
    while since is None or time.monotonic() - since < steady:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the traced replica on port {port} was not steadily ready within {timeout:g} s")
        status, _ = await asyncio.to_thread(probe, f"http://127.0.0.1:{port}/readyz", 1.0)
        since = (since or time.monotonic()) if status == 200 else None
        await asyncio.sleep(0.5)


async def traced_idle(stack: LocalStack, configuration: Configuration, sockets: int, snapshots: Path) -> dict:
    traced_pid = procstats.listening_pids(stack.replica_ports[TRACED])[0]
    untraced_pid = procstats.listening_pids(stack.replica_ports[UNTRACED])[0]
    fleets = {
        name: Fleet(f"http://127.0.0.1:{stack.replica_ports[name]}", configuration.wire, configuration.name)
        for name in (TRACED, UNTRACED)
    }
    first = await snapshot(traced_pid, snapshots)
    await steady_again(stack.replica_ports[TRACED])
    rss_before = procstats.rss_bytes(untraced_pid)
    for fleet in fleets.values():
        await fleet.open("idle", sockets, within=OPEN_SECONDS)
    await asyncio.sleep(SETTLE_SECONDS)
    rss_after = procstats.rss_bytes(untraced_pid)
    second = await snapshot(traced_pid, snapshots)
    for fleet in fleets.values():
        await fleet.close()
    return {
        "sockets": sockets,
        "rss_bytes_per_socket_untraced": round((rss_after - rss_before) / sockets),
        **memory_shares(first, second, sockets),
    }


# --- the run ----------------------------------------------------------------------


def run_profiles(configurations: list[Configuration], plan: ProfilePlan, out: Path, stack_log, log) -> dict:
    stacks_dir = out.parent / f"{out.name}-stacks"
    shutil.rmtree(stacks_dir, ignore_errors=True)
    stacks_dir.mkdir(parents=True)
    results = {}
    for configuration in configurations:
        with start_stack(configuration, stack_log) as stack:
            cpu = asyncio.run(sampled_step(stack, configuration, plan, stacks_dir))
            broadcast = asyncio.run(sampled_broadcasts(stack, configuration, plan, stacks_dir))
        for what, profile in (("fan-out", cpu), ("broadcast", broadcast)):
            log(
                f"{configuration.name}, {what}: {profile['replica_cpu_us_per_delivery']} µs of replica CPU per "
                "delivery; "
                + ", ".join(f"{name} {us}" for name, us in list(profile["us_per_delivery_by_library"].items())[:5])
            )
        with (
            tempfile.TemporaryDirectory(prefix="tracemalloc-") as snapshots,
            traced_stack(configuration, stack_log, Path(snapshots)) as stack,
        ):
            memory = asyncio.run(traced_idle(stack, configuration, plan.idle_sockets, Path(snapshots)))
        log(
            f"{configuration.name}: {memory['rss_bytes_per_socket_untraced']} B RSS per idle socket, "
            f"{memory['python_bytes_per_socket']} B of it Python's: "
            + ", ".join(f"{name} {n}" for name, n in list(memory["bytes_per_socket_by_library"].items())[:5])
        )
        results[configuration.name] = {"cpu": cpu, "broadcast": broadcast, "memory": memory}
    return results


def _rows(values: dict[str, float], unit: str) -> str:
    return "<br>".join(f"{name}: {value:g}{unit}" for name, value in values.items())


def cpu_table(results: dict[str, dict], phase: str, title: str) -> str:
    rows = [
        f"| configuration | {title}: replica CPU per delivery | µs per delivery, by the library it was spent for "
        "| share of samples, by innermost frame |",
        "|---|---:|---|---|",
    ]
    for name, result in results.items():
        profile = result[phase]
        innermost = {who: round(100 * share, 1) for who, share in profile["by_innermost"].items()}
        rows.append(
            f"| {name} | {profile['replica_cpu_us_per_delivery']} µs "
            f"| {_rows(profile['us_per_delivery_by_library'], ' µs')} | {_rows(innermost, ' %')} |"
        )
    return "\n".join(rows)


def table(results: dict[str, dict]) -> str:
    """The markdown tables: CPU per delivery by library (fan-out, broadcast), bytes per idle socket by library."""
    memory_rows = [
        "| configuration | RSS per idle socket | Python's allocations per idle socket | bytes per socket, by library "
        "| bytes per socket, by allocating line |",
        "|---|---:|---:|---|---|",
    ]
    for name, result in results.items():
        memory = result["memory"]
        memory_rows.append(
            f"| {name} | {memory['rss_bytes_per_socket_untraced']} B | {memory['python_bytes_per_socket']} B "
            f"| {_rows(memory['bytes_per_socket_by_library'], ' B')} "
            f"| {_rows(memory['bytes_per_socket_by_line'], ' B')} |"
        )
    return "\n\n".join(
        [
            cpu_table(results, "cpu", "fan-out to rooms"),
            cpu_table(results, "broadcast", "broadcast to one room"),
            "\n".join(memory_rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small numbers")
    parser.add_argument("--configs", help="comma-separated configuration names (default: the default, its peers, raw)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/reports/bench-profile"), help="path without suffix")
    args = parser.parse_args(argv)
    plan = SMOKE_PROFILE_PLAN if args.smoke else ProfilePlan()
    default_names = SMOKE_PROFILE_CONFIGURATIONS if args.smoke else PROFILE_CONFIGURATIONS
    configurations = by_name(args.configs.split(",") if args.configs else list(default_names))
    procstats.raise_open_file_limit(plan.idle_sockets * 4 + 2048)

    def run(stack_log, log) -> dict:
        return run_profiles(configurations, plan, args.out, stack_log, log)

    return standalone.run_and_report(args.out, asdict(plan), run, table)


if __name__ == "__main__":
    sys.exit(main())
