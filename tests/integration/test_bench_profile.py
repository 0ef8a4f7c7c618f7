"""The profiles (make bench-profile), run end to end with small numbers, so they cannot silently rot:
py-spy sampling real replicas under load, and a replica run under tracemalloc holding idle sockets."""

import json
import subprocess
import sys

import pytest

from loadtest.bench.configs import DEFAULT, LIMIT

SMOKE_TIMEOUT = 300  # two configurations, two stacks each, a traced Django start, on a shared 2-core host


@pytest.mark.stack
def test_profiles_charge_the_replicas_cpu_and_idle_memory_to_the_libraries_that_spend_them(tmp_path):
    out = tmp_path / "bench-profile"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.profiling", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["results"]) == [DEFAULT, LIMIT]
    for name, profile in report["results"].items():
        memory = profile["memory"]
        for phase in (profile["cpu"], profile["broadcast"]):
            # Samples of working threads, spread over libraries whose microseconds add up to the measured cost.
            assert phase["samples"] > 0 and phase["replica_cpu_us_per_delivery"] > 0, name
            # Each share is rounded to 4 places and each charge to 0.1 µs: half a unit each may add up.
            shares = phase["by_library"].values()
            assert sum(shares) <= 1 + 0.00005 * len(shares), name
            charges = phase["us_per_delivery_by_library"].values()
            assert 0 < sum(charges) <= phase["replica_cpu_us_per_delivery"] * 1.01 + 0.05 * len(charges), name
        # Every sampled broadcast reached the whole room (the run fails otherwise).
        broadcast = profile["broadcast"]
        assert broadcast["sockets"] == report["plan"]["broadcast_sockets"] and broadcast["broadcasts"] > 0, name
        # The sockets cost Python allocations and RSS.
        assert memory["sockets"] == report["plan"]["idle_sockets"], name
        assert memory["python_bytes_per_socket"] > 1000 and memory["rss_bytes_per_socket_untraced"] > 0, name
        assert memory["bytes_per_socket_by_library"], name
        # Each replica's collapsed stacks are kept for a flame graph.
        for phase in ("fanout", "broadcast"):
            for replica in ("daphne-1", "daphne-2", "daphne-3"):
                assert (tmp_path / "bench-profile-stacks" / f"{name}-{phase}-{replica}.folded").stat().st_size > 0
    # The Daphne replica's protocol objects are Twisted's, autobahn's and Daphne's: the profile must see them.
    default_memory = report["results"][DEFAULT]["memory"]["bytes_per_socket_by_library"]
    assert {"daphne", "autobahn"} <= set(default_memory), default_memory
    assert "picows" in report["results"][LIMIT]["memory"]["bytes_per_socket_by_library"]
    tables = out.with_suffix(".md").read_text()
    assert "fan-out to rooms: replica CPU per delivery" in tables and "broadcast to one room" in tables
