"""The short text (and JSON) summary of a load test's verdict.

The text is what a person reads at the end of a run; the JSON next to it is
what scripts and tests read, so neither has to parse locust's tables.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from loadtest.thresholds import Verdict


def _ms(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(verdict: Verdict) -> str:
    lines = [f"load test verdict: {verdict.status}"]
    for check in verdict.checks:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(f"  [{mark}] {check.name}: {check.observed} (want {check.limit})")
    ratio = "n/a" if verdict.delivery_ratio is None else f"{verdict.delivery_ratio:.6f}"
    lines.append(f"  deliveries: {verdict.deliveries}, lost or late: {verdict.lost}, delivery ratio: {ratio}")
    lines.append(f"  replicas seen: {', '.join(verdict.replicas) or 'none'}")
    cpu = ", ".join(f"{node} {peak:.0f}%" for node, peak in sorted(verdict.cpu_peaks.items())) or "not measured"
    lines.append(f"  locust CPU peak per process: {cpu}")
    if verdict.pairs:
        width = max(len(row.pair) for row in verdict.pairs)
        lines.append(
            f"  {'type':<12} {'origin->served_by':<{width}} {'count':>8} {'lost':>6} {'p50':>6} {'p95':>6} "
            f"{'p99':>6}  (ms)"
        )
        for row in verdict.pairs:
            lines.append(
                f"  {row.request_type:<12} {row.pair:<{width}} {row.count:>8} {row.failures:>6}"
                f" {_ms(row.p50_ms):>6} {_ms(row.p95_ms):>6} {_ms(row.p99_ms):>6}"
            )
    for note in verdict.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


def write(verdict: Verdict, path: str | Path) -> tuple[Path, Path]:
    """Write the text to ``path`` and the JSON to the same name with ``.json``."""
    text_path = Path(path)
    json_path = text_path.with_suffix(".json")
    text_path.parent.mkdir(parents=True, exist_ok=True)
    text_path.write_text(render(verdict))
    data = dataclasses.asdict(verdict) | {"exit_code": verdict.exit_code}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    return text_path, json_path
