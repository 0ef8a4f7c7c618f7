"""Run a replica module with Python's allocations traced, for the memory profile.

    python -m loadtest.bench.traced_replica MODULE [ARGS...]

runs ``python -m MODULE ARGS...`` in this process after starting
``tracemalloc``; each SIGUSR1 then writes a snapshot of every live Python
allocation, with its call stack, to ``$TRACEMALLOC_SNAPSHOT_DIR/<pid>-<n>.snapshot``
(whole: written aside, then renamed). loadtest.bench.profiling reads two of
them, before and after it opens the idle sockets, and the difference is what
the sockets cost, by the code that allocated it. The replica itself is
unchanged: the same module and arguments as the benchmark's stacks run.
"""

from __future__ import annotations

import itertools
import os
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path

# Frames kept per allocation: enough to reach, from a stdlib or C call, the
# library or application code that asked for it.
FRAMES = 16


def main() -> None:
    module, *args = sys.argv[1:]
    directory = Path(os.environ["TRACEMALLOC_SNAPSHOT_DIR"])
    numbers = itertools.count(1)

    def dump(signum, frame) -> None:
        path = directory / f"{os.getpid()}-{next(numbers)}.snapshot"
        aside = path.with_suffix(".partial")
        tracemalloc.take_snapshot().dump(str(aside))
        aside.rename(path)

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
