"""Run the capacity benchmark: every configuration on its own local stack, measured interleaved.

    python -m loadtest.bench                      # the full benchmark (make bench)
    python -m loadtest.bench --smoke              # same code path, small numbers (make bench-smoke)
    python -m loadtest.bench --configs raw,daphne-pubsub --out /tmp/bench

Writes <out>.json, <out>.md and <out>.png and prints the table. Traffic goes
only to the loopback stacks it starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from deploy.stack import StackError, nginx_binary
from loadtest.bench import procstats, report, scale, standalone
from loadtest.bench.configs import CONFIGURATIONS, by_name
from loadtest.bench.idle_worker import WorkerError
from loadtest.bench.loadgen import ConnectError
from loadtest.bench.runner import SMOKE_PLAN, Plan, plan_dict, run_configurations

REPORTS = Path("loadtest/reports")
# Each process has its own limit: the generator holds one file per socket, an
# nginx worker two per socket it proxies (its share of them), a replica one.
SPARE_FILES = scale.SPARE_FILES


def log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="small numbers: proves the benchmark still works, measures nothing"
    )
    parser.add_argument(
        "--configs", default=",".join(c.name for c in CONFIGURATIONS), help="comma-separated configuration names"
    )
    parser.add_argument(
        "--out", type=Path, help="output path without suffix (default loadtest/reports/bench or bench-smoke)"
    )
    parser.add_argument("--stack-log", type=Path, help="the stacks' own output (default: next to --out, .stack.log)")
    parser.add_argument(
        "--no-scale", action="store_true", help="skip the reconnect storm and the idle sockets (bench/scale.py)"
    )
    args = parser.parse_args(argv)
    try:
        configurations = by_name([name.strip() for name in args.configs.split(",") if name.strip()])
    except ValueError as error:
        parser.error(str(error))
    plan = SMOKE_PLAN if args.smoke else Plan()
    out = args.out or REPORTS / ("bench-smoke" if args.smoke else "bench")
    stack_log_path = args.stack_log or out.with_suffix(".stack.log")
    stack_log_path.parent.mkdir(parents=True, exist_ok=True)

    scale_plan = scale.SMOKE_SCALE_PLAN if args.smoke else scale.ScalePlan()
    wanted = scale.SMOKE_SCALE_CONFIGURATIONS if args.smoke else scale.SCALE_CONFIGURATIONS
    scale_configurations = [] if args.no_scale else [c for c in configurations if c.name in wanted]

    # Every configuration's rate rooms stay open through the rounds; one broadcast room at a time.
    # The idle sockets come after, on a stack of their own.
    sockets = plan.broadcast_sockets + plan.rooms * plan.room_size * len(configurations)
    wanted_files = max(sockets, scale_plan.idle_sockets, scale_plan.storm_sockets) * 2 + SPARE_FILES
    limit = procstats.raise_open_file_limit(wanted_files)
    if scale_configurations:
        scale_plan = scale.fit_to_open_files(scale_plan, limit, log)
    if limit < sockets + SPARE_FILES:
        print(f"the open-file limit is {limit}: too low for {sockets} sockets (raise `ulimit -n`)", file=sys.stderr)
        return 2
    standalone.exit_on_termination()

    started = time.monotonic()
    meta = {
        "mode": "smoke" if args.smoke else "full",
        "machine": procstats.machine(nginx_binary()),
        "load_average_start": procstats.load_average(),
        "open_file_limit": limit,
        "plan": plan_dict(plan),
    }
    log(
        f"capacity benchmark ({meta['mode']}): {', '.join(c.name for c in configurations)}; "
        f"load average {meta['load_average_start']}; stacks' output in {stack_log_path}"
    )
    with open(stack_log_path, "w") as stack_log:
        try:
            results = run_configurations(configurations, plan, stack_log, log)
            scale_results = scale.run_scale(scale_configurations, scale_plan, stack_log, log)
        except (StackError, ConnectError, WorkerError) as error:
            print(f"the benchmark failed: {error} (see {stack_log_path})", file=sys.stderr)
            return 1
    meta.update(load_average_end=procstats.load_average(), seconds=round(time.monotonic() - started, 1))
    built = report.build(results, meta)
    if scale_results:
        built["scale"] = {"plan": scale.plan_dict(scale_plan), "results": scale_results}
    paths = report.write(built, out)
    log("")
    log(report.table(built))
    log("")
    log(report.rounds_table(built))
    log("")
    log(report.targets_table(built))
    log("")
    log(report.peer_targets_table(built))
    if scale_results:
        log("")
        log(scale.table(scale_results))
    if report.failures_text(built):
        log("")
        log(report.failures_text(built))
    log(
        f"\nwritten: {', '.join(str(path) for path in paths.values())}; {meta['seconds']:.0f} s in all, "
        f"load average at the end {meta['load_average_end']}"
    )
    if args.smoke:
        return smoke_verdict(built)
    return 0


def smoke_verdict(built: dict) -> int:
    """The smoke plan's rates are far below any configuration's limit: anything lost is a broken benchmark or stack."""
    broken = [
        name
        for name, summary in built["summaries"].items()
        if summary["runs_with_a_pass"] < summary["runs"] or summary["broadcast_lost"] or summary["failures"]
    ]
    if broken:
        print(f"smoke run FAILED: not everything was delivered at the low rate by {', '.join(broken)}", file=sys.stderr)
        return 1
    print("smoke run passed: every configuration delivered everything at the low rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
