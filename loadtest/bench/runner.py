"""The measurements, interleaved over every configuration: rate stepping, idle-socket memory, the big broadcast.

Interleaving: every configuration's stack is started first and stays up; then
``runs`` rounds each run every configuration's rate stepping in turn (A B C
A B C ...), so a slow minute of the shared machine falls on one round of all
of them instead of on all the runs of one, and every ratio to the baseline is
taken within a round and reported with its spread over the rounds. The
stacks not being measured hold their idle rooms (a ping every 20 s).

Rate stepping: ``rooms`` rooms of ``room_size`` members; each published
message is owed to every member of its room on every replica. A step offers
one publish rate for ``step_seconds``; it passes when every delivery arrived
(none lost, none duplicated, no error frame, no socket closed) with p99
latency at most ``max_p99_ms``. A failed step is repeated once: on a shared
machine a stall elsewhere can fail one step, so a failure must be confirmed.
The rates form one geometric ladder. The first round climbs it in strides until
a confirmed failure, then rung by rung from the last pass; later rounds start a
few rungs below the first round's result. A run ends at its confirmed failure,
with one more step halfway (geometrically) between it and the rung below, or
when the generator itself was saturated (the result is then only a lower
bound). Then, for each configuration, one overload step, ``overload_factor`` ×
its median lossless rate for longer, shows what is lost or late above the limit.

Memory and broadcast, one configuration after the other: ``broadcast_sockets``
members of one room, opened in ``memory_batches`` batches; each replica's RSS
growth per socket is taken for every batch. Then one message to the whole
room, ``broadcasts`` times: its completion time is the last member's delivery.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import uvloop

from deploy.stack import LocalStack, probe
from loadtest.bench.configs import Configuration, start_stack
from loadtest.bench.loadgen import SATURATED_CPU, ConnectError, CpuClock, Fleet, Ledger, interleaved, offer
from loadtest.bench.procstats import CpuMeter, listening_pids, rss_bytes

BROADCAST_ROOM = "bench-broadcast"


@dataclass(frozen=True)
class Plan:
    rooms: int = 10
    room_size: int = 30
    # Rounds: every configuration's rate stepping once per round, interleaved.
    runs: int = 3
    min_rate: float = 20.0
    max_rate: float = 8000.0
    rung_factor: float = 1.2
    coarse_stride: int = 3
    restart_below: int = 3
    # Bounds on each round's stepping, so the whole benchmark fits its 20 minutes;
    # a run cut short says so (``time_capped``).
    first_run_seconds: float = 55.0
    later_run_seconds: float = 30.0
    step_seconds: float = 3.0
    grace_seconds: float = 2.0
    drain_seconds: float = 3.0
    max_p99_ms: float = 50.0
    overload_factor: float = 2.0
    overload_seconds: float = 6.0
    overload_drain_seconds: float = 15.0
    broadcast_sockets: int = 10_200
    memory_batches: int = 3
    broadcasts: int = 3
    broadcast_timeout: float = 15.0
    # How long a memory batch retries refused handshakes: a Daphne replica that
    # the rebalancing census finds above the band refuses new sockets (503)
    # for two 10 s intervals, which a bulk open can trigger.
    memory_open_seconds: float = 60.0

    def ladder(self) -> list[float]:
        rates, rate = [], self.min_rate
        while rate <= self.max_rate:
            rates.append(round(rate, 1))
            rate *= self.rung_factor
        return rates


SMOKE_PLAN = Plan(
    rooms=4,
    room_size=10,
    runs=2,
    min_rate=10.0,
    max_rate=20.0,
    rung_factor=2.0,
    step_seconds=1.0,
    first_run_seconds=30.0,
    later_run_seconds=30.0,
    grace_seconds=2.0,
    drain_seconds=2.0,
    max_p99_ms=1000.0,
    overload_factor=1.0,
    overload_seconds=1.0,
    overload_drain_seconds=2.0,
    broadcast_sockets=300,
    memory_batches=2,
    broadcasts=1,
)


def _passed(step: dict, plan: Plan) -> bool:
    return (
        step["lost"] == 0
        and step["duplicates"] == 0
        and not step["errors"]
        and not step["sockets_closed"]
        and step["p99_ms"] is not None
        and step["p99_ms"] <= plan.max_p99_ms
        and not step["generator_saturated"]
    )


class Bench:
    """The measurements of one configuration on its running stack."""

    def __init__(self, stack: LocalStack, plan: Plan, wire: str = "json", name: str = ""):
        self.stack = stack
        self.plan = plan
        self.replica_pids = {name: listening_pids(port) for name, port in stack.replica_ports.items()}
        self.cpu_groups = {**self.replica_pids, "redis": stack.redis.pids(), "nginx": listening_pids(stack.port)}
        self.fleet = Fleet(stack.url, wire=wire, name=name)
        #: wall time spent measuring this configuration
        self.seconds = 0.0

    # --- rate stepping ------------------------------------------------------

    async def step(self, publishers, rate: float, seconds: float | None = None, drain: float | None = None) -> dict:
        plan, fleet = self.plan, self.fleet
        ledger = fleet.measure()
        errors_before, closed_before = Counter(fleet.errors), Counter(fleet.lost_sockets)
        meter, generator = CpuMeter(self.cpu_groups), CpuClock()
        started = time.monotonic()
        sent = await offer(fleet, publishers, rate, seconds or plan.step_seconds)
        sending = time.monotonic() - started
        generator_cpu = generator.share()
        await fleet.settle(time.monotonic() + plan.grace_seconds)
        late = ledger.outstanding
        cpu = meter.read()
        if ledger.outstanding:
            # What is still on its way arrives late (judged as a failure); what
            # never arrives within the drain is lost.
            await fleet.quiet(0.3, drain or plan.drain_seconds)
        result = self._step_result(
            ledger,
            rate,
            sent,
            sending,
            late,
            cpu,
            generator_cpu,
            dict(fleet.errors - errors_before),
            dict(fleet.lost_sockets - closed_before),
        )
        replica_seconds = sum(meter.seconds[name] for name in self.replica_pids)
        result["replica_cpu_us_per_delivery"] = (
            round(replica_seconds / ledger.received * 1e6, 1) if ledger.received else None
        )
        return result

    def _step_result(self, ledger: Ledger, rate, sent, sending, late, cpu, generator_cpu, errors, closed) -> dict:
        return {
            "offered_rate": rate,
            "published": sent,
            "achieved_rate": round(sent / sending, 1),
            "owed": ledger.owed,
            "delivered": ledger.received,
            "deliveries_per_s": round(ledger.received / sending, 1),
            "late": late - ledger.outstanding,
            "lost": ledger.outstanding,
            "lost_pct": round(100 * ledger.outstanding / ledger.owed, 2) if ledger.owed else 0.0,
            "duplicates": ledger.duplicates,
            "errors": errors,
            "sockets_closed": closed,
            "p50_ms": ledger.latency_ms(50),
            "p95_ms": ledger.latency_ms(95),
            "p99_ms": ledger.latency_ms(99),
            "max_ms": ledger.latency_ms(100),
            "cross_replica_share": round(
                sum(n for (origin, served_by), n in ledger.pairs.items() if origin != served_by) / ledger.received, 3
            )
            if ledger.received
            else None,
            "cpu": {**{name: cpu[name] for name in self.replica_pids}, "redis": cpu["redis"], "nginx": cpu["nginx"]},
            "generator_cpu": round(generator_cpu, 3),
            "generator_saturated": generator_cpu > SATURATED_CPU,
        }

    async def attempt(self, publishers, rate: float, run: int, steps: list[dict], log) -> dict:
        """One step at ``rate``, repeated once if it fails: on a shared machine one
        stall of another process can fail a step, and a failure must be confirmed."""
        for repeat in (False, True):
            step = await self.step(publishers, rate)
            step["passed"] = _passed(step, self.plan)
            step["repeat"] = repeat
            steps.append(step)
            log(
                f"  round {run} {rate:>7.1f} msg/s: "
                f"{'pass' if step['passed'] else 'FAIL'}{' (repeat)' if repeat else ''}  "
                f"p99 {step['p99_ms']} ms, lost {step['lost']}, late {step['late']}, "
                f"replicas {'/'.join(str(step['cpu'][name]) for name in self.replica_pids)} cores, "
                f"generator {step['generator_cpu']}"
                + (f", error frames {step['errors']}" if step["errors"] else "")
                + (f", sockets closed by the server {step['sockets_closed']}" if step["sockets_closed"] else "")
            )
            if step["passed"] or step["generator_saturated"]:
                break
        return step

    async def run_rates(self, run: int, first_best_index: int | None, log) -> dict:
        plan, ladder = self.plan, self.plan.ladder()
        await self.fleet.repair()
        publishers = interleaved(self.fleet.rooms)
        deadline = time.monotonic() + (plan.first_run_seconds if first_best_index is None else plan.later_run_seconds)
        time_capped = False
        steps: list[dict] = []
        best: dict | None = None
        failure: dict | None = None
        if first_best_index is None:
            index, stride = 0, plan.coarse_stride
        else:
            index, stride = max(0, first_best_index - plan.restart_below), 1
        lowest = max(0, index - plan.restart_below)
        last_pass = -1
        while index < len(ladder):
            if time.monotonic() > deadline:
                time_capped = True
                log(f"  round {run}: out of time, stopped")
                break
            step = await self.attempt(publishers, ladder[index], run, steps, log)
            if step["generator_saturated"] or step["sockets_closed"]:
                # Either the generator cannot measure higher, or sockets were
                # lost and every later step would count them: this run ends here.
                break
            if step["passed"]:
                best, last_pass = step, index
                index += stride
                continue
            failure = step
            if stride > 1 and index > last_pass + 1:
                # The coarse climb overshot: go on rung by rung from the last pass.
                stride, index = 1, last_pass + 1
            elif best is None and index > lowest:
                # A later run that started too high: come down to where it passes.
                index -= 1
            else:
                break
        best_index = ladder.index(best["offered_rate"]) if best else None
        if failure and best and failure["offered_rate"] == ladder[best_index + 1] and time.monotonic() < deadline:
            # Halve the last rung (geometrically): the result is then known to
            # within sqrt(rung_factor), not a whole rung.
            step = await self.attempt(
                publishers, round((best["offered_rate"] * failure["offered_rate"]) ** 0.5, 1), run, steps, log
            )
            if step["passed"]:
                best = step
            elif not step["generator_saturated"] and not step["sockets_closed"]:
                failure = step
        return {
            "run": run,
            "best": best,
            "best_index": best_index,
            "first_failure_above": failure
            if failure and best and failure["offered_rate"] > best["offered_rate"]
            else None,
            "generator_bound": bool(steps and steps[-1]["generator_saturated"]),
            "time_capped": time_capped,
            "steps": steps,
        }

    async def overload(self, rate: float, log) -> dict:
        """What happens above the limit: ``overload_factor`` × the lossless rate for
        longer, then a long drain; whatever never arrives is lost."""
        await self.fleet.repair()
        step = await self.step(
            interleaved(self.fleet.rooms), rate, self.plan.overload_seconds, self.plan.overload_drain_seconds
        )
        log(
            f"  overload {rate:.1f} msg/s for {self.plan.overload_seconds:g} s: lost {step['lost']} "
            f"({step['lost_pct']} %), "
            f"late {step['late']}, p99 {step['p99_ms']} ms"
        )
        return step

    # --- memory and broadcast -----------------------------------------------

    async def replicas_ready(self, log, timeout: float = 60.0) -> None:
        """Until every replica's /readyz answers 200: a replica that closed hundreds of
        sockets at once may refuse handshakes (503) while it catches up."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.stack.replica_ports)
        while waiting and time.monotonic() < deadline:
            for name, port in list(waiting.items()):
                status, _ = await asyncio.to_thread(probe, f"http://127.0.0.1:{port}/readyz", 1.0)
                if status == 200:
                    del waiting[name]
            if waiting:
                await asyncio.sleep(0.5)
        if waiting:
            log(f"  not ready after {timeout:g} s: {', '.join(waiting)} (going on)")

    async def memory_and_broadcast(self, log) -> dict:
        plan, fleet = self.plan, self.fleet
        waited = time.monotonic()
        await self.replicas_ready(log)
        if time.monotonic() - waited > 1.0:
            log(f"  waited {time.monotonic() - waited:.1f} s for every replica to be ready")
        samples, per_replica = [], {}
        refused: Counter = Counter()
        batch = plan.broadcast_sockets // plan.memory_batches
        for number in range(plan.memory_batches):
            before = {name: rss_bytes(pids[0]) for name, pids in self.replica_pids.items()}
            opened_at = time.monotonic()
            members = await fleet.open(BROADCAST_ROOM, batch, within=plan.memory_open_seconds, refused=refused)
            opened_in = time.monotonic() - opened_at
            await asyncio.sleep(0.5)  # let the replicas finish what each handshake started
            on = fleet.sockets_by_pod(members)
            for name, pids in self.replica_pids.items():
                growth = rss_bytes(pids[0]) - before[name]
                if on[name]:
                    samples.append(growth / on[name])
                    per_replica.setdefault(name, []).append(round(growth / on[name] / 1024, 2))
            log(
                f"  batch {number + 1}: {batch} sockets in {opened_in:.1f} s, spread {dict(on)}"
                + (f", handshakes refused so far {dict(refused)}" if refused else "")
            )
        sockets = len(fleet.rooms[BROADCAST_ROOM])
        broadcasts = []
        for number in range(plan.broadcasts):
            ledger, errors_before = fleet.measure(), Counter(fleet.errors)
            fleet.rooms[BROADCAST_ROOM][number * 997 % sockets].publish(fleet.next_id())
            await fleet.settle(time.monotonic() + plan.broadcast_timeout)
            broadcasts.append(
                {
                    "sockets": sockets,
                    "delivered": ledger.received,
                    "lost": ledger.outstanding,
                    "completion_ms": ledger.latency_ms(100),
                    "p50_ms": ledger.latency_ms(50),
                    "errors": dict(fleet.errors - errors_before),
                }
            )
            log(
                f"  broadcast {number + 1} to {sockets} sockets: last delivery after "
                f"{broadcasts[-1]['completion_ms']} ms, "
                f"lost {ledger.outstanding}"
                + (f", error frames {broadcasts[-1]['errors']}" if broadcasts[-1]["errors"] else "")
            )
            await fleet.quiet(0.3, plan.drain_seconds)
        return {
            "sockets": sockets,
            "sockets_by_replica": dict(fleet.sockets_by_pod(fleet.rooms[BROADCAST_ROOM])),
            "rss_kib_per_socket_samples": per_replica,
            "rss_kib_per_socket": round(statistics.median(samples) / 1024, 2),
            # Refused handshakes, retried: by HTTP status (or timeout, connection).
            "handshakes_refused": dict(refused),
            "broadcasts": broadcasts,
        }


async def measure(benches: dict[str, Bench], plan: Plan, log) -> dict[str, dict]:
    """Every configuration's measurements, the rate stepping interleaved round by round."""
    for name, bench in benches.items():
        for number in range(plan.rooms):
            await bench.fleet.open(f"bench-rate-{number}", plan.room_size)
        log(
            f"{name}: {plan.rooms * plan.room_size} sockets in {plan.rooms} rooms, "
            f"spread {dict(bench.fleet.sockets_by_pod())}"
        )
    runs: dict[str, list[dict]] = {name: [] for name in benches}
    # A configuration whose sockets cannot be (re)opened in one phase is
    # reported with why; the others' measurements go on.
    failures: dict[str, list[str]] = {name: [] for name in benches}
    for run in range(1, plan.runs + 1):
        log(f"round {run} of {plan.runs}: {' '.join(benches)}")
        for name, bench in benches.items():
            log(f" {name}")
            started = time.monotonic()
            first = runs[name][0]["best_index"] if runs[name] and runs[name][0]["best"] else None
            try:
                runs[name].append(await bench.run_rates(run, first, log))
            except ConnectError as error:
                log(f"  round {run}: FAILED, {error}")
                failures[name].append(f"round {run}: {error}")
                runs[name].append(_failed_run(run))
            bench.seconds += time.monotonic() - started
        bests = {name: runs[name][-1]["best"] for name in benches}
        log(
            f"round {run} best lossless rates: "
            + ", ".join(f"{name} {best['offered_rate'] if best else 0:g}" for name, best in bests.items())
        )
    results = {}
    for name, bench in benches.items():
        started = time.monotonic()
        bests = [run["best"]["offered_rate"] for run in runs[name] if run["best"]]
        log(f" {name}")
        overload = None
        if bests:
            try:
                overload = await bench.overload(plan.overload_factor * statistics.median(bests), log)
            except ConnectError as error:
                log(f"  overload: FAILED, {error}")
                failures[name].append(f"overload: {error}")
        bench.seconds += time.monotonic() - started
        results[name] = {"runs": runs[name], "overload": overload}
    for bench in benches.values():
        await bench.fleet.close()
    for name, bench in benches.items():
        started = time.monotonic()
        log(f" {name}: memory and broadcast")
        try:
            results[name]["memory_and_broadcast"] = await bench.memory_and_broadcast(log)
        except ConnectError as error:
            log(f"  memory and broadcast: FAILED, {error}")
            failures[name].append(f"memory and broadcast: {error}")
            results[name]["memory_and_broadcast"] = None
        await bench.fleet.close()
        bench.seconds += time.monotonic() - started
        results[name].update(seconds=round(bench.seconds, 1), failures=failures[name])
    return results


def _failed_run(run: int) -> dict:
    return {
        "run": run,
        "best": None,
        "best_index": None,
        "first_failure_above": None,
        "generator_bound": False,
        "time_capped": False,
        "failed": True,
        "steps": [],
    }


def run_configurations(configurations: list[Configuration], plan: Plan, stack_log, log) -> list[dict]:
    """Start a stack for every configuration, measure them all interleaved, stop them all."""
    with ExitStack() as stacks:
        benches: dict[str, Bench] = {}
        for configuration in configurations:
            started = time.monotonic()
            stack = stacks.enter_context(start_stack(configuration, stack_log))
            benches[configuration.name] = Bench(stack, plan, configuration.wire, configuration.name)
            log(f"{configuration.name}: {configuration.summary} (stack up in {time.monotonic() - started:.0f} s)")
        # The generator on uvloop: less of the shared CPU for its own event loop.
        results = uvloop.run(measure(benches, plan, log))
    return [
        {
            **results[configuration.name],
            "name": configuration.name,
            "summary": configuration.summary,
            "channel_layer": configuration.channel_layer,
            "env": configuration.env,
            "wire": configuration.wire,
        }
        for configuration in configurations
    ]


def plan_dict(plan: Plan) -> dict:
    return {**asdict(plan), "ladder": plan.ladder()}
