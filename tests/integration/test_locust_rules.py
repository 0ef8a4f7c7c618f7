"""The load test's bookkeeping and verdict rules, without locust or sockets.

These modules import neither locust nor gevent, so they run in plain pytest;
the end-to-end proof against real replicas is in test_locust_fanout.py (and,
for the fan-out check's tally, test_local_stack.py).
"""

from __future__ import annotations

import pytest

from loadtest.delivery import DeliveryTracker, NotDelivered
from loadtest.fanout_check import FanoutReport, Message, tally
from loadtest.room_member import Chat, Close, Position, Reconnect, RoomMember, Welcome
from loadtest.summary import render
from loadtest.thresholds import (
    DUPLICATE,
    FANOUT,
    HTTP_FANOUT,
    NOT_RECOVERED,
    RECONNECT,
    RECOVERED,
    RESUME,
    Row,
    Thresholds,
    judge,
    percentile,
    reconnect_name,
)

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


def test_reconnects_and_resumes_are_counted_and_a_duplicate_fails_the_run():
    rows = deliveries(EVERY_PAIR) + [
        Row(RECONNECT, reconnect_name(1001), 5, 0, {120: 5}),
        Row(RECONNECT, reconnect_name(1006), 1, 0, {900: 1}),
        Row(RESUME, RECOVERED, 5, 0, {0: 5}),
        Row(RESUME, NOT_RECOVERED, 1, 0, {0: 1}),
    ]
    verdict = judge(rows, RULES, expects_fanout=True, cpu_peaks={}, cpu_warned=False)

    # Coming back is not a failure; a resume that was not recovered is said, and its losses count as lost.
    assert verdict.status == "PASS"
    assert (verdict.reconnects, verdict.reconnect_codes) == (6, {"1001": 5, "1006": 1})
    assert (verdict.resumes_recovered, verdict.resumes_not_recovered, verdict.duplicates) == (5, 1, 0)
    text = render(verdict)
    assert "note: reconnects: 6 (after close code 1001: 5, 1006: 1); resumes: 5 recovered, 1 not recovered;" in text
    assert "1 resumes were not recovered" in text

    rows.append(Row(DUPLICATE, "daphne-1->daphne-2", 2, 2, {0: 2}))
    verdict = judge(rows, RULES, expects_fanout=True, cpu_peaks={}, cpu_warned=False)
    assert verdict.status == "FAIL" and verdict.duplicates == 2
    # Judged once, by its own check, not again as an "other" failure.
    assert [check.name for check in verdict.checks if not check.ok] == ["duplicate deliveries"]


def chat(number, pod, connection, replayed=False):
    return Chat(
        2.0,
        connection,
        pod,
        replayed,
        {
            "type": "chat.message",
            "message": f"text {number}",
            "id": f"m{number}",
            "sent_at": 1000.0,
            "origin": "daphne-1",
            "served_by": pod,
            "epoch": "e1",
            "offset": number,
        },
    )


def test_the_fanout_tally_counts_each_message_once_per_member_and_names_what_a_member_was_told_it_missed():
    messages = [Message(f"m{number}", "room", f"text {number}", "daphne-1", 1000.0) for number in (1, 2, 3)]
    steady = RoomMember("http://127.0.0.1:1", "room")
    steady.welcomes = [Welcome(1.0, 0, "daphne-1", "e1", 0, None, 0, None)]
    steady.chats = [chat(number, "daphne-1", 0) for number in (1, 2, 3)]
    # Lost its socket on daphne-2 after offset 1; resumed on daphne-1, whose
    # history no longer held offset 2: recovered false, offset 3 replayed.
    moved = RoomMember("http://127.0.0.1:1", "room")
    moved.welcomes = [
        Welcome(1.0, 0, "daphne-2", "e1", 0, None, 0, None),
        Welcome(3.0, 1, "daphne-1", "e1", 3, False, 1, Position("e1", 1)),
    ]
    moved.chats = [chat(1, "daphne-2", 0), chat(3, "daphne-1", 1, replayed=True)]
    moved.reconnects = [Reconnect(Close(2.5, 0, "daphne-2", 1006, ""), moved.welcomes[1], 2)]
    report = FanoutReport("http://127.0.0.1:1", 1, 2, 2)
    tally(report, [steady, moved], {"room": messages})

    assert report.problems == [
        "member of room on daphne-2 then daphne-1 was told missing daphne-1's message: resumed on daphne-1"
        " with recovered false (history did not cover the gap)"
    ]
    assert (report.told_missing, report.unrecovered_resumes, len(report.reconnects)) == (1, 1, 1)
    text = report.render()
    assert "verdict: FAIL - 1 problem(s) (1 of them messages members were told they may have missed" in text
    assert "reconnects: 1 (close codes: 1006 x1); resumed 0 recovered (1 messages replayed), 1 not recovered" in text

    # The same message twice is a failure, however it came (live, then replayed).
    steady.chats.append(chat(2, "daphne-1", 0, replayed=True))
    report = FanoutReport("http://127.0.0.1:1", 1, 2, 2)
    tally(report, [steady], {"room": messages})
    assert report.problems == ["member of room on daphne-1 got daphne-1's message 2 times"]
    assert report.matrix == {("daphne-1", "daphne-1"): 4}
