"""How busy this locust process was: a starved load generator measures itself.

locust samples its own CPU every 10 s and warns above 90 %; a 30-second run
gets two or three such samples. This watcher samples the same number (psutil's
per-process percentage, where 100 % is one core) over shorter windows and keeps
the peak, which the verdict compares with the same 90 % limit.
"""

from __future__ import annotations

import gevent
import psutil

# Short enough to see a starved stretch in a 20-second run, long enough that
# one garbage collection or the spawn burst does not count as starvation.
WINDOW_SECONDS = 5.0


class CpuWatch:
    def __init__(self) -> None:
        self.process: psutil.Process | None = None
        self.peak = 0.0
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self.stop()
        self.peak = 0.0
        # Looked up here, not at import: locust --processes forks after import.
        self.process = psutil.Process()
        self.process.cpu_percent()  # the first call only sets the baseline
        self.greenlet = gevent.spawn(self._sample)

    def _sample(self) -> None:
        while True:
            gevent.sleep(WINDOW_SECONDS)
            self.peak = max(self.peak, self.process.cpu_percent())

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
            self.greenlet = None
