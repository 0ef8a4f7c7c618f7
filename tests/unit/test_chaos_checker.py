"""The chaos checker finds what it must: a message lost silently, one the
member was told it missed, a duplicate, one out of order, a stall."""

from __future__ import annotations

from loadtest.chaos.checker import check
from loadtest.chaos.nemesis import Window
from loadtest.chaos.observer import Observer, Sample
from loadtest.chaos.workload import Publish
from loadtest.room_member import Chat, Position, RoomMember, Welcome

T0 = 1_000_000.0
GIB = 2**30


def publish(offset: int, at: float, epoch: str = "e1") -> Publish:
    return Publish(f"m{epoch}{offset}", "room", "http", at, acked_at=at + 0.01, position=Position(epoch, offset))


def member(deliveries: list[tuple[Publish, float]], welcomes: list[Welcome] | None = None) -> RoomMember:
    m = RoomMember("http://127.0.0.1:1", "room")
    m.welcomes = welcomes or [Welcome(T0, 0, "pod-a", "e1", 0, None, 0, None)]
    for p, at in deliveries:
        m.chats.append(
            Chat(at, 0, "pod-a", False, {"id": p.id, "epoch": p.position.epoch, "offset": p.position.offset})
        )
    return m


def verdict(members: list[RoomMember], publishes: list[Publish]):
    windows = [
        Window("baseline", "baseline", T0, T0, next_start=T0 + 10),
        Window("fault", "kill", T0 + 10, T0 + 12, next_start=T0 + 30),
    ]
    observer = Observer(stack=None)
    observer.samples = [Sample(T0 + s, f"pod-{r}", True, True, 100 * 2**20) for s in range(31) for r in range(3)]
    return check(windows, {"room": members}, publishes, observer, GIB)


def test_every_message_once_in_order_holds():
    ps = [publish(1, T0 + 1), publish(2, T0 + 11), publish(3, T0 + 12)]
    result = verdict([member([(p, p.sent_at + 0.05) for p in ps])], ps)
    assert result.ok, result.as_dict()
    assert [w.owed for w in result.windows] == [1, 2]
    assert result.windows[1].healthy_after == 0.0


def test_a_message_lost_silently_fails_its_window():
    ps = [publish(1, T0 + 1), publish(2, T0 + 11), publish(3, T0 + 12)]
    result = verdict([member([(ps[0], T0 + 1.1), (ps[2], T0 + 12.1)])], ps)
    assert not result.ok
    assert (result.windows[0].lost, result.windows[1].lost) == (0, 1)
    assert not result.windows[1].checks["nothing acknowledged lost silently"]


def test_a_gap_the_member_was_told_of_is_not_a_loss():
    ps = [publish(1, T0 + 1), publish(2, T0 + 11), publish(1, T0 + 13, epoch="e2")]
    told = Welcome(T0 + 12, 1, "pod-b", "e2", 0, False, 0, Position("e1", 1))
    result = verdict(
        [member([(ps[0], T0 + 1.1), (ps[2], T0 + 13.1)], [Welcome(T0, 0, "pod-a", "e1", 0, None, 0, None), told])], ps
    )
    assert result.ok, result.as_dict()
    assert (result.windows[1].lost, result.windows[1].told_missed) == (0, 1)


def test_duplicates_reorders_and_long_stalls_fail():
    ps = [publish(1, T0 + 11), publish(2, T0 + 12), publish(3, T0 + 13)]
    result = verdict([member([(ps[1], T0 + 12.1), (ps[0], T0 + 12.2), (ps[1], T0 + 12.3), (ps[2], T0 + 25)])], ps)
    fault = result.windows[1]
    assert (fault.duplicated, fault.reordered) == (1, 1)
    assert fault.longest_stall > fault.stall_bound == 10
    assert not result.ok


def test_a_member_that_gave_up_fails_the_run():
    ps = [publish(1, T0 + 1)]
    quitter = member([(ps[0], T0 + 1.1)])
    quitter.gave_up = "still not back at the deadline"
    result = verdict([quitter], ps)
    assert all(w.ok for w in result.windows) and not result.ok


def test_a_replica_never_ready_again_fails():
    ps = [publish(1, T0 + 11)]
    windows = [
        Window("baseline", "baseline", T0, T0, next_start=T0 + 10),
        Window("fault", "kill", T0 + 10, T0 + 12, next_start=T0 + 30),
    ]
    observer = Observer(stack=None)
    observer.samples = [
        Sample(T0 + s, f"pod-{r}", True, r != 2 or s < 10, 100 * 2**20) for s in range(31) for r in range(3)
    ]
    result = check(windows, {"room": [member([(ps[0], T0 + 11.1)])]}, ps, observer, GIB)
    assert result.windows[1].healthy_after is None and not result.ok
