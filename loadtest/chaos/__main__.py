"""make chaos: every fault of the suite on the compose stack, then the report.

    python -m loadtest.chaos [--schedule full|short] [--out loadtest/reports/chaos]

Exits 0 only when every guarantee held in every fault window.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from loadtest.chaos import report
from loadtest.chaos.runner import SCHEDULES, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("loadtest/reports/chaos"),
        help="report path without suffix: .json, .md and .png are written",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: a Redis cut runs iptables inside a replica's network namespace (nsenter)")
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[chaos +{time.monotonic() - started:5.0f} s] {line}", flush=True)

    result = asyncio.run(run(args.schedule, log))
    paths = report.write(result, args.out)
    print(report.table(result))
    print(f"\n{'PASS' if result['verdict']['ok'] else 'FAIL'}: report in {paths['md']}")
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
