"""The cluster's chain as one node sees it (``log.chain.Chain``): which
committed units a node may release to its shards, and when.

The examples pin each rule of the chain down on its own. The model-based
test (``ChainMachine``) draws a cluster's history — units that tile the
positions, some committed by this node, the others announced over a bus
that reorders, loses and repeats — and drives the chain the way
``log.cluster.ClusterLog`` does: it pumps after what ClusterLog pumps
after, reads from the store only what ``blocked`` and the poll ask for
(clamped by ``gap_end``, in pages, sometimes failing), and never commits a
unit of its own while a read runs. After every release it compares what
came out with the truth; at the end it delivers what is left, answers the
reads, and checks that everything committed was released.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from chatd.log import chain as chain_module
from chatd.log.chain import MAX_PENDING_UNITS, Chain, Unit
from chatd.store import BROADCAST, EVENT_JOIN, EVENT_LEAVE, SYSTEM_USER, Event
from chatd.wire import CMD_GROUP, CMD_PRIVATE, Message

Row = Message | Event


def pm(id: int, src: int, dst: int) -> Message:
    """A private message from ``src`` to ``dst`` at position ``id``."""
    return Message(id=id, userid=src, cmd=CMD_PRIVATE, dstid=dst, content=f"m{id}")


def gm(id: int, src: int, gid: int) -> Message:
    """A message from ``src`` to group ``gid`` at position ``id``."""
    return Message(id=id, userid=src, cmd=CMD_GROUP, dstid=gid, content=f"g{id}")


def bm(id: int) -> Message:
    """A broadcast (from the system to everyone) at position ``id``."""
    return Message(id=id, userid=SYSTEM_USER, cmd=CMD_PRIVATE, dstid=BROADCAST, content="all")


def make_chain(w: int, users: set[int] | None = None, groups: set[int] | None = None) -> Chain:
    """A chain at ``w`` whose node serves ``users`` and ``groups`` (live sets: a
    test changes them and tells the chain, as the log's presence does)."""
    users = users if users is not None else set()
    groups = groups if groups is not None else set()
    return Chain(w, users.__contains__, groups.__contains__)


def drain(chain: Chain) -> list[Unit]:
    """Everything the chain releases now, as ClusterLog's pump takes it."""
    out = []
    while (unit := chain.next()) is not None:
        out.append(unit)
    return out


def spans(units: list[Unit]) -> list[tuple[int, int | None]]:
    return [(u.prev, u.last) for u in units]


# --- release in position order ------------------------------------------------------


def test_units_are_released_in_position_order_only() -> None:
    chain = make_chain(10)
    chain.header(20, 30)
    assert chain.next() is None, "a unit above a missing one went out"
    assert chain.w == 10
    chain.header(10, 20)
    assert spans(drain(chain)) == [(10, 20), (20, 30)]
    assert chain.w == 30
    assert len(chain) == 0
    assert chain.blocked() is None


def test_a_repeated_header_changes_nothing() -> None:
    chain = make_chain(10)
    chain.header(10, 12, events=[Event(12, EVENT_JOIN, 1, 2)])
    chain.header(10, 15, events=[Event(15, EVENT_LEAVE, 1, 2)])  # a lie: the first one stands
    (unit,) = drain(chain)
    assert (unit.prev, unit.last) == (10, 12)
    assert unit.rows() == [Event(12, EVENT_JOIN, 1, 2)]


def test_a_header_with_no_payload_this_node_needs_releases_at_once() -> None:
    chain = make_chain(10, users={1}, groups={1})
    join = Event(13, EVENT_JOIN, 7, 3)
    chain.header(10, 13, users=[5, 6], groups=[2], events=[join], everyone=[bm(12)])
    (unit,) = drain(chain)
    assert (unit.prev, unit.last) == (10, 13)
    # what the header carries goes out with it; the payloads nobody here wants do not
    assert unit.rows() == [bm(12), join]
    assert not unit.complete


def test_a_header_waits_for_the_payload_of_a_user_this_node_serves() -> None:
    chain = make_chain(10, users={5})
    chain.header(10, 14, users=[5, 6])
    assert chain.next() is None
    assert chain.blocked() == ("payload", 10, 14)
    chain.payload(10, "u", 6, [pm(11, 6, 8)])  # not the one it needs
    assert chain.next() is None
    assert chain.blocked() == ("payload", 10, 14)
    chain.payload(10, "u", 5, [pm(12, 5, 6), pm(14, 9, 5)])
    assert chain.blocked() is None
    (unit,) = drain(chain)
    assert unit.rows() == [pm(11, 6, 8), pm(12, 5, 6), pm(14, 9, 5)]
    assert chain.w == 14


def test_a_header_waits_for_the_payload_of_a_group_this_node_serves() -> None:
    chain = make_chain(10, groups={3})
    chain.header(10, 12, users=[1], groups=[2, 3])
    assert chain.blocked() == ("payload", 10, 12)
    chain.payload(10, "g", 2, [gm(11, 1, 2)])
    assert chain.next() is None
    chain.payload(10, "g", 3, [gm(12, 1, 3)])
    (unit,) = drain(chain)
    assert unit.rows() == [gm(11, 1, 2), gm(12, 1, 3)]


def test_a_unit_blocked_on_a_payload_is_filled_by_a_store_read() -> None:
    chain = make_chain(10, users={5})
    chain.header(10, 14, users=[5])
    assert chain.blocked() == ("payload", 10, 14)
    assert chain.gap_end(14) == 14  # the caller reads just that unit
    rows: list[Row] = [pm(11, 5, 6), Event(13, EVENT_JOIN, 5, 1), pm(14, 2, 5)]
    assert chain.stored(10, 14, rows) == []
    (unit,) = drain(chain)
    assert (unit.prev, unit.last) == (10, 14)
    assert unit.complete
    assert unit.rows() == rows


def test_payloads_that_come_before_their_header_are_kept() -> None:
    chain = make_chain(10, users={5}, groups={2})
    chain.payload(10, "u", 5, [pm(11, 5, 6)])
    chain.payload(10, "g", 2, [gm(12, 1, 2)])
    chain.payload(12, "u", 5, [pm(13, 4, 5)])  # the unit after it, too
    assert chain.next() is None  # no header: nothing says where the unit ends
    assert chain.blocked() is None  # nor that anything is missing
    assert len(chain) == 2
    chain.header(12, 13, users=[5])
    chain.header(10, 12, users=[5, 6], groups=[2])
    out = drain(chain)
    assert spans(out) == [(10, 12), (12, 13)]
    assert [r.id for u in out for r in u.rows()] == [11, 12, 13]


def test_a_payload_repeated_by_the_bus_is_released_once() -> None:
    chain = make_chain(10, users={5})
    chain.payload(10, "u", 5, [pm(11, 5, 6)])
    chain.payload(10, "u", 5, [pm(11, 5, 6)])
    chain.header(10, 11, users=[5, 6])
    chain.payload(10, "u", 5, [pm(11, 5, 6)])
    (unit,) = drain(chain)
    assert unit.rows() == [pm(11, 5, 6)]


# --- gaps ----------------------------------------------------------------------------


def test_a_missing_header_is_a_gap_up_to_the_next_header() -> None:
    chain = make_chain(10)
    chain.header(30, 40)
    chain.header(20, 30)
    assert chain.blocked() == ("gap", 10, 20)
    # payloads of the missing unit do not fill the gap: they say nothing of its end
    chain.payload(10, "u", 5, [pm(12, 5, 6)])
    assert chain.next() is None
    assert chain.blocked() == ("gap", 10, 20)
    assert chain.gap_end(40) == 20
    chain.stored(10, 20, [pm(12, 5, 6), pm(19, 1, 2)])
    assert spans(drain(chain)) == [(10, 20), (20, 30), (30, 40)]
    assert len(chain) == 0


def test_only_payloads_ahead_is_not_a_gap_yet() -> None:
    chain = make_chain(10)
    chain.payload(15, "u", 5, [pm(16, 5, 6)])
    assert chain.blocked() is None  # the poll of the store's head finds such units
    assert chain.gap_end(40) == 40


def test_gap_end_stops_at_the_first_unit_with_known_positions() -> None:
    chain = make_chain(10)
    chain.payload(12, "u", 5, [pm(13, 5, 6)])  # positions unknown: read through it
    assert chain.gap_end(40) == 40
    chain.header(25, 30)
    chain.own(20, 25, "ours", [pm(21, 1, 2)])
    assert chain.gap_end(40) == 20, "a read would cover the node's own unit"
    assert chain.gap_end(18) == 18
    assert chain.gap_end(20) == 20
    assert chain.blocked() == ("gap", 10, 20)


def test_gap_end_ignores_the_unit_at_the_release_point() -> None:
    chain = make_chain(10, users={5})
    chain.header(10, 14, users=[5])
    chain.header(20, 30)
    assert chain.gap_end(40) == 20  # the unit at w is read over, not around


# --- store reads -----------------------------------------------------------------------


def test_a_store_read_replaces_what_was_known_inside_its_range() -> None:
    chain = make_chain(10, users={5})
    chain.header(10, 12, users=[5])
    chain.payload(12, "u", 5, [pm(13, 5, 6)])
    chain.header(14, 16, users=[6])
    chain.own(16, 18, "ours", [pm(17, 1, 2)])
    truth: list[Row] = [pm(11, 5, 1), pm(13, 5, 6), Event(15, EVENT_JOIN, 6, 1)]
    assert chain.stored(10, 16, truth) == []
    assert len(chain) == 2  # the read, and the own unit above it
    first, second = drain(chain)
    assert (first.prev, first.last, first.complete, first.own) == (10, 16, True, None)
    assert first.rows() == truth
    assert (second.prev, second.last, second.own) == (16, 18, "ours")
    assert second.rows() == [pm(17, 1, 2)]


def test_a_store_read_over_own_units_returns_them() -> None:
    chain = make_chain(10)
    chain.own(12, 14, "first", [pm(13, 1, 2)])
    chain.own(14, 15, "second", events=[Event(15, EVENT_JOIN, 1, 2)])
    chain.own(15, 16, "third", [pm(16, 1, 2)])
    replaced = chain.stored(10, 15, [pm(11, 3, 4), pm(13, 1, 2), Event(15, EVENT_JOIN, 1, 2)])
    assert sorted(replaced) == ["first", "second"]
    out = drain(chain)
    assert spans(out) == [(10, 15), (15, 16)]
    assert [u.own for u in out] == [None, "third"]


def test_a_read_that_ends_after_the_release_point_moved_keeps_what_lies_above() -> None:
    chain = make_chain(10)
    chain.header(10, 12)
    drain(chain)
    assert chain.w == 12
    rows: list[Row] = [pm(11, 1, 2), pm(12, 1, 2), pm(13, 1, 2), Event(15, EVENT_LEAVE, 1, 2)]
    assert chain.stored(10, 15, rows) == []
    (unit,) = drain(chain)
    assert (unit.prev, unit.last) == (12, 15)
    assert unit.rows() == rows[2:], "rows at or below the release point went out twice"
    assert chain.w == 15


def test_a_store_read_entirely_below_the_release_point_is_ignored() -> None:
    chain = make_chain(20)
    chain.header(25, 30)
    assert chain.stored(10, 20, [pm(15, 1, 2)]) == []
    assert chain.stored(10, 18, [pm(15, 1, 2)]) == []
    assert len(chain) == 1
    assert chain.next() is None
    assert chain.w == 20


def test_a_page_that_ends_inside_a_unit_moves_the_release_point_there() -> None:
    chain = make_chain(10, users={5})
    chain.header(10, 20, users=[5])
    chain.header(20, 22)
    # a full page of the read of (10, 20] ends at its last row, 15
    chain.stored(10, 15, [pm(11, 5, 1), pm(15, 5, 1)])
    (unit,) = drain(chain)
    assert (unit.prev, unit.last) == (10, 15)
    # the bus repeats the cut unit: it is behind the release point now
    chain.header(10, 20, users=[5])
    chain.payload(10, "u", 5, [pm(11, 5, 1), pm(18, 5, 1)])
    assert chain.next() is None
    assert chain.blocked() == ("gap", 15, 20)
    chain.stored(15, 20, [pm(18, 5, 1)])
    out = drain(chain)
    assert spans(out) == [(15, 20), (20, 22)]
    assert out[0].rows() == [pm(18, 5, 1)]


# --- stale input -------------------------------------------------------------------------


def test_input_below_the_release_point_is_ignored() -> None:
    chain = make_chain(10, users={5})
    chain.header(5, 8)
    chain.header(8, 10)
    chain.header(8, 12, users=[5])  # starts below w: a unit a read cut, or a lie
    chain.payload(8, "u", 5, [pm(9, 5, 1)])
    chain.payload(5, "u", 5, [pm(6, 5, 1)])
    assert len(chain) == 0
    assert chain.own(7, 10, "late") is False  # a read released it: the caller answers it
    assert len(chain) == 0
    assert chain.blocked() is None
    assert chain.w == 10


# --- interest --------------------------------------------------------------------------


def test_interest_added_makes_the_next_unit_need_a_payload() -> None:
    users: set[int] = {6}
    chain = make_chain(10, users=users)
    chain.header(10, 12, users=[5, 6])
    assert chain.next() is None  # waits for 6
    users.add(5)
    chain.interest_added("u", 5)
    chain.payload(10, "u", 6, [pm(11, 6, 1)])
    assert chain.next() is None, "released without the payload of a user it now serves"
    assert chain.blocked() == ("payload", 10, 12)
    chain.payload(10, "u", 5, [pm(12, 5, 1)])
    (unit,) = drain(chain)
    assert unit.rows() == [pm(11, 6, 1), pm(12, 5, 1)]


def test_interest_added_in_a_group_makes_the_next_unit_need_its_payload() -> None:
    users: set[int] = {6}
    groups: set[int] = set()
    chain = make_chain(10, users=users, groups=groups)
    chain.header(10, 12, users=[6], groups=[2])
    assert chain.next() is None
    groups.add(2)
    chain.interest_added("g", 2)
    chain.interest_added("g", 3)  # the unit does not concern it
    chain.payload(10, "u", 6, [pm(11, 6, 1)])
    assert chain.blocked() == ("payload", 10, 12)
    chain.payload(10, "g", 2, [gm(12, 1, 2)])
    assert [r.id for r in drain(chain)[0].rows()] == [11, 12]


def test_interest_in_a_subject_whose_payload_came_needs_nothing_more() -> None:
    users: set[int] = {6}
    chain = make_chain(10, users=users)
    chain.payload(10, "u", 5, [pm(11, 5, 1)])
    chain.header(10, 12, users=[5, 6])
    assert chain.next() is None
    users.add(5)
    chain.interest_added("u", 5)
    chain.payload(10, "u", 6, [pm(12, 6, 1)])
    assert spans(drain(chain)) == [(10, 12)]


def test_interest_is_read_when_a_unit_becomes_next_in_line() -> None:
    users: set[int] = set()
    chain = make_chain(10, users=users)
    chain.header(12, 14, users=[5])
    users.add(5)
    chain.interest_added("u", 5)  # the unit is not next yet
    chain.header(10, 12)
    assert spans(drain(chain)) == [(10, 12)]
    assert chain.blocked() == ("payload", 12, 14)


def test_interest_added_does_not_hold_back_a_complete_unit() -> None:
    users: set[int] = set()
    chain = make_chain(10, users=users)
    chain.own(12, 14, "ours", [pm(13, 5, 1)])
    chain.header(10, 12)
    chain.next()
    users.add(5)
    chain.interest_added("u", 5)
    unit = chain.next()
    assert unit is not None and unit.own == "ours"


# --- own units ---------------------------------------------------------------------------


def test_own_units_are_complete() -> None:
    chain = make_chain(10, users={1, 2, 3}, groups={1, 2})
    msgs = [pm(11, 1, 2), gm(12, 3, 1), bm(13)]
    assert chain.own(10, 13, ("batch", "outcomes"), msgs) is True
    (unit,) = drain(chain)
    assert unit.complete
    assert unit.own == ("batch", "outcomes")
    assert unit.rows() == msgs
    assert chain.own(13, 14, "events", events=[Event(14, EVENT_JOIN, 1, 2)]) is True
    (unit,) = drain(chain)
    assert unit.rows() == [Event(14, EVENT_JOIN, 1, 2)]


def test_an_own_unit_waits_for_the_units_below_it() -> None:
    chain = make_chain(10, users={5})
    chain.header(10, 12, users=[5])
    chain.own(12, 14, "ours", [pm(13, 1, 2)])
    assert chain.next() is None
    assert chain.blocked() == ("payload", 10, 12)
    chain.payload(10, "u", 5, [pm(11, 5, 1)])
    assert [u.own for u in drain(chain)] == [None, "ours"]


# --- the bound ---------------------------------------------------------------------------


def test_units_past_the_bound_are_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_module, "MAX_PENDING_UNITS", 3)
    chain = make_chain(10, users={5})
    chain.header(12, 13)
    chain.header(13, 14)
    chain.payload(14, "u", 5, [pm(15, 5, 1)])
    assert (len(chain), chain.dropped) == (3, 0)
    chain.header(15, 16)  # no room
    chain.payload(16, "u", 5, [pm(17, 5, 1)])  # no room
    chain.header(10, 12)  # no room, even for the unit next in line
    assert (len(chain), chain.dropped) == (3, 3)
    chain.header(14, 15, users=[5])  # a unit that is here already takes it
    chain.payload(13, "u", 5, [])
    assert (len(chain), chain.dropped) == (3, 3)
    # the node's own commit is never dropped: the log must answer it
    assert chain.own(17, 18, "ours", [pm(18, 1, 2)]) is True
    assert len(chain) == 4
    # what was dropped is read from the store
    assert chain.blocked() == ("gap", 10, 12)
    chain.stored(10, 12, [])
    assert spans(drain(chain)) == [(10, 12), (12, 13), (13, 14), (14, 15)]
    assert chain.blocked() == ("gap", 15, 17)
    assert chain.gap_end(18) == 17
    chain.stored(15, 17, [pm(17, 5, 1)])
    out = drain(chain)
    assert [u.own for u in out] == [None, "ours"]
    assert len(chain) == 0
    chain.header(18, 19)  # room again
    assert chain.dropped == 3 and len(chain) == 1


# --- the model ---------------------------------------------------------------------------

USERS = range(1, 6)
GROUPS = range(1, 4)


@dataclass(frozen=True)
class Committed:
    """One unit of the drawn history: who committed it, and its rows."""

    prev: int
    last: int
    own: bool
    rows: tuple[Row, ...]

    def header(self) -> tuple[int, int, list[int], list[int], list[Event], list[Message]]:
        users, groups = subjects(self.rows)
        events = [r for r in self.rows if isinstance(r, Event)]
        everyone = [r for r in self.rows if isinstance(r, Message) and is_broadcast(r)]
        return self.prev, self.last, sorted(users), sorted(groups), events, everyone

    def payloads(self) -> list[tuple[str, int, list[Message]]]:
        """One per subject, as ClusterLog publishes them."""
        users, groups = subjects(self.rows)
        out = []
        for uid in sorted(users):
            msgs = [
                r
                for r in self.rows
                if isinstance(r, Message)
                and r.cmd == CMD_PRIVATE
                and not is_broadcast(r)
                and uid in (r.userid, r.dstid)
            ]
            out.append(("u", uid, msgs))
        for gid in sorted(groups):
            msgs = [
                r
                for r in self.rows
                if isinstance(r, Message) and r.cmd == CMD_GROUP and r.dstid == gid
            ]
            out.append(("g", gid, msgs))
        return out


def is_broadcast(msg: Message) -> bool:
    return msg.cmd == CMD_PRIVATE and msg.dstid == BROADCAST and msg.userid == SYSTEM_USER


def subjects(rows: tuple[Row, ...]) -> tuple[set[int], set[int]]:
    users: set[int] = set()
    groups: set[int] = set()
    for r in rows:
        if not isinstance(r, Message) or is_broadcast(r):
            continue
        if r.cmd == CMD_PRIVATE:
            users.update((r.userid, r.dstid))
        else:
            groups.add(r.dstid)
    return users, groups


@dataclass(frozen=True)
class History:
    w0: int
    units: tuple[Committed, ...]
    members: tuple[frozenset[int], ...]  # the groups of each user, at w0
    page: int  # rows one store read returns at most
    bound: int  # MAX_PENDING_UNITS


@st.composite
def histories(draw: st.DrawFn) -> History:
    w0 = draw(st.integers(0, 30))
    units = []
    pos = w0
    for _ in range(draw(st.integers(1, 20))):
        own = draw(st.integers(0, 2)) == 0
        rows: list[Row]
        if draw(st.integers(0, 4)) == 0:
            # a routing change is a unit of its own
            span = draw(st.integers(1, 2))
            kind = draw(st.sampled_from([EVENT_JOIN, EVENT_LEAVE]))
            rows = [
                Event(pos + span, kind, draw(st.sampled_from(USERS)), draw(st.sampled_from(GROUPS)))
            ]
        else:
            span = draw(st.integers(1, 4))
            rows = []
            for p in range(pos + 1, pos + span + 1):
                what = draw(st.integers(0, 9))
                src = draw(st.sampled_from(USERS))
                if what <= 4:
                    rows.append(pm(p, src, draw(st.sampled_from(USERS))))
                elif what <= 7:
                    rows.append(gm(p, src, draw(st.sampled_from(GROUPS))))
                elif what == 8:
                    rows.append(bm(p))
                # else: no row at this position (a rolled back id)
        units.append(Committed(pos, pos + span, own, tuple(rows)))
        pos += span
    members = tuple(frozenset(draw(st.sets(st.sampled_from(GROUPS), max_size=2))) for _ in USERS)
    page = draw(st.sampled_from([1, 2, 3, 1000]))
    bound = draw(st.sampled_from([3, 6, MAX_PENDING_UNITS]))
    return History(w0, tuple(units), members, page, bound)


Flight = tuple[str, Committed, str, int, list[Message]]


class ChainMachine(RuleBasedStateMachine):
    """ClusterLog's use of a Chain, against a drawn history (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.chain: Chain | None = None

    @initialize(history=histories(), online=st.sets(st.sampled_from(USERS)))
    def start(self, history: History, online: set[int]) -> None:
        self.history = history
        # small bounds, to be reached (the test restores the module's own)
        chain_module.MAX_PENDING_UNITS = history.bound
        self.online = set(online)
        self.members = {u: set(g) for u, g in zip(USERS, history.members, strict=True)}
        self.chain = Chain(history.w0, self.wants_user, self.wants_group)
        self.head = history.w0  # the store's head
        self.committed = 0  # units of the history committed so far
        self.truth: dict[int, Row] = {}
        #: what the bus carries and has not delivered: headers and payloads
        self.flight: list[Flight] = []
        #: the writer's queued reads, ("read", after, upto) or ("poll", 0, 0)
        self.ops: deque[tuple[str, int, int]] = deque()
        #: the read running now, [after, upto]: no commit of ours meanwhile
        self.reading: list[int] | None = None
        self.w = history.w0
        self.top_id = history.w0  # the highest id released
        self.own_pending: dict[str, Committed] = {}
        self.own_released: list[str] = []

    # --- the node's presence --------------------------------------------------------

    def wants_user(self, uid: int) -> bool:
        return uid in self.online

    def wants_group(self, gid: int) -> bool:
        return any(gid in self.members[u] for u in self.online)

    def wanted(self) -> tuple[set[int], set[int]]:
        return set(self.online), {g for u in self.online for g in self.members[u]}

    def changing_presence(self, change: Callable[[], None]) -> None:
        """Apply ``change`` and tell the chain what the node serves now that it
        did not (as presence's watch does)."""
        assert self.chain is not None
        users0, groups0 = self.wanted()
        change()
        users1, groups1 = self.wanted()
        for uid in sorted(users1 - users0):
            self.chain.interest_added("u", uid)
        for gid in sorted(groups1 - groups0):
            self.chain.interest_added("g", gid)

    # --- releasing ---------------------------------------------------------------------

    def pump(self) -> None:
        assert self.chain is not None
        while (unit := self.chain.next()) is not None:
            self.check_release(unit)
            for row in unit.rows():
                if isinstance(row, Event):
                    self.changing_presence(partial(self.apply, row))

    def apply(self, event: Event) -> None:
        if event.kind == EVENT_JOIN:
            self.members[event.uid].add(event.gid)
        else:
            self.members[event.uid].discard(event.gid)

    def required(self, row: Row) -> bool:
        """Whether the node needs ``row`` to release its unit, now."""
        if isinstance(row, Event) or is_broadcast(row):
            return True
        if row.cmd == CMD_PRIVATE:
            return self.wants_user(row.dstid) or self.wants_user(row.userid)
        return self.wants_group(row.dstid)

    def check_release(self, unit: Unit) -> None:
        assert self.chain is not None
        assert unit.last is not None
        assert unit.prev == self.w, f"released ({unit.prev}, {unit.last}] at w={self.w}"
        assert self.w < unit.last <= self.head, (unit.prev, unit.last, self.head)
        assert self.chain.w == unit.last
        rows = unit.rows()
        ids = [r.id for r in rows]
        assert ids == sorted(set(ids))
        for row in rows:
            assert unit.prev < row.id <= unit.last, f"row {row.id} outside its unit"
            assert row.id > self.top_id, f"row {row.id} released twice or out of order"
            assert self.truth.get(row.id) == row, f"row {row.id} is not what was committed"
            self.top_id = row.id
        have = set(ids)
        for pos in range(unit.prev + 1, unit.last + 1):
            row = self.truth.get(pos)
            if row is not None and self.required(row):
                assert pos in have, (
                    f"({unit.prev}, {unit.last}] released without {row}, which "
                    f"users {sorted(self.online)} / members {self.members} need"
                )
        if unit.own is not None:
            mine = self.own_pending.pop(unit.own, None)
            assert mine is not None, f"own unit {unit.own} released twice"
            assert (mine.prev, mine.last) == (unit.prev, unit.last)
            self.own_released.append(unit.own)
        self.w = unit.last

    # --- the cluster ---------------------------------------------------------------------

    def can_commit(self) -> bool:
        if self.committed >= len(self.history.units):
            return False
        # the node's own commits and its reads take turns in its writer
        return not self.history.units[self.committed].own or self.reading is None

    @precondition(lambda self: self.chain is not None and self.can_commit())
    @rule()
    def commit(self) -> None:
        assert self.chain is not None
        unit = self.history.units[self.committed]
        self.committed += 1
        assert unit.prev == self.head
        self.head = unit.last
        for row in unit.rows:
            self.truth[row.id] = row
        if unit.own:
            token = f"own{unit.prev}"
            self.own_pending[token] = unit
            msgs = [r for r in unit.rows if isinstance(r, Message)]
            events = [r for r in unit.rows if isinstance(r, Event)]
            assert self.chain.own(unit.prev, unit.last, token, msgs, events) is True
            self.pump()
        else:
            for kind, key, msgs in unit.payloads():
                self.flight.append(("p", unit, kind, key, msgs))
            self.flight.append(("h", unit, "", 0, []))

    @precondition(lambda self: self.chain is not None and self.flight)
    @rule(pick=st.integers(0, 1 << 16), fate=st.integers(0, 7))
    def bus(self, pick: int, fate: int) -> None:
        """The bus hands the node a header or a payload, or hands it twice, or
        loses it (or the node was not subscribed)."""
        i = pick % len(self.flight)
        item = self.flight[i] if fate == 1 else self.flight.pop(i)
        if fate != 0:
            self.deliver(item)

    def in_flight_for_next_unit(self) -> list[int]:
        return [i for i, item in enumerate(self.flight) if item[1].prev == self.w]

    @precondition(lambda self: self.chain is not None and self.in_flight_for_next_unit())
    @rule(pick=st.integers(0, 7))
    def bus_next(self, pick: int) -> None:
        """The bus hands the node a header or payload of the unit next in line
        (in order, as it mostly does; likelier than by chance, so that reads
        already asked for find the release point moved)."""
        mine = self.in_flight_for_next_unit()
        self.deliver(self.flight.pop(mine[pick % len(mine)]))

    def deliver(self, item: Flight) -> None:
        assert self.chain is not None
        what, unit, kind, key, msgs = item
        if what == "h":
            self.chain.header(*unit.header())
            self.pump()
        else:
            self.chain.payload(unit.prev, kind, key, msgs)
            if unit.prev == self.chain.w:
                self.pump()

    @precondition(lambda self: self.chain is not None)
    @rule(uid=st.sampled_from(USERS))
    def toggle_online(self, uid: int) -> None:
        self.changing_presence(lambda: self.online.symmetric_difference_update({uid}))

    # --- the caller's timers and reads -----------------------------------------------------

    def offline_in_next_unit(self) -> list[int]:
        """The users the unit next in line concerns that the node does not serve."""
        if self.chain is None or self.w >= self.head or self.w not in self.prevs():
            return []
        users, _ = subjects(self.unit_at(self.w).rows)
        return sorted(users - self.online)

    @precondition(lambda self: self.offline_in_next_unit())
    @rule(pick=st.integers(0, 3))
    def serve_next(self, pick: int) -> None:
        """A user the unit next in line concerns comes online (the case
        ``interest_added`` is for, made likelier than by chance)."""
        users = self.offline_in_next_unit()
        uid = users[pick % len(users)]
        self.changing_presence(lambda: self.online.add(uid))

    # (ClusterLog's timer asks for one read at a time, more or less: a few may queue)
    @precondition(lambda self: self.chain is not None and len(self.ops) < 3)
    @rule(due=st.integers(0, 2))
    def timer(self, due: int = 0) -> None:
        """ClusterLog's ``_check``: what blocks the chain is read from the store,
        once the wait is over (``due`` 0: the bus has most turns before it)."""
        assert self.chain is not None
        if due:
            return
        blocked = self.chain.blocked()
        if blocked is None:
            return
        kind, after, upto = blocked
        assert after == self.chain.w < upto <= self.head, blocked
        if kind == "payload":
            assert after in self.prevs() and upto == self.unit_at(after).last
        else:
            assert kind == "gap"
            assert upto in self.prevs(), f"a gap up to {upto}, inside a unit"
        self.ops.append(("read", after, upto))

    @precondition(lambda self: self.chain is not None and len(self.ops) < 3)
    @rule(due=st.integers(0, 2))
    def poll(self, due: int = 0) -> None:
        if not due:
            self.ops.append(("poll", 0, 0))

    @precondition(lambda self: self.chain is not None and self.ops and self.reading is None)
    @rule()
    def run_op(self) -> None:
        """The writer takes the next queued read (ClusterLog's ``_read`` and ``_look_at_head``)."""
        assert self.chain is not None
        op, after, upto = self.ops.popleft()
        if op == "poll":
            after, upto = self.chain.w, self.head
            if upto <= after:
                return
        if after == self.chain.w:
            upto = self.chain.gap_end(upto)
        self.reading = [after, upto]

    @precondition(lambda self: self.reading is not None)
    @rule()
    def read_page(self) -> None:
        """One page of the running read comes back from the store."""
        assert self.chain is not None and self.reading is not None
        after, upto = self.reading
        if not (after < upto and upto > self.chain.w):
            self.reading = None
            return
        assert upto <= self.head
        rows = [self.truth[i] for i in range(after + 1, upto + 1) if i in self.truth]
        rows = rows[: self.history.page]
        end = rows[-1].id if len(rows) == self.history.page else upto
        low = max(after, self.chain.w)
        for mine in self.own_pending.values():
            assert not (mine.prev < end and low < mine.last), (
                f"a read of ({after}, {end}] covers our own unit ({mine.prev}, {mine.last}]"
            )
        assert self.chain.stored(after, end, rows) == []
        self.pump()
        self.reading[0] = end

    @precondition(lambda self: self.reading is not None)
    @rule()
    def read_fails(self) -> None:
        self.reading = None

    # --- helpers and invariants --------------------------------------------------------------

    def prevs(self) -> set[int]:
        return {u.prev for u in self.history.units[: self.committed]} | {self.head}

    def unit_at(self, prev: int) -> Committed:
        (unit,) = [u for u in self.history.units[: self.committed] if u.prev == prev]
        return unit

    @invariant()
    def release_point(self) -> None:
        if self.chain is None:
            return
        assert self.chain.w == self.w, "the release point moved without a release"
        assert self.chain.w <= self.head
        non_own = len(self.chain) - len(self.own_pending)
        assert non_own <= self.history.bound, f"{non_own} units pending"

    def teardown(self) -> None:
        """Liveness: deliver what is left, let the caller's protocol read what is
        missing, and everything committed is released."""
        chain = self.chain
        if chain is None:
            return
        while self.reading is not None:
            self.read_page()
        while self.committed < len(self.history.units):
            self.commit()
        while self.flight:
            self.deliver(self.flight.pop(0))
        while self.ops:  # the reads already asked for, stale or not
            self.run_op()
            while self.reading is not None:
                self.read_page()
        for _ in range(4 * len(self.history.units) + 20):
            if self.w == self.head and not self.ops:
                break
            if self.ops:
                self.run_op()
                while self.reading is not None:
                    self.read_page()
                continue
            before = len(self.ops)
            self.timer()
            if len(self.ops) == before:
                self.poll()
        assert self.w == self.head, f"stuck at {self.w} below the head {self.head}"
        assert not self.own_pending, f"own units never released: {sorted(self.own_pending)}"
        assert len(chain) == 0


def test_chain_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random histories, deliveries and reads: order, nothing skipped, liveness."""
    # each history sets its own bound on the module: put the real one back after
    monkeypatch.setattr(chain_module, "MAX_PENDING_UNITS", MAX_PENDING_UNITS)
    run_state_machine_as_test(
        ChainMachine,
        settings=settings(
            max_examples=600,
            stateful_step_count=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            # (the explain phase traces every line: minutes on Python < 3.12)
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        ),
    )
