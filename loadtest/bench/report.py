"""The benchmark's results as medians, a markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from loadtest.bench import scale
from loadtest.bench.configs import BASELINE, DEFAULT, LIMIT, NO_HISTORY, PEER

# Every configuration's ratios are taken, round by round, to these of the same run.
REFERENCES = (BASELINE, LIMIT, PEER)
# The blueprint's targets, read against the raw baseline of the same run.
TARGET_THROUGHPUT_RATIO = 0.8
# ... and against python-socketio (issue 15): the default's lossless rate and
# replica CPU per delivery, and what room history may cost it.
TARGET_PEER_RATE_RATIO = 1.5
TARGET_PEER_CPU_RATIO = 2 / 3
TARGET_HISTORY_COST = 0.10
TARGET_HALF_RATE_P99_MS = 50.0
TARGET_KIB_PER_SOCKET = 40.0
TARGET_BROADCAST_SOCKETS = 10_000
TARGET_BROADCAST_MS = 3000.0


def _median(values):
    values = [value for value in values if value is not None]
    return round(statistics.median(values), 2) if values else None


def spread(values: list[float | None]) -> dict:
    """Per-round values with their median, min and max (rounds without a value left out of those)."""
    known = [value for value in values if value is not None]
    return {
        "per_round": [None if value is None else round(value, 3) for value in values],
        "median": round(statistics.median(known), 3) if known else None,
        "min": round(min(known), 3) if known else None,
        "max": round(max(known), 3) if known else None,
    }


def _best_rate(run: dict) -> float:
    # A round in which nothing passed counts as 0.
    return run["best"]["offered_rate"] if run["best"] else 0.0


def rate_ratios(result: dict, reference: dict) -> list[float | None]:
    """Lossless rate over the reference's, round by round (None where the reference passed nothing)."""
    return [
        _best_rate(run) / _best_rate(ref) if _best_rate(ref) else None
        for run, ref in zip(result["runs"], reference["runs"], strict=True)
    ]


def cpu_ratios(result: dict, reference: dict) -> list[float | None]:
    """Replica CPU per delivery (each at its own lossless rate) over the reference's, round by round."""
    ratios = []
    for run, ref in zip(result["runs"], reference["runs"], strict=True):
        mine = run["best"]["replica_cpu_us_per_delivery"] if run["best"] else None
        theirs = ref["best"]["replica_cpu_us_per_delivery"] if ref["best"] else None
        ratios.append(mine / theirs if mine and theirs else None)
    return ratios


def summarize(result: dict) -> dict:
    """Medians over the rounds of one configuration."""
    runs = result["runs"]
    bests = [run["best"] for run in runs if run["best"]]
    replicas = sorted(bests[0]["cpu"]) if bests else []
    replicas = [name for name in replicas if name not in ("redis", "nginx")]
    overload = result["overload"]
    broadcast = result["memory_and_broadcast"]
    return {
        "name": result["name"],
        "summary": result["summary"],
        "runs": len(runs),
        "runs_with_a_pass": len(bests),
        "max_rate_by_round": [_best_rate(run) for run in runs],
        # A run in which nothing passed counts as 0 towards the median.
        "max_rate": _median([run["best"]["offered_rate"] if run["best"] else 0.0 for run in runs]),
        "deliveries_per_s": _median([run["best"]["deliveries_per_s"] if run["best"] else 0.0 for run in runs]),
        "p50_ms": _median([best["p50_ms"] for best in bests]),
        "p95_ms": _median([best["p95_ms"] for best in bests]),
        "p99_ms": _median([best["p99_ms"] for best in bests]),
        "cpu_per_replica": [_median([best["cpu"][name] for best in bests]) for name in replicas],
        "cpu_redis": _median([best["cpu"]["redis"] for best in bests]),
        "cpu_nginx": _median([best["cpu"]["nginx"] for best in bests]),
        "generator_cpu": _median([best["generator_cpu"] for best in bests]),
        "generator_bound": any(run["generator_bound"] for run in runs),
        "time_capped": any(run["time_capped"] for run in runs),
        "replica_cpu_us_per_delivery": _median([best["replica_cpu_us_per_delivery"] for best in bests]),
        "overload": {key: overload[key] for key in ("offered_rate", "owed", "lost", "lost_pct", "late", "p99_ms")}
        if overload
        else None,
        # None when that phase failed (``failures`` says why).
        "rss_kib_per_socket": broadcast["rss_kib_per_socket"] if broadcast else None,
        "broadcast_sockets": broadcast["sockets"] if broadcast else 0,
        "broadcast_ms": _median([b["completion_ms"] for b in broadcast["broadcasts"]]) if broadcast else None,
        "broadcast_lost": sum(b["lost"] for b in broadcast["broadcasts"]) if broadcast else None,
        "failures": result.get("failures", []),
    }


def p99_by_rate(result: dict) -> dict[float, float]:
    """Median p99 of every offered rate any run measured."""
    by_rate = defaultdict(list)
    for run in result["runs"]:
        for step in run["steps"]:
            if step["p99_ms"] is not None:
                by_rate[step["offered_rate"]].append(step["p99_ms"])
    return {rate: round(statistics.median(values), 2) for rate, values in sorted(by_rate.items())}


def targets(summary: dict, baseline: dict, ladder: list[float], p99s: dict[float, float]) -> dict:
    raw = baseline["max_rate"] or 0.0
    # The median of the per-round ratios: each round's pair measured minutes apart, not a whole run apart.
    ratio = summary["ratios"][BASELINE]["median"]
    # "p99 <= 50 ms at half that rate": the highest ladder rung at or below half the baseline's rate.
    half = max([rate for rate in ladder if rate <= raw / 2], default=None)
    return {
        "throughput_ratio": round(ratio, 3) if ratio is not None else None,
        "throughput_met": ratio is not None and ratio >= TARGET_THROUGHPUT_RATIO,
        "half_rate": half,
        "p99_at_half_rate_ms": p99s.get(half),
        # Judged on the median p99 measured there; a rung the climb stepped
        # over counts as met when a higher rate passed.
        "half_rate_met": half is not None
        and (p99s[half] <= TARGET_HALF_RATE_P99_MS if half in p99s else summary["max_rate"] >= half),
        "memory_met": summary["rss_kib_per_socket"] is not None
        and summary["rss_kib_per_socket"] <= TARGET_KIB_PER_SOCKET,
        "broadcast_met": (
            summary["broadcast_sockets"] >= TARGET_BROADCAST_SOCKETS
            and summary["broadcast_lost"] == 0
            and summary["broadcast_ms"] is not None
            and summary["broadcast_ms"] <= TARGET_BROADCAST_MS
        ),
    }


def peer_targets(results: dict[str, dict], summaries: dict[str, dict]) -> dict | None:
    """The default against python-socketio, picows and itself without room history, round by round."""
    if DEFAULT not in results:
        return None
    default = results[DEFAULT]
    found: dict = {}
    if PEER in results:
        rate, cpu = spread(rate_ratios(default, results[PEER])), spread(cpu_ratios(default, results[PEER]))
        found["peer_rate"] = {**rate, "met": rate["median"] is not None and rate["median"] >= TARGET_PEER_RATE_RATIO}
        found["peer_cpu"] = {**cpu, "met": cpu["median"] is not None and cpu["median"] <= TARGET_PEER_CPU_RATIO}
    if LIMIT in results:
        found["limit_rate"] = spread(rate_ratios(default, results[LIMIT]))
        found["limit_cpu"] = spread(cpu_ratios(default, results[LIMIT]))
    if NO_HISTORY in results:
        ratio = spread(rate_ratios(default, results[NO_HISTORY]))
        found["history"] = {
            **ratio,
            # What history costs: the share of the lossless rate without it that is lost with it.
            "cost_median": None if ratio["median"] is None else round(1 - ratio["median"], 3),
            "met": ratio["median"] is not None and 1 - ratio["median"] <= TARGET_HISTORY_COST,
        }
    return found or None


def build(results: list[dict], meta: dict) -> dict:
    summaries = {result["name"]: summarize(result) for result in results}
    by_name = {result["name"]: result for result in results}
    p99s = {result["name"]: p99_by_rate(result) for result in results}
    baseline = summaries.get(BASELINE)
    for name, summary in summaries.items():
        summary["ratios"] = {
            reference: spread(rate_ratios(by_name[name], by_name[reference]))
            for reference in REFERENCES
            if reference in by_name
        }
        summary["cpu_ratios"] = {
            reference: spread(cpu_ratios(by_name[name], by_name[reference]))
            for reference in REFERENCES
            if reference in by_name
        }
        # The median over rounds of the per-round ratio (not the ratio of the medians).
        summary["ratio_to_raw"] = summary["ratios"][BASELINE]["median"] if BASELINE in summary["ratios"] else None
        if baseline and name != BASELINE:
            summary["targets"] = targets(summary, baseline, meta["plan"]["ladder"], p99s[name])
    return {
        **meta,
        "summaries": summaries,
        "peer_targets": peer_targets(by_name, summaries),
        "p99_by_rate": p99s,
        "results": results,
    }


def _fmt(value, suffix="") -> str:
    return "–" if value is None else f"{value:g}{suffix}"


def _spread(found: dict | None, suffix: str = "") -> str:
    """``median (min–max)`` of a spread."""
    if not found or found["median"] is None:
        return "–"
    if found["min"] == found["max"]:
        return f"{found['median']:g}{suffix}"
    return f"{found['median']:g}{suffix} ({found['min']:g}–{found['max']:g})"


def table(report: dict) -> str:
    plan = report["plan"]
    lines = [
        f"| configuration | max lossless rate (msg/s) | deliveries/s | × raw, median (min–max) of rounds "
        "| p50 / p95 / p99 (ms) "
        f"| CPU per replica (cores) | replica CPU per delivery | generator CPU "
        f"| above it: {plan['overload_factor']:g} × the rate for {plan['overload_seconds']:g} s "
        f"| RSS per idle socket | broadcast to {plan['broadcast_sockets']:,} sockets |",
        "|---|---:|---:|---:|---|---|---:|---:|---|---:|---|",
    ]
    for summary in report["summaries"].values():
        over = summary["overload"]
        lost = (
            (
                f"{over['lost']} of {over['owed']} lost ({_fmt(over['lost_pct'])} %), {over['late']} late, "
                f"p99 {_fmt(over['p99_ms'])} ms at {_fmt(over['offered_rate'])} msg/s"
            )
            if over
            else "–"
        )
        bound = " (generator-bound: a lower bound)" if summary["generator_bound"] else ""
        bound += " (a run hit its time bound: a lower bound)" if summary["time_capped"] else ""
        broadcast = f"{_fmt(summary['broadcast_ms'])} ms" + (
            f", {summary['broadcast_lost']} lost" if summary["broadcast_lost"] else ""
        )
        if summary["failures"]:
            bound += f" (**{len(summary['failures'])} phase(s) failed**: see below)"
        lines.append(
            f"| {summary['name']} | {_fmt(summary['max_rate'])}{bound} | {_fmt(summary['deliveries_per_s'])} "
            f"| {_spread(summary['ratios'].get(BASELINE))} | {_fmt(summary['p50_ms'])} / {_fmt(summary['p95_ms'])} / "
            f"{_fmt(summary['p99_ms'])} "
            f"| {' / '.join(_fmt(cpu) for cpu in summary['cpu_per_replica'])} "
            f"| {_fmt(summary['replica_cpu_us_per_delivery'])} µs | {_fmt(summary['generator_cpu'])} "
            f"| {lost} | {_fmt(summary['rss_kib_per_socket'])} KiB | {broadcast} |"
        )
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    lines = [
        f"| configuration | throughput ≥ {TARGET_THROUGHPUT_RATIO} × raw | p99 ≤ {TARGET_HALF_RATE_P99_MS:g} ms "
        "at half the raw rate "
        f"| ≤ {TARGET_KIB_PER_SOCKET:g} KiB per idle socket | {TARGET_BROADCAST_SOCKETS:,}-socket broadcast ≤ "
        f"{TARGET_BROADCAST_MS / 1000:g} s |",
        "|---|---|---|---|---|",
    ]
    mark = {True: "met", False: "**not met**"}
    for summary in report["summaries"].values():
        target = summary.get("targets")
        if not target:
            continue
        lines.append(
            f"| {summary['name']} | {mark[target['throughput_met']]} ({_fmt(target['throughput_ratio'])}) "
            f"| {mark[target['half_rate_met']]} ({half_rate(summary, target)}) "
            f"| {mark[target['memory_met']]} ({_fmt(summary['rss_kib_per_socket'])} KiB) "
            f"| {mark[target['broadcast_met']]} ({_fmt(summary['broadcast_ms'])} ms to "
            f"{summary['broadcast_sockets']:,}) |"
        )
    return "\n".join(lines)


def rounds_table(report: dict) -> str:
    """Each configuration's lossless rate in every round, and its ratios to the references per round."""
    names = [name for name in REFERENCES if name in report["summaries"]]
    rounds = max((summary["runs"] for summary in report["summaries"].values()), default=0)
    lines = [
        "| configuration | lossless rate by round (msg/s) | "
        + " | ".join(f"× {name} by round → median (min–max)" for name in names)
        + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for summary in report["summaries"].values():
        cells = []
        for name in names:
            found = summary["ratios"].get(name)
            per_round = " / ".join(_fmt(value) for value in found["per_round"]) if found else "–"
            cells.append(f"{per_round} → {_spread(found)}")
        lines.append(
            f"| {summary['name']} | {' / '.join(_fmt(rate) for rate in summary['max_rate_by_round'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) if rounds else ""


def failures_text(report: dict) -> str:
    """The phases that could not be measured, by configuration, with why (the stacks' log has more)."""
    lines = [
        f"- {name}: {failure}"
        for name, summary in report["summaries"].items()
        for failure in summary.get("failures", [])
    ]
    return "Phases that failed (their figures are missing or 0 above):\n\n" + "\n".join(lines) if lines else ""


def peer_targets_table(report: dict) -> str:
    found = report.get("peer_targets")
    if not found:
        return ""
    mark = {True: "met", False: "**not met**"}
    lines = [
        f"| the default ({DEFAULT}) against | target | per round → median (min–max) | verdict |",
        "|---|---|---|---|",
    ]

    def row(label: str, target: str, key: str, verdict: str) -> None:
        if key in found:
            per_round = " / ".join(_fmt(value) for value in found[key]["per_round"])
            lines.append(f"| {label} | {target} | {per_round} → {_spread(found[key])} | {verdict} |")

    if "peer_rate" in found:
        row(
            f"{PEER}: lossless rate",
            f"≥ {TARGET_PEER_RATE_RATIO:g} ×",
            "peer_rate",
            mark[found["peer_rate"]["met"]],
        )
        row(
            f"{PEER}: replica CPU per delivery",
            f"≤ {TARGET_PEER_CPU_RATIO:.2f} ×",
            "peer_cpu",
            mark[found["peer_cpu"]["met"]],
        )
    row(f"{LIMIT}: lossless rate", "reported as it is", "limit_rate", "–")
    row(f"{LIMIT}: replica CPU per delivery", "reported as it is", "limit_cpu", "–")
    if "history" in found:
        row(
            f"{NO_HISTORY}: lossless rate (room history's cost)",
            f"≥ {1 - TARGET_HISTORY_COST:g} × (costs ≤ {TARGET_HISTORY_COST:.0%})",
            "history",
            f"{mark[found['history']['met']]} (costs {_fmt(found['history']['cost_median'] * 100)} %)"
            if found["history"]["cost_median"] is not None
            else "–",
        )
    return "\n".join(lines)


def half_rate(summary: dict, target: dict) -> str:
    if target["half_rate"] is None:
        return "no ladder rung at half the raw rate"
    if target["p99_at_half_rate_ms"] is None:
        if target["half_rate_met"]:
            return f"{_fmt(target['half_rate'])} msg/s not stepped; passed at higher rates"
        return f"{_fmt(target['half_rate'])} msg/s is above its lossless limit, not reached"
    return f"at {_fmt(target['half_rate'])} msg/s p99 {_fmt(target['p99_at_half_rate_ms'])} ms"


def markdown(report: dict, plot_name: str) -> str:
    machine, plan = report["machine"], report["plan"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    return "\n".join(
        [
            f"# Capacity benchmark ({report['mode']})",
            "",
            f"Machine: {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['cpu_model']}, Linux "
            f"{machine['kernel']}; "
            f"load average {report['load_average_start']} at the start, {report['load_average_end']} at the end; "
            f"open-file limit {report['open_file_limit']}.",
            f"Versions: Python {machine['python']}, {packages}, {machine['redis_server']}, {machine['nginx']}.",
            f"Method: 3 replicas behind nginx, one asyncio load generator on the same machine; {plan['rooms']} "
            "rooms of "
            f"{plan['room_size']} sockets, each message owed to its {plan['room_size']} members; rates stepped on a "
            f"×{plan['rung_factor']:g} ladder, {plan['step_seconds']:g} s per step; a step passes with every "
            "delivery made "
            f"and p99 ≤ {plan['max_p99_ms']:g} ms. Interleaved: {plan['runs']} rounds, each running every "
            "configuration's rate stepping in turn (A B C … A B C …) on stacks that stay up; a ratio is taken "
            "within each round and shown as its median (min–max) over the rounds, the other figures are medians "
            "of the rounds. Overload, memory and broadcast after the rounds, one configuration at a time; memory over "
            f"{plan['memory_batches']} batches "
            f"× 3 replicas; broadcast medians of {plan['broadcasts']}. Total {report['seconds']:.0f} s.",
            "",
            table(report),
            "",
            rounds_table(report),
            "",
            targets_table(report),
            "",
            peer_targets_table(report),
            "",
            failures_text(report),
            "",
            *scale_section(report),
            f"![p99 fan-out latency against offered rate]({plot_name})",
            "",
        ]
    )


def scale_section(report: dict) -> list[str]:
    """The expensive moments (loadtest/bench/scale.py), when they ran."""
    if not report.get("scale"):
        return []
    plan = report["scale"]["plan"]
    return [
        f"Reconnect storm: {plan['storm_sockets']} sockets through nginx over 3 replicas, the busiest killed with "
        f"SIGKILL, its members back at once (each after up to {scale.STORM_JITTER_SECONDS:g} s of jitter). Idle: "
        f"{plan['idle_sockets']} sockets straight to the replicas, a third on each, then one message to them all.",
        "",
        scale.table(report["scale"]["results"]),
        "",
    ]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (axes, ratios) = pyplot.subplots(1, 2, figsize=(13, 5.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    for name, p99s in report["p99_by_rate"].items():
        if p99s:
            axes.plot(list(p99s), list(p99s.values()), marker="o", markersize=3, label=name)
    axes.axhline(report["plan"]["max_p99_ms"], color="grey", linestyle="--", linewidth=1, label="p99 limit")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(f"offered publish rate (messages/s; each delivered to {report['plan']['room_size']} sockets)")
    axes.set_ylabel("p99 fan-out latency (ms), median of rounds")
    machine = report["machine"]
    axes.set_title(
        f"Chat fan-out, 3 replicas behind nginx — {machine['cores']} cores, {machine['cpu_model']}", fontsize=9
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    # The spread: every round's ratio to the baseline as a dot, the median as a bar.
    names = [name for name, summary in report["summaries"].items() if BASELINE in summary["ratios"]]
    for position, name in enumerate(names):
        found = report["summaries"][name]["ratios"][BASELINE]
        values = [value for value in found["per_round"] if value is not None]
        ratios.scatter([position] * len(values), values, s=14, alpha=0.7)
        if found["median"] is not None:
            ratios.hlines(found["median"], position - 0.3, position + 0.3, color="black", linewidth=1.5)
    ratios.axhline(TARGET_THROUGHPUT_RATIO, color="grey", linestyle="--", linewidth=1)
    ratios.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ratios.set_ylabel(f"lossless rate × {BASELINE}, per round (dots) and median (bar)")
    ratios.set_title(f"{report['plan']['runs']} interleaved rounds", fontsize=9)
    ratios.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def write(report: dict, out: Path, plot=plot, markdown=markdown) -> dict[str, Path]:
    """out.json, out.png and out.md (which shows the plot); the chaos report's too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {kind: out.with_suffix(suffix) for kind, suffix in (("json", ".json"), ("md", ".md"), ("png", ".png"))}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    plot(report, paths["png"])
    paths["md"].write_text(markdown(report, paths["png"].name))
    return paths
