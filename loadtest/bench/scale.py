"""The expensive moments, per configuration: a reconnect storm, and many idle sockets.

**Reconnect storm.** ``storm_sockets`` chat members through nginx over 3
replicas; the replica holding the most is killed with SIGKILL. Every member
it held reconnects at once, each after its own random jitter of up to
``STORM_JITTER_SECONDS`` and then with the generator's backoff (as the chat
page's clients do), through nginx to the replicas left, each handshake a
full consumer start. Measured: the time from the kill until the last dropped
member is welcomed again; the most handshakes a surviving replica took in one
second (from the welcomes, which name it); every refusal clients saw, by HTTP
status or close code; and members never back within ``STORM_LIMIT_SECONDS``
(refused for good). The members are new sockets in the same rooms: the storm
measures reconnection, not resume (the chaos suite checks that).

**Idle sockets.** ``idle_sockets`` members of one room, a third on each
replica, straight to the replicas: nginx's two workers front at most 16,384
sockets (nginx.conf.template), which the benchmark does not measure. The
replicas' RSS before and after, over the sockets, is the memory an idle
socket costs; then one member publishes once and all are owed it: the time
until the last delivery, how many never arrived, how many twice, and the
sockets the replicas closed on their own (``lost_sockets``). A process
holds one file per socket, so the generator's sockets are split over worker
processes (``loadtest/bench/idle_worker.py``): one per replica, holding that
replica's share, or more when a share exceeds what the open-file limit lets
one process hold. Each replica must hold its own share under the limit it
inherits; the phase refuses to start otherwise.

Each configuration runs on a stack of its own, one after the other (the
sockets of two would not fit the machine at once). ``make bench`` runs this
after the rate rounds; alone:

    python -m loadtest.bench.scale [--smoke] [--configs daphne-fanout,socketio] [--out loadtest/reports/bench-scale]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from deploy.stack import LocalStack, StackError
from loadtest.bench import procstats, standalone
from loadtest.bench.configs import BASELINE, DEFAULT, LIMIT, PEER, Configuration, by_name, start_stack
from loadtest.bench.idle_worker import OPEN_LIMIT_SECONDS, START_LIMIT_SECONDS, Assignment, Workers
from loadtest.bench.loadgen import Fleet, Member

# Members per room: rooms as the rate benchmark uses them.
ROOM_SIZE = 100
STORM_JITTER_SECONDS = 0.5
STORM_LIMIT_SECONDS = 60.0
# Handshakes in flight while the sockets are first opened (not during the storm: there, all at once).
OPEN_CONCURRENCY = 200
BROADCAST_LIMIT_SECONDS = 60.0
# How long an idle worker may take to answer an order that needs no network round trip (owe, publish).
WORKER_REPLY_SECONDS = 30.0
# Files an idle worker holds besides its sockets: its pipe to the parent, its event loop's, stdio.
WORKER_SPARE_FILES = 64
# After the sockets open, how long the replicas' memory is left to settle before it is read.
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class ScalePlan:
    storm_sockets: int = 10_000
    idle_sockets: int = 50_000


SMOKE_SCALE_PLAN = ScalePlan(storm_sockets=60, idle_sockets=90)
# The default against its peers and the two references; the smoke run takes
# one of each wire (the blueprint's JSON, Socket.IO).
SCALE_CONFIGURATIONS = (DEFAULT, PEER, LIMIT, BASELINE)
SMOKE_SCALE_CONFIGURATIONS = (DEFAULT, PEER)


async def open_rooms(fleet: Fleet, sockets: int, prefix: str) -> None:
    for index in range(math.ceil(sockets / ROOM_SIZE)):
        await fleet.open(f"{prefix}-{index}", min(ROOM_SIZE, sockets - index * ROOM_SIZE))


async def storm(stack: LocalStack, configuration: Configuration, sockets: int) -> dict:
    fleet = Fleet(stack.url, configuration.wire, configuration.name, concurrency=OPEN_CONCURRENCY, timeout=30)
    await open_rooms(fleet, sockets, "storm")
    held = fleet.sockets_by_pod()
    victim = max(held, key=held.get)
    dropped = [member for member in fleet.members if member.pod == victim]
    back: list[tuple[float, str]] = []
    refused: Counter = Counter()
    never_back: list[str] = []

    async def reconnect(member: Member) -> None:
        await member.client.closed
        await asyncio.sleep(random.uniform(0, STORM_JITTER_SECONDS))
        again = fleet.member_kind(fleet, member.room)
        try:
            await fleet.connect(again, attempts=None, deadline=killed_at + STORM_LIMIT_SECONDS, refused=refused)
        except Exception as error:  # counted, not raised: the storm's result says who never came back
            never_back.append(repr(error))
            return
        back.append((time.monotonic(), again.pod))
        fleet.rooms[member.room].append(again)

    for member in dropped:
        fleet.rooms[member.room].remove(member)
    killed_at = time.monotonic()
    stack.kill_replica(victim)
    await asyncio.gather(*(reconnect(member) for member in dropped))
    per_second: Counter = Counter((pod, int(at - killed_at)) for at, pod in back)
    survivors = sorted(set(held) - {victim})
    result = {
        "sockets": sockets,
        "killed": victim,
        "dropped": len(dropped),
        "reconnected": len(back),
        "never_back": len(never_back),
        "never_back_first": never_back[:1],
        "all_back_seconds": round(max(at for at, _ in back) - killed_at, 2) if back else None,
        "half_back_seconds": round(sorted(at for at, _ in back)[len(back) // 2] - killed_at, 2) if back else None,
        "peak_handshakes_per_second": {
            pod: max((n for (p, _), n in per_second.items() if p == pod), default=0) for pod in survivors
        },
        "refused": dict(refused),
        "lost_sockets": dict(fleet.lost_sockets - Counter({"no close frame": len(dropped)})),
    }
    await fleet.close()
    return result


def replica_rss(stack: LocalStack) -> int:
    return sum(procstats.rss_bytes(procstats.listening_pids(port)[0]) for port in stack.replica_ports.values())


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` as even as can be, the larger ones first."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def idle_assignments(
    stack: LocalStack, configuration: Configuration, shares: dict[str, int], per_process: int
) -> list[Assignment]:
    """The idle workers: each replica's share over as few processes as hold ``per_process`` sockets each."""
    assignments: list[Assignment] = []
    for replica, share in shares.items():
        for count in split(share, max(1, math.ceil(share / per_process))):
            if count:
                assignments.append(
                    Assignment(
                        name=f"idle worker {len(assignments) + 1} ({count} sockets on {replica})",
                        url=f"http://127.0.0.1:{stack.replica_ports[replica]}",
                        sockets=count,
                        wire=configuration.wire,
                        configuration=configuration.name,
                        concurrency=OPEN_CONCURRENCY,
                        timeout=60,
                        broadcast_limit=BROADCAST_LIMIT_SECONDS,
                    )
                )
    return assignments


def check_replica_limits(stack: LocalStack, shares: dict[str, int]) -> None:
    """Each replica can hold its share: past its open-file limit it would refuse sockets, not measure them."""
    for replica, port in stack.replica_ports.items():
        soft, _ = psutil.Process(procstats.listening_pids(port)[0]).rlimit(psutil.RLIMIT_NOFILE)
        if shares[replica] > soft - SPARE_FILES:
            raise StackError(
                f"{replica}'s open-file limit {soft} cannot hold its {shares[replica]} idle sockets "
                f"and {SPARE_FILES} other files: pass fewer --idle-sockets or raise the hard limit"
            )


def idle(stack: LocalStack, configuration: Configuration, sockets: int) -> dict:
    shares = dict(zip(stack.replica_ports, split(sockets, len(stack.replica_ports)), strict=True))
    check_replica_limits(stack, shares)
    # The workers inherit this process's limit.
    per_process = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - WORKER_SPARE_FILES
    assignments = idle_assignments(stack, configuration, shares, per_process)
    before = replica_rss(stack)
    with Workers(assignments) as workers:
        opened = workers.expect(workers.all, "opened", START_LIMIT_SECONDS + OPEN_LIMIT_SECONDS).values()
        opened_seconds = max(at for _, at in opened) - min(started for started, _ in opened)
        time.sleep(SETTLE_SECONDS)
        after = replica_rss(stack)
        # One message to the whole room, on every replica: every worker owes it to its own members.
        message_id = 0
        publisher, *others = workers.all
        for worker in others:
            workers.tell(worker, "owe", message_id)
        workers.expect(others, "owed", WORKER_REPLY_SECONDS)
        workers.tell(publisher, "publish", message_id)
        ((sent_at,),) = workers.expect([publisher], "sent", WORKER_REPLY_SECONDS).values()
        limit = BROADCAST_LIMIT_SECONDS + WORKER_REPLY_SECONDS
        delivered = [report for (report,) in workers.expect(workers.all, "delivered", limit).values()]
    arrivals = [report["last_arrival"] for report in delivered if report["last_arrival"] is not None]
    # One clock for all: CLOCK_MONOTONIC is the host's, whichever process read it.
    last_delivery = round(max(arrivals) - sent_at, 3) if arrivals and sent_at is not None else None
    return {
        "sockets": sockets,
        "workers": len(assignments),
        "open_seconds": round(opened_seconds, 1),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "kib_per_socket": round((after - before) / sockets / 1024, 1),
        "broadcast_last_delivery_seconds": last_delivery,
        "broadcast_lost": sum(report["outstanding"] for report in delivered),
        "broadcast_duplicates": sum(report["duplicates"] for report in delivered),
        "errors": merged(report["errors"] for report in delivered),
        # Sockets the replicas closed before the workers did, by close code: members the broadcast still owes.
        "lost_sockets": merged(report["lost_sockets"] for report in delivered),
    }


def merged(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    return dict(sum((Counter(count) for count in counts), Counter()))


def run_scale(configurations: list[Configuration], plan: ScalePlan, stack_log, log) -> dict[str, dict]:
    """Storm and idle sockets for each configuration, each on a fresh stack."""
    results = {}
    for configuration in configurations:
        with start_stack(configuration, stack_log) as stack:
            storm_result = asyncio.run(storm(stack, configuration, plan.storm_sockets))
        log(
            f"{configuration.name}: storm of {storm_result['dropped']} dropped sockets back in "
            f"{storm_result['all_back_seconds']} s, never back {storm_result['never_back']}, "
            f"refused {storm_result['refused']}"
        )
        with start_stack(configuration, stack_log) as stack:
            idle_result = idle(stack, configuration, plan.idle_sockets)
        log(
            f"{configuration.name}: {plan.idle_sockets} idle sockets from {idle_result['workers']} processes, "
            f"{idle_result['kib_per_socket']} KiB each; "
            f"broadcast to all in {idle_result['broadcast_last_delivery_seconds']} s, "
            f"lost {idle_result['broadcast_lost']}"
            + (f"; sockets the replicas closed: {idle_result['lost_sockets']}" if idle_result["lost_sockets"] else "")
        )
        results[configuration.name] = {"storm": storm_result, "idle": idle_result}
    return results


# Files a process holds besides its sockets, at most: the generator (the stacks' logs, Redis, HTTP),
# or a replica (its Redis connections, logs).
SPARE_FILES = 2048


def fit_to_open_files(plan: ScalePlan, limit: int, log) -> ScalePlan:
    """The plan with no more storm sockets than the open-file ``limit`` lets one process hold
    (the storm's generator holds them all), said in the log when it had to shrink. The idle
    sockets need no fitting: they are split over as many worker processes as the limit asks."""
    most = (limit - SPARE_FILES) // 1000 * 1000
    if plan.storm_sockets <= most:
        return plan
    log(
        f"open-file limit {limit}: the storm holds {most} sockets instead of {plan.storm_sockets}, "
        "all in one process (raise the hard limit to measure more)"
    )
    return replace(plan, storm_sockets=most)


def plan_dict(plan: ScalePlan) -> dict:
    return asdict(plan)


def table(results: dict[str, dict]) -> str:
    """The markdown table of the expensive moments, one row per configuration."""
    rows = [
        "| configuration | storm: dropped | all back in | half back in | peak handshakes/s per survivor "
        "| refusals seen | never back | idle sockets | KiB per idle socket | broadcast to all: last delivery | lost |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        storm_result, idle_result = result["storm"], result["idle"]
        peaks = " / ".join(str(n) for n in storm_result["peak_handshakes_per_second"].values())
        refusals = ", ".join(f"{k}: {v}" for k, v in storm_result["refused"].items()) or "none"
        rows.append(
            f"| {name} | {storm_result['dropped']} of {storm_result['sockets']} | {storm_result['all_back_seconds']} s "
            f"| {storm_result['half_back_seconds']} s | {peaks} | {refusals} | {storm_result['never_back']} "
            f"| {idle_result['sockets']} | {idle_result['kib_per_socket']} "
            f"| {idle_result['broadcast_last_delivery_seconds']} s | {idle_result['broadcast_lost']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small numbers")
    parser.add_argument("--configs", help="comma-separated configuration names (default: the default, its peers, raw)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/reports/bench-scale"), help="path without suffix")
    parser.add_argument("--storm-sockets", type=int, help=f"default {ScalePlan.storm_sockets}")
    parser.add_argument(
        "--idle-sockets",
        type=int,
        help=f"default {ScalePlan.idle_sockets}; split over one generator process per replica, more if a share "
        "exceeds the open-file limit; each replica holds a third under that same limit",
    )
    args = parser.parse_args(argv)
    plan = SMOKE_SCALE_PLAN if args.smoke else ScalePlan()
    plan = ScalePlan(args.storm_sockets or plan.storm_sockets, args.idle_sockets or plan.idle_sockets)
    default_names = SMOKE_SCALE_CONFIGURATIONS if args.smoke else SCALE_CONFIGURATIONS
    configurations = by_name(args.configs.split(",") if args.configs else list(default_names))
    limit = procstats.raise_open_file_limit(max(plan.idle_sockets, plan.storm_sockets) * 2 + SPARE_FILES)
    plan = fit_to_open_files(plan, limit, print)
    return standalone.run_and_report(
        args.out, plan_dict(plan), lambda stack_log, log: run_scale(configurations, plan, stack_log, log), table
    )


if __name__ == "__main__":
    sys.exit(main())
