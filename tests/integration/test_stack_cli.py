"""`python -m loadtest.demo --serve` (what make demo runs) serves the chat page, says how to use it
last, and Ctrl-C exits 0 leaving nothing running."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.processes import group_members
from tests.integration.running_stack import leftovers

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_stops_every_process_of_the_served_stack(tmp_path):
    log = (tmp_path / "stack.log").open("w")
    runner = subprocess.Popen(
        [sys.executable, "-m", "loadtest.demo", "--replicas", "2", "--serve"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    try:
        first_line = runner.stdout.readline()
        match = re.fullmatch(r"nginx listening on (http://127\.0\.0\.1:(\d+))\n", first_line)
        assert match, f"first line was {first_line!r}; log: {(tmp_path / 'stack.log').read_text()[-2000:]}"
        url, port = match.group(1), int(match.group(2))
        front_door = [runner.stdout.readline() for _ in range(5)]
        assert front_door[0] == front_door[4] == "=" * 72 + "\n", front_door
        assert front_door[1].startswith("chat:          open ") and "curl -H 'Authorization: Bearer" in front_door[2]
        with urllib.request.urlopen(f"{url}/chat/lobby/", timeout=5) as response:
            page = response.read().decode()
        assert 'id="served-by"' in page

        # Each server is a process-group leader under the runner; the groups
        # also hold the nginx and gunicorn workers.
        leaders = children_of(runner.pid)
        pids = [pid for leader in leaders for pid in group_members(leader)]
        assert len(leaders) == 5, leaders  # redis, 2 daphne, gunicorn, nginx
        assert len(pids) >= 8, pids

        # Ctrl-C in a terminal signals the runner's process group; it is how a demo ends.
        started = time.monotonic()
        os.killpg(runner.pid, signal.SIGINT)
        assert runner.wait(timeout=30) == 0
        print(f"stopped {time.monotonic() - started:.1f} s after SIGINT")
        assert "stopped: every process of the stack has exited" in runner.stdout.read()
        assert leftovers(pids, {"nginx": port}) == []
    finally:
        if runner.poll() is None:
            runner.terminate()  # the runner's own clean stop, so a failed test leaks nothing
            runner.wait(timeout=30)
        runner.stdout.close()
        log.close()
