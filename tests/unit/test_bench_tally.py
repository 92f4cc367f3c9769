"""The bench's accounting: tallies, plan checks and a worker's bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest
from chatd_bench.plan import Plan, make_content, pairs, parse_content, split
from chatd_bench.run import ticks_settled
from chatd_bench.tally import Tally
from chatd_bench.worker import Frame, Worker


def test_clean_tally_has_no_problems() -> None:
    t = Tally(sent=10, acked=10, expected=30, delivered=30)
    assert t.problems(acks_expected=True) == []
    assert t.lost == 0 and t.unacked == 0


def test_every_kind_of_fault_is_named() -> None:
    t = Tally(sent=10, acked=8, expected=30, delivered=27, dups=1, misroutes=2,
              errors=1, connect_failures=3, disconnects=1, unknown_acks=1)
    text = " ".join(t.problems(acks_expected=True))
    for word in ("LOST 3", "DUPLICATED", "MISROUTED 2", "UNACKED 2", "error frames",
                 "connections failed", "dropped", "acks for messages not sent"):
        assert word in text
    # peers do not ack: missing acks are not a fault there
    assert not any("UNACKED" in p for p in t.problems(acks_expected=False))


def test_extra_deliveries_are_a_fault() -> None:
    assert "EXTRA" in Tally(expected=3, delivered=4).problems(False)[0]


def test_merge_adds_every_field_and_round_trips() -> None:
    a = Tally(sent=1, delivered=2, synced=1)
    b = Tally.from_dict(Tally(sent=3, misroutes=1).to_dict())
    a.merge(b)
    assert (a.sent, a.delivered, a.misroutes, a.synced) == (4, 2, 1, 1)


def test_content_round_trip_and_garbage() -> None:
    key = parse_content(make_content(3, 17, 123456789, 8))
    assert key is not None and tuple(key) == (3, 17, 123456789, 8)
    assert parse_content("hello") is None
    assert parse_content("a:b:c:d") is None


def _plan() -> Plan:
    # 6 users with server ids 101..106, 2 groups (ids 900, 901) over users 0..3
    return Plan(uids=[101, 102, 103, 104, 105, 106], gids=[900, 901], group_limit=4)


def test_plan_membership() -> None:
    p = _plan()
    assert [p.group_of(i) for i in range(6)] == [0, 1, 0, 1, -1, -1]
    assert list(p.members(0)) == [0, 2] and p.group_size(1) == 2


def test_plan_check_private_and_group() -> None:
    p = _plan()
    k = parse_content(make_content(0, 1, 0, 1))
    assert p.check(1, 10, 102, 101, k)
    assert not p.check(2, 10, 102, 101, k)          # not the target
    assert not p.check(1, 10, 103, 101, k)          # wrong dstid
    assert not p.check(1, 10, 102, 105, k)          # wrong sender id
    assert p.check(1, 10, 102, 0, k)                # a peer that dropped userid
    g = parse_content(make_content(0, 2, 0, 0))
    assert p.check(2, 11, 900, 101, g)
    assert not p.check(1, 11, 900, 101, g)          # user 1 is in group 1
    assert not p.check(2, 11, 901, 101, g)
    assert not p.check(2, 11, 900, 101, None)


def test_pairs_and_split() -> None:
    assert pairs(5) == [(0, 1), (2, 3)]
    assert split(list(range(5)), 2) == [[0, 2, 4], [1, 3]]


class _Pipe:
    def send(self, obj: Any) -> None:
        pass


class _Tr:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, kind: Any, data: bytes) -> None:
        self.sent.append(data)


class _Conn:
    def __init__(self, i: int) -> None:
        self.i = i
        self.tr = _Tr()
        self.last_seq: dict[int, int] = {}
        self.last_id = 0
        self.syncing = False
        self.leaving = False


def _worker(scenario: str = "private", closed: bool = False) -> Worker:
    spec = {"scenario": scenario, "peer": False, "plan": _plan(), "mine": [0, 1, 2, 3],
            "url": "ws://x/chat", "tokens": None, "closed": closed, "window": 1,
            "pairs": [(0, 1), (2, 3)], "track_last": scenario == "group", "wid": 0,
            "nonce": "n", "offline_s": 0.0}
    w = Worker(spec, _Pipe())
    for i in range(4):
        w.conns[i] = _Conn(i)  # type: ignore[assignment]
    return w


def _copy(w: Worker, sender: int, seq: int, cmd: int, target: int) -> Frame:
    dstid = w.plan.uids[target] if cmd == 10 else w.plan.gids[target]
    return Frame(id=seq, userid=w.plan.uids[sender], cmd=cmd, dstid=dstid, media=1,
                 content=make_content(sender, seq, 0, target))


def test_worker_counts_sent_acked_expected_delivered() -> None:
    w = _worker()
    w.send(0, 10, 1, 0)
    w.send(0, 11, 0, 0)  # group 0 = users 0 and 2: one copy expected
    assert (w.tally.sent, w.tally.expected) == (2, 2)
    for cid in list(w.pending_acks):
        w.on_frame(w.conns[0], Frame(cmd=1, id=1, cid=cid))  # type: ignore[arg-type]
    w.on_frame(w.conns[0], Frame(cmd=1, id=1, cid="never-sent"))  # type: ignore[arg-type]
    w.on_frame(w.conns[1], _copy(w, 0, 1, 10, 1))  # type: ignore[arg-type]
    w.on_frame(w.conns[2], _copy(w, 0, 2, 11, 0))  # type: ignore[arg-type]
    t = w.tally
    assert (t.acked, t.unknown_acks, t.delivered, t.dups, t.misroutes) == (2, 1, 2, 0, 0)
    assert w.lat.total == 2 and w.ack_lat.total == 2


def test_worker_flags_duplicates_misroutes_and_own_copies() -> None:
    w = _worker()
    w.on_frame(w.conns[1], _copy(w, 0, 1, 10, 1))  # type: ignore[arg-type]
    w.on_frame(w.conns[1], _copy(w, 0, 1, 10, 1))  # type: ignore[arg-type]  # again
    w.on_frame(w.conns[3], _copy(w, 0, 2, 10, 1))  # type: ignore[arg-type]  # not for 3
    w.on_frame(w.conns[0], _copy(w, 0, 3, 10, 1))  # type: ignore[arg-type]  # own copy
    bad = Frame(cmd=10, dstid=104, content="not a bench message")
    w.on_frame(w.conns[3], bad)  # type: ignore[arg-type]
    t = w.tally
    assert (t.delivered, t.dups, t.misroutes, t.own) == (1, 1, 2, 1)
    assert w.errors


def test_worker_counts_synced_copies_without_latency() -> None:
    w = _worker()
    w.conns[1].syncing = True  # type: ignore[attr-defined]
    w.on_frame(w.conns[1], _copy(w, 0, 1, 10, 1))  # type: ignore[arg-type]
    w.on_frame(w.conns[1], Frame(cmd=4, id=50))  # type: ignore[arg-type]
    assert w.tally.synced == 1 and w.lat.total == 0
    assert not w.conns[1].syncing and w.conns[1].last_id == 50  # type: ignore[attr-defined]


def test_closed_loop_sends_the_next_message_on_delivery() -> None:
    w = _worker(closed=True)
    w.running = True
    w.on_frame(w.conns[1], _copy(w, 0, 1, 10, 1))  # type: ignore[arg-type]
    assert w.tally.sent == 1 and len(w.conns[0].tr.sent) == 1  # type: ignore[attr-defined]


def test_group_last_member_latency_and_replenish() -> None:
    w = _worker("group", closed=True)
    w.running = True
    w.send(0, 11, 0, 0)
    assert w.remaining == {(0, 1): 1}
    w.on_frame(w.conns[2], _copy(w, 0, 1, 11, 0))  # type: ignore[arg-type]
    assert w.remaining == {(0, 2): 1} and w.last_lat.total == 1


@pytest.mark.parametrize(("delivered", "offline", "pending", "peer", "done"), [
    (5, 0, 0, False, True), (4, 0, 0, False, False), (5, 1, 0, False, False),
    (5, 0, 2, False, False), (5, 0, 2, True, True)])
def test_drain_settles_only_when_everything_is_in(delivered: int, offline: int, pending: int,
                                                  peer: bool, done: bool) -> None:
    ticks = {0: {"tally": Tally(expected=5, delivered=delivered).to_dict(), "offline": offline,
                 "pending_acks": pending}}
    assert ticks_settled(ticks, peer) is done
