"""locust's fan-out scenario against the local stack: the exit code is the verdict.

locust runs as a subprocess, as ops teams run it: its gevent monkey-patching
must not leak into pytest, and the exit code is what a pipeline sees.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.running_stack import checked_stack

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One 3-replica stack for the module: starting one costs more than a short run."""
    log_path = tmp_path_factory.mktemp("stack") / "stack.log"
    with open(log_path, "w") as log, checked_stack(replicas=3, log=log) as running:
        yield running


def run_locust(url: str, out: Path, *options: str, users: int = 18, run_time: str = "12s"):
    """Run the FanoutUser scenario headless; returns (exit code, summary JSON, stdout + stderr)."""
    summary = out / "summary.txt"
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "FanoutUser",
        "--headless",
        "--only-summary",
        "--host",
        url,
        "--users",
        str(users),
        "--spawn-rate",
        "9",
        "--run-time",
        run_time,
        "--csv",
        str(out / "fanout"),
        "--html",
        str(out / "fanout.html"),
        "--summary-file",
        str(summary),
        *options,
    ]
    # The caller's LOCUST_* settings must not change what this test measures.
    env = {name: value for name, value in os.environ.items() if not name.startswith("LOCUST_")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=REPO, env=env)
    output = result.stdout + result.stderr
    assert summary.with_suffix(".json").exists(), f"no summary was written:\n{output}"
    # The same summary closes the run's standard output.
    assert result.stdout.rstrip().endswith(summary.read_text().rstrip()), output
    return result.returncode, json.loads(summary.with_suffix(".json").read_text()), output


def failed_checks(verdict: dict) -> list[str]:
    return [check["name"] for check in verdict["checks"] if not check["ok"]]


def test_a_fanout_run_passes_with_every_replica_and_every_cross_replica_pair(stack, tmp_path):
    code, verdict, output = run_locust(stack.url, tmp_path, "--min-replicas", "3")

    assert (code, verdict["status"]) == (0, "PASS"), output
    assert verdict["deliveries"] > 0 and verdict["lost"] == 0, output
    assert verdict["delivery_ratio"] == 1.0, output
    assert verdict["replicas"] == stack.replica_names, output
    every_pair = [f"{a}->{b}" for a, b in itertools.permutations(stack.replica_names, 2)]
    assert verdict["cross_pairs"] == sorted(every_pair), output
    html = (tmp_path / "fanout.html").read_text()
    # The report embeds its stats as JSON, where ">" may be written \u003e.
    assert "daphne-1->daphne-2" in html.replace("\\u003e", ">")
    assert "daphne-3->daphne-1" in (tmp_path / "fanout_stats.csv").read_text()


def test_a_replica_drained_mid_run_passes_its_members_resume_with_no_duplicate(stack, tmp_path):
    # The replica's members are closed with 1001, come back through nginx to
    # the others and resume from their last offset: nothing lost, nothing twice.
    victim = "daphne-2"

    def drain_and_restart():
        time.sleep(5)  # every user joined (18 at 9/s) and published for a while
        stack.kill_replica(victim, signal.SIGTERM)
        stack.start_replica(victim)

    chaos = threading.Thread(target=drain_and_restart)
    chaos.start()
    try:
        code, verdict, output = run_locust(stack.url, tmp_path, "--min-replicas", "3")
    finally:
        chaos.join()

    assert (code, verdict["status"]) == (0, "PASS"), output
    assert verdict["lost"] == 0 and verdict["duplicates"] == 0, output
    assert "duplicate deliveries" in [check["name"] for check in verdict["checks"]]
    assert verdict["reconnects"] > 0 and list(verdict["reconnect_codes"]) == ["1001"], output
    assert verdict["resumes_recovered"] == verdict["reconnects"] and verdict["resumes_not_recovered"] == 0, output
    assert f"reconnects: {verdict['reconnects']} (after close code 1001: {verdict['reconnects']})" in output
    # The drained replica's sockets were dropped without a failure: a resume is not an error.
    assert "other request failures" not in failed_checks(verdict)


def test_an_impossible_threshold_fails_a_distributed_run(stack, tmp_path):
    # Master plus two worker processes: the master judges the aggregated
    # stats, so it must still see every replica and every pair.
    code, verdict, output = run_locust(
        stack.url,
        tmp_path,
        "--processes",
        "2",
        "--max-p99-ms",
        "0.001",
        "--min-replicas",
        "3",
        users=24,
        run_time="8s",
    )

    assert (code, verdict["status"]) == (1, "FAIL"), output
    assert failed_checks(verdict) == ["p99 fan-out latency"], output
    assert verdict["replicas"] == stack.replica_names, output
    assert len(verdict["cross_pairs"]) == 6, output
    assert {"master", "worker-0", "worker-1"} <= set(verdict["cpu_peaks"]), output


def test_replicas_without_a_shared_channel_layer_fail_on_lost_deliveries(tmp_path):
    # Each replica with its own in-memory layer: every cross-replica message
    # is lost. The deadline must turn each into a failure the verdict counts.
    with open(tmp_path / "stack.log", "w") as log, checked_stack(replicas=2, channel_layer="memory", log=log) as broken:
        code, verdict, output = run_locust(
            broken.url, tmp_path, "--delivery-deadline", "1", "--room-size", "4", users=8, run_time="6s"
        )

    assert (code, verdict["status"]) == (1, "FAIL"), output
    assert verdict["lost"] > 0 and verdict["delivery_ratio"] < 0.9, output
    assert {"delivery ratio", "cross-replica pairs"} <= set(failed_checks(verdict)), output
    assert verdict["cross_pairs"] == [], output
    lost_pairs = {row["pair"] for row in verdict["pairs"] if row["failures"]}
    assert lost_pairs == {"daphne-1->daphne-2", "daphne-2->daphne-1"}, output
