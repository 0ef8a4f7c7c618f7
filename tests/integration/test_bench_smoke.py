"""The capacity benchmark, run end to end with small numbers, so it cannot silently rot."""

import json
import subprocess
import sys

import pytest

from loadtest.bench.configs import CONFIGURATIONS
from loadtest.bench.loadgen import Ledger

SMOKE_TIMEOUT = 240  # five configurations on a shared 2-core host


@pytest.mark.stack
def test_bench_smoke_measures_every_configuration_and_delivers_everything_at_its_low_rate(tmp_path):
    out = tmp_path / "bench-smoke"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke run passed" in result.stdout

    report = json.loads(out.with_suffix(".json").read_text())
    names = [configuration.name for configuration in CONFIGURATIONS]
    assert list(report["summaries"]) == names
    assert report["machine"]["cores"] and report["machine"]["cpu_model"] and report["machine"]["packages"]["channels"]
    for result_of in report["results"]:
        name = result_of["name"]
        first = result_of["runs"][0]["steps"][0]
        # Every member of every room got every message at the lowest rate, with sockets on all 3 replicas.
        assert first["owed"] > 0 and first["delivered"] == first["owed"], (name, first)
        assert first["lost"] == first["duplicates"] == 0 and first["errors"] == first["sockets_closed"] == {}, (
            name,
            first,
        )
        assert 0 < first["cross_replica_share"] < 1, (name, first)
        broadcast = result_of["memory_and_broadcast"]
        assert broadcast["sockets"] == report["plan"]["broadcast_sockets"]
        assert len(broadcast["sockets_by_replica"]) == 3
        assert [b["lost"] for b in broadcast["broadcasts"]] == [0], name
        assert broadcast["rss_kib_per_socket"] > 0
        assert report["summaries"][name]["ratio_to_raw"] is not None

    table = out.with_suffix(".md").read_text()
    for name in names:
        assert f"| {name} |" in table
    assert "× raw" in table and report["machine"]["cpu_model"] in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table is printed too, with each configuration's ratio to the raw baseline.
    assert "× raw" in result.stdout and "| raw |" in result.stdout


async def test_the_ledger_counts_missing_and_duplicate_deliveries_instead_of_hiding_them():
    ledger = Ledger()
    ledger.owe(1, members=3, sent_at=10.0)
    ledger.owe(2, members=3, sent_at=10.5)
    for frame in ({"id": 1, "sent_at": 10.0, "origin": "a", "served_by": "b"},) * 4 + (
        {"id": 2, "sent_at": 10.5, "origin": "a", "served_by": "a"},
        {"id": 99, "sent_at": 1.0},  # a message of an earlier measurement
    ):
        ledger.arrive(frame, received_at=11.0)
    assert (ledger.owed, ledger.received, ledger.duplicates, ledger.outstanding) == (6, 4, 1, 2)
    assert ledger.latency_ms(100) == 1000.0 and ledger.latency_ms(50) == 1000.0
    assert ledger.pairs == {("a", "b"): 3, ("a", "a"): 1}
