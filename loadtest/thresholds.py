"""The pass/fail rules of a fan-out load test, as pure functions over stats rows.

The locustfile turns locust's (possibly distributed, aggregated) stats into
``Row`` values and asks ``judge`` for a verdict. Nothing here imports locust
or gevent, so the rules are testable in plain pytest.

Fan-out deliveries are stats rows whose request type is ``fanout`` (published
over a WebSocket) or ``http-fanout`` (published through the HTTP API) and
whose name is ``<origin>-><served_by>``: the replica that published and the
replica that delivered. The stats table therefore *is* the replica matrix, and
a master that only sees aggregated rows can still count replicas and pairs.

Room members that lose their socket reconnect and resume; they report that as
rows too, so distributed runs add them up like any other stats:

* ``reconnect  after <close code>``: one per socket lost and got back, its
  response time how long the member was away;
* ``resume  recovered`` / ``resume  not recovered``: the welcome's answer to
  the position the member resumed from (response length: messages replayed);
* ``duplicate  <origin>-><served_by>``: a member received an offset of an
  epoch it already had: always a failure, judged by its own check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FANOUT = "fanout"
HTTP_FANOUT = "http-fanout"
DELIVERY_TYPES = (FANOUT, HTTP_FANOUT)
PAIR_SEPARATOR = "->"
RECONNECT = "reconnect"
RESUME = "resume"
DUPLICATE = "duplicate"
RECOVERED, NOT_RECOVERED = "recovered", "not recovered"
# Rows that count what happened to sockets, judged by their own checks, not as "other" requests.
SOCKET_TYPES = (RECONNECT, RESUME, DUPLICATE)

PASS, FAIL, INVALID = "PASS", "FAIL", "INVALID"
EXIT_CODES = {PASS: 0, FAIL: 1, INVALID: 3}


def pair_name(origin: str, served_by: str) -> str:
    return f"{origin}{PAIR_SEPARATOR}{served_by}"


def reconnect_name(code: int | None) -> str:
    """The row of reconnects after a socket closed with ``code``."""
    return f"after {code}"


@dataclass(frozen=True)
class Row:
    """One locust stats entry: ``response_times`` maps rounded ms to a count."""

    request_type: str
    name: str
    count: int
    failures: int
    response_times: dict[int, int]


@dataclass(frozen=True)
class Thresholds:
    min_delivery_ratio: float
    max_p99_ms: float
    min_replicas: int
    # None: every ordered pair of the replicas seen (n * (n - 1)).
    min_cross_pairs: int | None
    max_cpu_percent: float


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    observed: str
    limit: str


@dataclass(frozen=True)
class PairRow:
    request_type: str
    pair: str
    count: int
    failures: int
    p50_ms: int | None
    p95_ms: int | None
    p99_ms: int | None


@dataclass
class Verdict:
    status: str
    checks: list[Check]
    pairs: list[PairRow]
    replicas: list[str]
    cross_pairs: list[str]
    deliveries: int
    lost: int
    delivery_ratio: float | None
    p99_ms: int | None
    cpu_peaks: dict[str, float]
    unsettled_at_stop: int
    notes: list[str] = field(default_factory=list)
    # Sockets lost and got back, by the close code that ended them ("1001": 6).
    reconnects: int = 0
    reconnect_codes: dict[str, int] = field(default_factory=dict)
    resumes_recovered: int = 0
    resumes_not_recovered: int = 0
    # Offsets a member received twice within an epoch.
    duplicates: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def percentile(response_times: dict[int, int], fraction: float) -> int | None:
    """The smallest recorded time that at least ``fraction`` of samples do not exceed."""
    total = sum(response_times.values())
    if total == 0:
        return None
    wanted = max(1, math.ceil(total * fraction))
    seen = 0
    for value in sorted(response_times):
        seen += response_times[value]
        if seen >= wanted:
            return value
    return max(response_times)


def merge(histograms: list[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for histogram in histograms:
        for value, count in histogram.items():
            merged[value] = merged.get(value, 0) + count
    return merged


def split_pair(name: str) -> tuple[str, str] | None:
    origin, separator, served_by = name.partition(PAIR_SEPARATOR)
    return (origin, served_by) if separator and origin and served_by else None


def judge(
    rows: list[Row],
    thresholds: Thresholds,
    *,
    expects_fanout: bool,
    cpu_peaks: dict[str, float],
    cpu_warned: bool,
    unsettled_at_stop: int = 0,
) -> Verdict:
    """PASS when every check holds; INVALID when the load generator itself was
    CPU-starved (its latencies and deadlines measure locust, not the system)."""
    deliveries, others, sockets = [], [], []
    for row in rows:
        if row.request_type in DELIVERY_TYPES and split_pair(row.name):
            deliveries.append(row)
        elif row.request_type in SOCKET_TYPES:
            sockets.append(row)
        else:
            others.append(row)
    reconnect_codes: dict[str, int] = {}
    for row in sockets:
        if row.request_type == RECONNECT:
            code = row.name.removeprefix(reconnect_name(""))
            reconnect_codes[code] = reconnect_codes.get(code, 0) + row.count
    resumes = {
        name: sum(r.count for r in sockets if r.request_type == RESUME and r.name == name)
        for name in (RECOVERED, NOT_RECOVERED)
    }
    # Each duplicate is one failed event in its row.
    duplicates = sum(row.failures for row in sockets if row.request_type == DUPLICATE)
    count = sum(row.count for row in deliveries)
    lost = sum(row.failures for row in deliveries)
    ratio = (count - lost) / count if count else None
    p99 = percentile(merge([row.response_times for row in deliveries]), 0.99)
    # A pair or a replica is seen when a message really went that way; a row
    # holding only lost messages names a path that did not work.
    delivered = [row for row in deliveries if row.count > row.failures]
    replicas = sorted({split_pair(row.name)[1] for row in delivered})
    # Only WebSocket-published messages have a replica as origin; an HTTP
    # publisher's origin is a gunicorn pod, not one end of a replica pair.
    cross = sorted(
        {row.name for row in delivered if row.request_type == FANOUT and len(set(split_pair(row.name))) == 2}
    )

    checks: list[Check] = []
    if expects_fanout:
        checks.append(Check("fan-out deliveries measured", count > 0, str(count), "> 0"))
        checks.append(
            Check(
                "delivery ratio",
                ratio is not None and ratio >= thresholds.min_delivery_ratio,
                "n/a" if ratio is None else f"{ratio:.6f}",
                f">= {thresholds.min_delivery_ratio}",
            )
        )
        checks.append(
            Check(
                "p99 fan-out latency",
                p99 is not None and p99 <= thresholds.max_p99_ms,
                "n/a" if p99 is None else f"{p99} ms",
                f"<= {thresholds.max_p99_ms:g} ms",
            )
        )
        wanted_replicas = thresholds.min_replicas
        checks.append(
            Check("replicas seen", len(replicas) >= wanted_replicas, str(len(replicas)), f">= {wanted_replicas}")
        )
        if any(row.request_type == FANOUT for row in deliveries):
            wanted = thresholds.min_cross_pairs
            if wanted is None:
                wanted = len(replicas) * (len(replicas) - 1)
                limit = f"all ({wanted})"
            else:
                limit = f">= {wanted}"
            checks.append(Check("cross-replica pairs", len(cross) >= wanted, str(len(cross)), limit))
    if expects_fanout or duplicates:
        checks.append(Check("duplicate deliveries", duplicates == 0, str(duplicates), "0"))
    other_failures = sum(row.failures for row in others)
    checks.append(Check("other request failures", other_failures == 0, str(other_failures), "0"))
    peak = max(cpu_peaks.values(), default=0.0)
    cpu_ok = peak <= thresholds.max_cpu_percent and not cpu_warned
    checks.append(
        Check(
            "load generator CPU",
            cpu_ok,
            f"peak {peak:.0f}%" + (" (locust warned)" if cpu_warned else ""),
            f"<= {thresholds.max_cpu_percent:g}%",
        )
    )

    if not cpu_ok:
        status = INVALID
    elif all(check.ok for check in checks):
        status = PASS
    else:
        status = FAIL
    notes = []
    if unsettled_at_stop:
        notes.append(
            f"{unsettled_at_stop} deliveries were still inside their deadline when the test stopped:"
            " neither passed nor failed"
        )
    if expects_fanout or sockets:
        # As a note, so the text summary shows it with the rest; the JSON has the numbers.
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(reconnect_codes.items()))
        notes.append(
            f"reconnects: {sum(reconnect_codes.values())}"
            + (f" (after close code {codes})" if codes else "")
            + f"; resumes: {resumes[RECOVERED]} recovered, {resumes[NOT_RECOVERED]} not recovered;"
            f" duplicates: {duplicates}"
        )
    if resumes[NOT_RECOVERED]:
        notes.append(
            f"{resumes[NOT_RECOVERED]} resumes were not recovered (history did not cover the gap): those members"
            " were told some messages may be missing, and what they missed counts as lost"
        )
    return Verdict(
        status=status,
        checks=checks,
        pairs=[
            PairRow(
                row.request_type,
                row.name,
                row.count,
                row.failures,
                percentile(row.response_times, 0.50),
                percentile(row.response_times, 0.95),
                percentile(row.response_times, 0.99),
            )
            for row in sorted(deliveries, key=lambda row: (row.request_type, row.name))
        ],
        replicas=replicas,
        cross_pairs=cross,
        deliveries=count,
        lost=lost,
        delivery_ratio=ratio,
        p99_ms=p99,
        cpu_peaks=dict(cpu_peaks),
        unsettled_at_stop=unsettled_at_stop,
        notes=notes,
        reconnects=sum(reconnect_codes.values()),
        reconnect_codes=dict(sorted(reconnect_codes.items())),
        resumes_recovered=resumes[RECOVERED],
        resumes_not_recovered=resumes[NOT_RECOVERED],
        duplicates=duplicates,
    )
