"""The load test's bookkeeping and verdict rules, without locust or sockets.

These modules import neither locust nor gevent, so they run in plain pytest;
the end-to-end proof against real replicas is in test_locust_fanout.py.
"""
from __future__ import annotations

import pytest

from loadtest.delivery import DeliveryTracker, NotDelivered
from loadtest.summary import render
from loadtest.thresholds import FANOUT, HTTP_FANOUT, Row, Thresholds, judge, percentile

RULES = Thresholds(min_delivery_ratio=0.999, max_p99_ms=1000, min_replicas=3, min_cross_pairs=None, max_cpu_percent=90)
REPLICAS = ["daphne-1", "daphne-2", "daphne-3"]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def book():
    events = []
    clock = Clock()
    tracker = DeliveryTracker(lambda **event: events.append(event), deadline=5, clock=clock)
    return tracker, events, clock


def frame(message_id, origin, served_by):
    return {"type": "chat.message", "message": "m", "id": message_id, "origin": origin, "served_by": served_by}


def test_each_member_counts_once_and_a_late_member_fails_under_its_own_pair(book):
    tracker, events, clock = book
    tracker.join("room", "a", "daphne-1")
    tracker.join("room", "b", "daphne-2")
    message_id, _ = tracker.publish("room", FANOUT, origin="daphne-1")
    clock.now += 0.25
    tracker.received("a", frame(message_id, "daphne-1", "daphne-1"))
    tracker.received("a", frame(message_id, "daphne-1", "daphne-1"))  # a duplicate is not a second delivery
    clock.now += 5
    tracker.sweep()
    tracker.received("b", frame(message_id, "daphne-1", "daphne-2"))  # after its failure: not a success too

    assert [(e["name"], round(e["response_time"]), type(e["exception"])) for e in events] == [
        ("daphne-1->daphne-1", 250, type(None)),
        ("daphne-1->daphne-2", 5250, NotDelivered),
    ]
    assert tracker.pending == {}


def test_members_stopped_on_purpose_are_not_failed_but_counted_as_unsettled(book):
    tracker, events, clock = book
    tracker.join("room", "a", "daphne-1")
    tracker.join("room", "b", "daphne-2")
    tracker.publish("room", FANOUT, origin="daphne-1")
    tracker.leave("room", "a")
    tracker.settle_at_stop()
    clock.now += 10
    tracker.sweep()

    assert events == []
    assert tracker.unsettled_at_stop == 2


def test_a_member_that_joined_after_the_publish_is_owed_nothing(book):
    tracker, events, clock = book
    tracker.join("room", "a", "daphne-1")
    tracker.publish("room", HTTP_FANOUT)
    tracker.join("room", "late", "daphne-3")
    clock.now += 6
    tracker.sweep()

    assert [event["name"] for event in events] == ["unknown->daphne-1"]


def deliveries(pairs, failures=None, ms=20, request_type=FANOUT):
    failures = failures or {}
    return [Row(request_type, pair, 100, failures.get(pair, 0), {ms: 100}) for pair in pairs]


EVERY_PAIR = [f"{a}->{b}" for a in REPLICAS for b in REPLICAS]


def test_a_healthy_run_passes_and_its_summary_lists_every_pair():
    verdict = judge(deliveries(EVERY_PAIR), RULES, expects_fanout=True, cpu_peaks={"local": 30}, cpu_warned=False)

    assert verdict.status == "PASS" and verdict.exit_code == 0
    assert len(verdict.cross_pairs) == 6
    text = render(verdict)
    assert text.startswith("load test verdict: PASS")
    assert all(pair in text for pair in EVERY_PAIR)


def test_a_missing_cross_replica_pair_fails_when_every_pair_is_wanted():
    rows = deliveries([pair for pair in EVERY_PAIR if pair != "daphne-3->daphne-1"])
    verdict = judge(rows, RULES, expects_fanout=True, cpu_peaks={}, cpu_warned=False)

    assert verdict.status == "FAIL" and verdict.exit_code == 1
    assert [check.name for check in verdict.checks if not check.ok] == ["cross-replica pairs"]


def test_a_pair_that_only_lost_messages_is_not_seen():
    rows = deliveries(EVERY_PAIR, failures={"daphne-1->daphne-2": 100})
    verdict = judge(rows, RULES, expects_fanout=True, cpu_peaks={}, cpu_warned=False)

    assert "daphne-1->daphne-2" not in verdict.cross_pairs
    assert {check.name for check in verdict.checks if not check.ok} == {"delivery ratio", "cross-replica pairs"}


def test_http_publishers_are_not_replicas_of_a_cross_replica_pair():
    rows = deliveries([f"gunicorn->{replica}" for replica in REPLICAS], request_type=HTTP_FANOUT)
    verdict = judge(rows, RULES, expects_fanout=True, cpu_peaks={}, cpu_warned=False)

    assert verdict.status == "PASS"
    assert verdict.replicas == REPLICAS and verdict.cross_pairs == []


@pytest.mark.parametrize("peaks, warned", [({"worker-1": 97.0}, False), ({"local": 40.0}, True)])
def test_a_starved_load_generator_makes_the_run_invalid_not_passed(peaks, warned):
    verdict = judge(deliveries(EVERY_PAIR), RULES, expects_fanout=True, cpu_peaks=peaks, cpu_warned=warned)

    assert verdict.status == "INVALID" and verdict.exit_code == 3


def test_a_fanout_run_without_deliveries_fails_and_other_failures_fail_any_run():
    assert judge([], RULES, expects_fanout=True, cpu_peaks={}, cpu_warned=False).status == "FAIL"
    echo = [Row("echo", "/ws/echo/", 10, 1, {5: 10})]
    verdict = judge(echo, RULES, expects_fanout=False, cpu_peaks={}, cpu_warned=False)
    assert [check.name for check in verdict.checks if not check.ok] == ["other request failures"]


def test_percentile_is_the_smallest_time_covering_the_share():
    assert percentile({10: 98, 500: 2}, 0.99) == 500
    assert percentile({10: 99, 500: 1}, 0.99) == 10
    assert percentile({}, 0.5) is None
