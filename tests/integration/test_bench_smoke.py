"""The capacity benchmark, run end to end with small numbers, so it cannot silently rot.

Every configuration (the Daphne layers, the default with and without room
history, python-socketio through the generator's Socket.IO adapter, the
``websockets`` and picows servers) over two interleaved rounds, through the
generator's picows client.
"""

import json
import subprocess
import sys

import pytest

from loadtest.bench import report as bench_report
from loadtest.bench.configs import BASELINE, CONFIGURATIONS, DEFAULT, LIMIT, NO_HISTORY, PEER
from loadtest.bench.loadgen import Ledger

SMOKE_TIMEOUT = 420  # seven configurations, two rounds, two storms, on a shared 2-core host


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
    assert {PEER, LIMIT, BASELINE, DEFAULT, NO_HISTORY} <= set(names)
    rounds = report["plan"]["runs"]
    assert rounds == 2
    # The expensive moments, one configuration of each wire: a storm that all came back from, idle sockets
    # whose memory was read and that all got the broadcast, from more than one generator process (one
    # process's open-file limit cannot hold a full run's idle sockets).
    scaled = report["scale"]["results"]
    assert list(scaled) == [DEFAULT, PEER]
    for name, moments in scaled.items():
        storm, idle = moments["storm"], moments["idle"]
        assert storm["dropped"] > 0 and storm["reconnected"] == storm["dropped"] and storm["never_back"] == 0, name
        survivors = storm["peak_handshakes_per_second"]
        assert len(survivors) == 2 and storm["killed"] not in survivors, name
        assert idle["sockets"] == report["scale"]["plan"]["idle_sockets"] and idle["kib_per_socket"] > 0, name
        assert idle["broadcast_lost"] == idle["broadcast_duplicates"] == 0, name
        assert idle["errors"] == idle["lost_sockets"] == {}, name
        assert idle["workers"] >= 3, name  # the 3 replicas' shares in a process each
        assert idle["broadcast_last_delivery_seconds"] is not None, name
    assert "| storm: dropped |" in out.with_suffix(".md").read_text()
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
        assert len(result_of["runs"]) == rounds, name
        # Every round measured every configuration: its ratios to each reference, round by round, with their spread.
        summary = report["summaries"][name]
        assert summary["ratio_to_raw"] is not None
        for reference in (BASELINE, LIMIT, PEER):
            ratios = summary["ratios"][reference]
            assert len(ratios["per_round"]) == rounds and None not in ratios["per_round"], (name, reference, ratios)
            assert ratios["min"] <= ratios["median"] <= ratios["max"], (name, reference, ratios)
    # The rounds ran interleaved: round 1 of every configuration before round 2 of any.
    rounds_logged = [line.split(" of ")[0] for line in result.stdout.splitlines() if line.startswith("round ")]
    assert rounds_logged[:1] == ["round 1"] and "round 2" in rounds_logged, rounds_logged
    peer = report["peer_targets"]
    assert {"peer_rate", "peer_cpu", "limit_rate", "limit_cpu", "history"} <= set(peer)
    assert peer["history"]["cost_median"] is not None

    table = out.with_suffix(".md").read_text()
    for name in names:
        assert f"| {name} |" in table
    assert "× raw" in table and report["machine"]["cpu_model"] in table
    assert "by round" in table and "room history's cost" in table and "Interleaved: 2 rounds" in table
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


def test_ratios_are_taken_within_each_round_and_reported_with_their_spread():
    def result(*rates, cpu=10.0):
        return {
            "runs": [
                {"best": {"offered_rate": rate, "replica_cpu_us_per_delivery": cpu} if rate else None} for rate in rates
            ]
        }

    mine, reference = result(90.0, 0.0, 120.0, cpu=20.0), result(100.0, 100.0, 100.0)
    assert bench_report.rate_ratios(mine, reference) == [0.9, 0.0, 1.2]
    assert bench_report.cpu_ratios(mine, reference) == [2.0, None, 2.0]
    assert bench_report.spread([0.9, 0.0, 1.2]) == {"per_round": [0.9, 0.0, 1.2], "median": 0.9, "min": 0.0, "max": 1.2}
    # A round in which the reference passed nothing has no ratio; the spread is over the others.
    assert bench_report.rate_ratios(result(50.0, 60.0), result(0.0, 40.0)) == [None, 1.5]
    assert bench_report.spread([None, 1.5])["median"] == 1.5
    assert bench_report._spread(bench_report.spread([0.9, 0.0, 1.2])) == "0.9 (0–1.2)"
