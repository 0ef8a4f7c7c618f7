"""Child processes that can always be stopped completely, with their output prefixed.

Each child starts in its own session, so it is the leader of a process group
that also holds whatever it forks (nginx and gunicorn workers). Stopping
signals the whole group: SIGTERM, then SIGKILL after a timeout. A terminal's
Ctrl-C reaches only the runner, which then stops the children in its own order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

# One line at a time from every pump thread, never interleaved mid-line.
_LOG_LOCK = threading.Lock()


def emit(log: TextIO, line: str) -> None:
    with _LOG_LOCK:
        try:
            log.write(line + "\n")
            log.flush()
        except (OSError, ValueError):
            # A closed or broken log must not stop the pump: a child blocked
            # on a full pipe would stop answering.
            pass


def group_members(pgid: int) -> list[int]:
    """Live pids in a process group (zombies excluded), read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


class ManagedProcess:
    """One command, started in its own process group, output as ``[name] line``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        log: TextIO | None = None,
        hide: Callable[[str], bool] | None = None,
    ):
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log = log
        self.hide = hide  # lines not worth a reader's time (access logs), kept out of ``log``
        self.popen: subprocess.Popen | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> None:
        if self.running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.log else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.log:
            self._pump = threading.Thread(
                target=self._forward, args=(self.popen,), name=f"log-{self.name}", daemon=True
            )
            self._pump.start()

    def _forward(self, popen: subprocess.Popen) -> None:
        for raw in popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not (self.hide and self.hide(line)):
                emit(self.log, f"[{self.name}] {line}")
        popen.stdout.close()
        emit(self.log, f"[{self.name}] exited with code {popen.wait()}")

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def pids(self) -> list[int]:
        """Every live process of this child's group (the child and what it forked)."""
        if self.popen is None:
            return []
        return group_members(self.popen.pid)

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, deadline: float) -> None:
        """Wait for the group until ``deadline``, SIGKILL what is left, reap, join the pump."""
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while a worker it forked lingers: the group
        # outlives its leader, and killpg still reaches it.
        if self.popen.poll() is None or group_members(self.popen.pid):
            self.signal_group(signal.SIGKILL)
            self.popen.wait()
        if self._pump:
            self._pump.join(timeout=5)
            self._pump = None

    def stop(self, timeout: float = 10.0) -> None:
        stop_all([self], timeout)


def stop_all(processes: list[ManagedProcess], timeout: float = 10.0) -> None:
    """SIGTERM every group at once, then wait for all within one shared timeout."""
    for process in processes:
        if process.running():
            process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        process.finish(deadline)
