"""The command line of a benchmark phase run on its own (``python -m loadtest.bench.scale``,
``python -m loadtest.bench.profiling``): the stacks' output goes to ``<out>.stack.log``,
the results with the machine and the plan to ``<out>.json``, their tables to ``<out>.md``."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from deploy.stack import nginx_binary
from loadtest.bench import procstats


def _exit_on_signal(signum, frame):
    # Unwinds through the stacks' ``with``: their processes live in sessions of
    # their own, so nothing else would stop them.
    raise SystemExit(128 + signum)


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP stop a benchmark run as Ctrl-C does, stacks and all."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)


def run_and_report(
    out: Path, plan: dict, run: Callable[[TextIO, Callable[[str], None]], dict], table: Callable[[dict], str]
) -> int:
    """``run(stack_log, log)`` returns the results; ``table(results)`` renders them in markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    exit_on_termination()
    started = time.monotonic()
    with open(out.with_suffix(".stack.log"), "w") as stack_log:
        results = run(stack_log, lambda line: print(line, flush=True))
    built = {
        "machine": procstats.machine(nginx_binary()),
        "load_average": procstats.load_average(),
        "plan": plan,
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    out.with_suffix(".json").write_text(json.dumps(built, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    return 0
