"""The chaos report: chaos.json (everything), chaos.md (a table per fault),
chaos.png (a timeline with the fault windows shaded)."""

from __future__ import annotations

from pathlib import Path

from loadtest.bench import report as bench_report


def cell_checks(window: dict) -> str:
    failed = [name for name, ok in window["checks"].items() if not ok]
    return "✅" if not failed else "❌ " + "; ".join(failed)


def table(report: dict) -> str:
    rows = [
        "| fault | acked | owed deliveries | lost silently | told missed | duplicated | out of order "
        "| longest stall (bound) | reconnects (longest) | healthy after | peak RSS | holds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for w in report["verdict"]["windows"]:
        healthy = "never" if w["healthy_after"] is None else f"{w['healthy_after']:.1f} s"
        rows.append(
            f"| {w['name']} | {w['acked']} | {w['owed']} | {w['lost']} | {w['told_missed']} | {w['duplicated']} "
            f"| {w['reordered']} | {w['longest_stall']:.1f} s ({w['stall_bound']:.0f} s) "
            f"| {w['reconnects']} ({w['longest_reconnect']:.1f} s) | {healthy} "
            f"| {w['peak_rss_mib']:.0f} MiB | {cell_checks(w)} |"
        )
    return "\n".join(rows)


def markdown(report: dict, plot_name: str) -> str:
    verdict = report["verdict"]
    settings = report["settings"]
    lines = [
        f"# Chaos run: {'PASS' if verdict['ok'] else 'FAIL'} ({report['schedule']} schedule)",
        "",
        f"{report['started']}, {report['duration_seconds'] / 60:.1f} min on {report['machine']}. "
        f"{settings['members']} members in {settings['rooms']} rooms over {settings['replicas']} replicas; "
        f"{settings['socket_rate']:g} msg/s per room on a member's socket and {settings['http_rate']:g} msg/s "
        f"through the HTTP API; memory limit {verdict['memory_limit_mib']:.0f} MiB (Kubernetes); "
        f"link timeout {settings['redis_link_timeout_seconds']:g} s.",
        "",
        table(report),
        "",
        "A window runs from its fault's start to the next fault's start. *acked*: publishes the server "
        "acknowledged (202, or the publisher's own copy back); *owed deliveries*: (member, acknowledged "
        "message) pairs; *told missed*: covered by a `recovered: false` welcome; *stall*: a delivery's time "
        "after its publish; *healthy after*: from the fault's end until every replica answered `/readyz` 200.",
        "",
    ]
    for w in verdict["windows"]:
        if w["notes"] or w["examples"]:
            lines.append(f"- **{w['name']}**: " + "; ".join(w["notes"] + w["examples"]))
    if verdict["members_not_connected"]:
        lines += ["", "Members not connected at the end: " + "; ".join(verdict["members_not_connected"])]
    lines += ["", f"![timeline]({plot_name})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    timeline = report["timeline"]
    t0 = report["t0"]
    figure, (rate, stall, reconnects, ready) = pyplot.subplots(4, 1, figsize=(11, 8.5), dpi=100, sharex=True)
    seconds = [s for s, _ in timeline["deliveries_per_second"]]
    rate.plot(seconds, [n for _, n in timeline["deliveries_per_second"]], linewidth=0.8)
    rate.set_ylabel("deliveries/s")
    stall.plot(seconds, [v for _, v in timeline["max_stall_per_second"]], linewidth=0.8, color="tab:red")
    stall.set_ylabel("longest stall (s)\nby publish second")
    reconnects.bar(
        [s for s, _ in timeline["reconnects_per_second"]],
        [n for _, n in timeline["reconnects_per_second"]],
        width=1.0,
        color="tab:purple",
    )
    reconnects.set_ylabel("reconnects")
    ready.step(
        [s for s, _ in timeline["replicas_ready_per_second"]],
        [n for _, n in timeline["replicas_ready_per_second"]],
        where="post",
        color="tab:green",
    )
    ready.set_ylabel("replicas ready")
    ready.set_xlabel("seconds since the start")
    for w in report["verdict"]["windows"]:
        if w["kind"] == "baseline":
            continue
        for axes in (rate, stall, reconnects, ready):
            axes.axvspan(w["start"] - t0, w["end"] - t0, color="orange" if w["ok"] else "red", alpha=0.2)
        rate.annotate(
            w["kind"], (w["start"] - t0, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top"
        )
    rate.set_title(f"Chaos run ({report['schedule']}): fault windows shaded", fontsize=9)
    for axes in (rate, stall, reconnects, ready):
        axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def write(report: dict, out: Path) -> dict[str, Path]:
    return bench_report.write(report, out, plot=plot, markdown=markdown)
