"""The README shows the kept chaos run as it is, and that run passed."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.chaos import report

ROOT = Path(__file__).resolve().parents[2]
KEPT = ROOT / "loadtest" / "results" / "chaos.json"


def test_readme_shows_the_kept_full_chaos_run():
    kept = json.loads(KEPT.read_text())
    assert kept["schedule"] == "full"
    assert report.table(kept) in (ROOT / "README.md").read_text(), "README's table is not loadtest/results/chaos.json"
    assert report.table(kept) in (ROOT / "loadtest" / "results" / "chaos.md").read_text()


def test_the_kept_chaos_run_held_every_guarantee_in_every_fault():
    kept = json.loads(KEPT.read_text())
    kinds = {w["kind"] for w in kept["verdict"]["windows"]}
    assert kinds >= {
        "kill",
        "drain",
        "rolling",
        "scale",
        "cut",
        "pause",
        "freeze",
        "restart",
        "slow",
        "reload",
        "failover",
    }
    assert kept["verdict"]["ok"]
