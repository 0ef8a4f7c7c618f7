"""A chaos run: compose stacks, the workload, a schedule of faults with quiet
gaps, the checker, the report.

A schedule is a list of segments; each segment is one compose stack (the
base file, or with the Sentinel overlay) and the faults run on it in order.
Before the first fault a quiet baseline window; after each fault a quiet gap
of at least ``QUIET_SECONDS`` that lasts until every replica is ready again
(at most the 30 s the checker allows, then the next fault comes anyway and
the checker says so).
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import secrets
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from loadtest.bench.procstats import machine
from loadtest.chaos import nemesis
from loadtest.chaos.checker import HEALTHY_WITHIN_SECONDS, Verdict, check
from loadtest.chaos.nemesis import Chaos, Fault, Window
from loadtest.chaos.observer import Observer
from loadtest.chaos.workload import Workload
from loadtest.compose_stack import REPO, ComposeStack

QUIET_SECONDS = 10.0
BASE = ("docker-compose.yml",)
SENTINEL = ("docker-compose.yml", "docker-compose.sentinel.yml")


@dataclass(frozen=True)
class Segment:
    files: tuple[str, ...]
    faults: tuple[Fault, ...]


def app_default(variable: str) -> float:
    """A setting's default in the app (compose and Kubernetes keep it: a consistency test)."""
    found = re.search(rf'env_\w+\("{variable}", ([\d.]+)', (REPO / "app" / "config" / "settings.py").read_text())
    assert found, f"app/config/settings.py no longer reads {variable} with a default"
    return float(found.group(1))


LINK_TIMEOUT = app_default("REDIS_LINK_TIMEOUT_SECONDS")
FAILOVER = Segment(SENTINEL, (nemesis.sentinel_failover(), nemesis.kill_replica()))
SCHEDULES: dict[str, tuple[Segment, ...]] = {
    # make test: one of each kind that needs no long wait, about 3 minutes.
    "short": (
        Segment(
            BASE,
            (
                nemesis.kill_replica(),
                nemesis.drain_replica(),
                nemesis.cut_from_redis(5),
                nemesis.freeze_replica(LINK_TIMEOUT),
                nemesis.slow_members(),
                nemesis.restart_redis(),
                nemesis.reload_nginx(),
            ),
        ),
    ),
    # make chaos CHAOS_SCHEDULE=failover: the Sentinel overlay alone.
    "failover": (FAILOVER,),
    # make chaos: every fault of the suite.
    "full": (
        Segment(
            BASE,
            (
                nemesis.kill_replica(),
                nemesis.drain_replica(),
                nemesis.rolling_restart(),
                nemesis.scale(),
                nemesis.cut_from_redis(5),
                nemesis.cut_from_redis(90),
                nemesis.pause_redis(10),
                nemesis.freeze_replica(LINK_TIMEOUT),
                nemesis.restart_redis(),
                nemesis.slow_members(),
                nemesis.reload_nginx(),
            ),
        ),
        FAILOVER,
    ),
}


def memory_limit_bytes() -> int:
    """The daphne container's memory limit in the Kubernetes base."""
    deployment = yaml.safe_load((REPO / "k8s" / "base" / "deployment-daphne.yaml").read_text())
    limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(limit[:-2]) * units[limit[-2:]]


@dataclass
class SegmentRun:
    windows: list[Window]
    workload: Workload
    observer: Observer
    verdict: Verdict


async def run_segment(segment: Segment, run_id: str, directory: Path, log) -> SegmentRun:
    loop = asyncio.get_running_loop()
    stack = ComposeStack.create(directory, files=segment.files, prefix="chaos")
    log(f"starting {' + '.join(segment.files)} as {stack.project}")
    await asyncio.to_thread(stack.make, "up", REPLICAS=3)
    observer = Observer(stack)
    try:
        observer.start()
        workload = Workload(stack.base_url, stack.broadcast_token, deadline=loop.time() + 3600)
        await workload.start(run_id)
        chaos = Chaos(stack, workload, observer)
        windows = [Window("baseline (no fault)", "baseline", time.time())]
        await asyncio.sleep(QUIET_SECONDS)
        windows[0].end = time.time()
        for fault in segment.faults:
            window = await fault(chaos)
            window.replicas = chaos.replicas
            windows[-1].next_start = window.start
            windows.append(window)
            log(f"{window.name}: {window.end - window.start:.1f} s; " + "; ".join(window.notes))
            await asyncio.sleep(QUIET_SECONDS)
            try:
                await chaos.wait_ready(chaos.replicas, timeout=HEALTHY_WITHIN_SECONDS)
            except RuntimeError as error:
                log(f"after {window.name}: {error}")
        await workload.stop_publishing()
        if not await workload.settle(30):
            log("some members still had not caught up 30 s after the last publish")
        windows[-1].next_start = time.time()
        verdict = check(windows, workload.members, workload.publishes, observer, memory_limit_bytes())
        await workload.stop()
        return SegmentRun(windows, workload, observer, verdict)
    finally:
        await observer.stop()
        await asyncio.to_thread(stack.make, "down")


def timeline(runs: list[SegmentRun], t0: float) -> dict:
    deliveries: dict[int, int] = defaultdict(int)
    stalls: dict[int, float] = defaultdict(float)
    reconnects: dict[int, int] = defaultdict(int)
    for segment in runs:
        sent = {p.id: p.sent_at for p in segment.workload.publishes}
        for member in segment.workload.all_members:
            for chat in member.chats:
                deliveries[int(chat.at - t0)] += 1
                if chat.id in sent:
                    second = int(sent[chat.id] - t0)
                    stalls[second] = max(stalls[second], chat.at - sent[chat.id])
            for reconnect in member.reconnects:
                reconnects[int(reconnect.lost.at - t0)] += 1
    # Each observer round's count of ready replicas, carried until the next round.
    rounds: dict[float, int] = defaultdict(int)
    for segment in runs:
        for sample in segment.observer.samples:
            rounds[sample.at] += sample.ready
    span = range(0, max([s for s in (*deliveries, *stalls) if s >= 0], default=0) + 1)
    ready, latest, times = [], 0, sorted(rounds)
    for second in span:
        while times and times[0] - t0 < second + 1:
            latest = rounds[times.pop(0)]
        ready.append((second, latest))
    return {
        "replicas_ready_per_second": ready,
        "deliveries_per_second": [(s, deliveries.get(s, 0)) for s in span],
        "max_stall_per_second": [(s, round(stalls.get(s, 0.0), 3)) for s in span],
        "reconnects_per_second": sorted(reconnects.items()),
    }


async def run(schedule: str, log=print) -> dict:
    started = time.time()
    run_id = secrets.token_hex(3)
    runs = []
    with tempfile.TemporaryDirectory(prefix="chaos-") as directory:
        for index, segment in enumerate(SCHEDULES[schedule]):
            segment_dir = Path(directory) / str(index)
            segment_dir.mkdir()
            runs.append(await run_segment(segment, run_id, segment_dir, log))
    t0 = runs[0].windows[0].start  # the first baseline: the stack is up and every member in
    windows = [w for r in runs for w in r.verdict.windows]
    not_connected = [m for r in runs for m in r.verdict.members_not_connected]
    verdict = Verdict(windows, not_connected, runs[0].verdict.memory_limit_mib)
    settings = runs[0].workload
    return {
        "schedule": schedule,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "duration_seconds": time.time() - started,
        "machine": f"{os.cpu_count()} cores, {machine('nginx')['cpu_model']}, Linux {platform.release()}",
        "settings": {
            "rooms": settings.rooms,
            "members": settings.rooms * settings.members_per_room,
            "replicas": 3,
            "socket_rate": settings.socket_rate,
            "http_rate": settings.http_rate,
            "redis_link_timeout_seconds": LINK_TIMEOUT,
            "quiet_seconds": QUIET_SECONDS,
        },
        "t0": t0,
        "verdict": verdict.as_dict(),
        "timeline": timeline(runs, t0),
    }
