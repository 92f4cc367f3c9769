"""Presence (``log.presence``): which ports hold which users, and so which
ports a message must reach. Pure bookkeeping: examples, then random sequences
against a naive model that recomputes everything from scratch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.log.presence import Presence


def test_a_user_comes_online_with_its_groups_read_once() -> None:
    p = Presence()
    assert not p.known(1)
    with pytest.raises(ValueError):
        p.add(1, 10)  # the first port must bring the groups (the log reads them)
    assert p.add(1, 10, [7, 8]) == {7, 8}
    assert p.known(1)
    # a second port: the groups are known, what it passes is not used
    assert p.add(1, 11, [99]) == {7, 8}
    assert p.add(1, 11) == {7, 8}  # again: changes nothing
    assert set(p.ports_of(1)) == {10, 11}
    assert p.group_ports == {7: {10: 1, 11: 1}, 8: {10: 1, 11: 1}}
    assert set(p.group_targets(7)) == {10, 11}
    assert set(p.group_targets(9)) == set() and set(p.ports_of(2)) == set()


def test_users_on_the_same_ports_share_one_set_and_groupless_users_one_empty_set() -> None:
    p = Presence()
    for uid in range(1, 5):
        p.add(uid, 10, [])
    p.add(4, 11)
    assert p.ports_of(1) is p.ports_of(2) is p.ports_of(3) and p.ports_of(4) == {10, 11}
    assert p.add(1, 10) is p.add(2, 10) and not p.add(1, 10)
    p.remove(4, 11)
    assert p.ports_of(4) is p.ports_of(1)
    p.add(5, 11, [7])
    p.drop_port(11)
    assert set(p.ports_of(5)) == set() and set(p.group_targets(7)) == set()
    assert p.add(5, 11, [7]) == {7} and set(p.ports_of(5)) == {11}


def test_groups_count_members_per_port() -> None:
    p = Presence()
    p.add(1, 10, [7])
    p.add(2, 10, [7])
    p.add(3, 11, [7])
    assert p.group_ports == {7: {10: 2, 11: 1}}
    p.remove(1, 10)
    assert p.group_ports == {7: {10: 1, 11: 1}}
    p.remove(2, 10)
    assert set(p.group_targets(7)) == {11}
    p.remove(3, 11)
    assert p.group_ports == {} and p.users == {}


def test_the_last_port_going_forgets_the_user() -> None:
    p = Presence()
    p.add(1, 10, [7])
    p.add(1, 11)
    p.remove(1, 10)
    assert p.known(1) and set(p.ports_of(1)) == {11}
    p.remove(1, 10)  # not held there any more: nothing happens
    p.remove(2, 10)  # never held
    p.remove(1, 11)
    assert not p.known(1) and p.users == {} and p.groups_of == {}
    # back online: the groups are read again (they may have changed meanwhile)
    assert p.add(1, 12, [8]) == {8}


def test_join_and_leave_change_the_routing_and_name_the_ports_to_tell() -> None:
    p = Presence()
    p.add(1, 10, [])
    p.add(1, 11)
    assert p.join(1, 7) == {10, 11}
    assert p.group_ports == {7: {10: 1, 11: 1}}
    assert p.join(1, 7) == {10, 11}  # already a member: no second count
    assert p.group_ports == {7: {10: 1, 11: 1}}
    assert p.leave(1, 7) == {10, 11}
    assert p.group_ports == {} and p.groups_of[1] == frozenset()
    assert p.leave(1, 7) == {10, 11}  # not a member: nothing changes
    # an offline user: nobody to tell, nothing kept (its next add reads the store)
    assert p.join(2, 7) == frozenset() and p.leave(2, 7) == frozenset()
    assert not p.known(2) and p.group_ports == {}


def test_a_dropped_port_takes_everything_it_held() -> None:
    p = Presence()
    p.add(1, 10, [7])
    p.add(1, 11)
    p.add(2, 10, [7, 8])
    p.add(3, 11, [8])
    p.drop_port(10)
    assert p.users == {1: {11}, 3: {11}}
    assert not p.known(2)
    assert p.group_ports == {7: {11: 1}, 8: {11: 1}}
    p.drop_port(10)  # again: nothing left to drop
    assert p.users == {1: {11}, 3: {11}}


USERS = st.integers(1, 4)
PORTS = st.integers(1, 3)
GIDS = st.integers(1, 3)
OPS = st.one_of(
    st.tuples(st.just("add"), USERS, PORTS),
    st.tuples(st.just("remove"), USERS, PORTS),
    st.tuples(st.just("join"), USERS, GIDS),
    st.tuples(st.just("leave"), USERS, GIDS),
    st.tuples(st.just("drop_port"), PORTS, st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(USERS, st.frozensets(GIDS)), st.lists(OPS, max_size=40))
def test_presence_matches_a_model_recomputed_from_scratch(
    stored: dict[int, frozenset[int]], ops: list[tuple[str, int, int]]
) -> None:
    """Random adds, removes, joins, leaves and dropped ports, as the log makes
    them (the groups of a user who comes online are the store's; joins and
    leaves change the store and, for online users, presence). After each,
    every figure equals what a naive model recomputes from who is where."""
    members = {uid: set(gids) for uid, gids in stored.items()}  # the store's membership
    ports: dict[int, set[int]] = {}  # the model: uid -> ports
    p = Presence()
    for op, a, b in ops:
        if op == "add":
            groups = None if p.known(a) else members.get(a, set())
            assert p.add(a, b, groups) == members.get(a, set())
            ports.setdefault(a, set()).add(b)
        elif op == "remove":
            p.remove(a, b)
            ports.get(a, set()).discard(b)
        elif op == "join":
            members.setdefault(a, set()).add(b)
            assert p.join(a, b) == ports.get(a, set())
        elif op == "leave":
            members.get(a, set()).discard(b)
            assert p.leave(a, b) == ports.get(a, set())
        else:
            p.drop_port(a)
            for held in ports.values():
                held.discard(a)
        ports = {uid: held for uid, held in ports.items() if held}
        # recomputed from scratch
        assert p.users == ports
        assert p.groups_of == {uid: frozenset(members.get(uid, ())) for uid in ports}
        group_ports: dict[int, dict[int, int]] = {}
        for uid, held in ports.items():
            for gid in members.get(uid, ()):
                for port in held:
                    counts = group_ports.setdefault(gid, {})
                    counts[port] = counts.get(port, 0) + 1
        assert p.group_ports == group_ports
        for uid in range(1, 5):
            assert set(p.ports_of(uid)) == ports.get(uid, set())
            assert p.known(uid) == (uid in ports)
        for gid in range(1, 4):
            assert set(p.group_targets(gid)) == set(group_ports.get(gid, {}))
