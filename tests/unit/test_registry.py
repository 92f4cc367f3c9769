"""The client registry: uid -> connections, group index, cap."""

from __future__ import annotations

import threading

from chatd.registry import STRIPES, Registry


class FakeConn:
    """Registry connections are opaque: anything with ``uid`` and ``groups``."""

    def __init__(self, uid: int, groups: frozenset[int] = frozenset()) -> None:
        self.uid = uid
        self.groups = groups

    def __repr__(self) -> str:
        return f"C({self.uid})"


def up(reg: Registry, conn: FakeConn) -> None:
    """What the shard does: count at the upgrade, register once groups are known."""
    reg.reserve()
    reg.add(conn)


def down(reg: Registry, conn: FakeConn) -> bool:
    """What the shard does when a registered connection goes."""
    found = reg.remove(conn)
    if found:
        reg.release()
    return found


def test_add_get_remove_one_device() -> None:
    reg = Registry(10)
    c = FakeConn(7)
    assert reg.get(7) is None
    up(reg, c)
    assert reg.get(7) == [c] and reg.count == 1 and reg.users == 1
    assert down(reg, c) is True
    assert reg.get(7) is None and reg.count == 0 and reg.users == 0


def test_several_devices_of_one_user() -> None:
    reg = Registry(10)
    a, b = FakeConn(7), FakeConn(7)
    up(reg, a)
    up(reg, b)
    assert reg.get(7) == [a, b] and reg.count == 2 and reg.users == 1
    down(reg, a)
    assert reg.get(7) == [b] and reg.count == 1


def test_uids_in_the_same_stripe_are_kept_apart() -> None:
    reg = Registry(10)
    a, b = FakeConn(3), FakeConn(3 + STRIPES)
    up(reg, a)
    up(reg, b)
    assert reg.get(3) == [a] and reg.get(3 + STRIPES) == [b]
    down(reg, a)
    assert reg.get(3 + STRIPES) == [b]


def test_removing_an_unknown_connection_is_false_and_harmless() -> None:
    reg = Registry(10)
    a = FakeConn(1)
    up(reg, a)
    assert down(reg, FakeConn(1)) is False
    assert down(reg, FakeConn(2)) is False
    assert down(reg, a) is True
    assert down(reg, a) is False
    assert reg.count == 0


def test_cap() -> None:
    reg = Registry(2)
    conns = [FakeConn(1), FakeConn(2)]
    up(reg, conns[0])
    assert not reg.full
    up(reg, conns[1])
    assert reg.full
    down(reg, conns[0])
    assert not reg.full


def test_a_reserved_slot_counts_against_the_cap_before_registration() -> None:
    reg = Registry(2)
    reg.reserve()
    reg.reserve()
    assert reg.full and reg.users == 0
    reg.release()
    assert not reg.full


def test_group_index_join_leave_and_remove() -> None:
    reg = Registry(10)
    a, b = FakeConn(1, frozenset({5, 6})), FakeConn(2, frozenset({5}))
    for c in (a, b):
        up(reg, c)
        for gid in c.groups:
            reg.join(c, gid)
    assert reg.groups[5] == {a, b} and reg.groups[6] == {a}
    reg.leave(b, 5)
    assert reg.groups[5] == {a}
    reg.leave(b, 5)  # twice is fine
    reg.leave(b, 99)  # unknown group is fine
    down(reg, a)
    assert 5 not in reg.groups and 6 not in reg.groups  # empty groups are dropped


def test_iteration_and_stripes_see_every_connection() -> None:
    reg = Registry(1000)
    conns = [FakeConn(uid) for uid in range(1, 300)] + [FakeConn(17), FakeConn(17)]
    for c in conns:
        up(reg, c)
    assert sorted(map(id, reg)) == sorted(map(id, conns))
    assert sum(len(reg.stripe(i)) for i in range(STRIPES)) == len(conns)
    assert reg.users == 299 and reg.count == len(conns)


def test_snapshot_from_another_thread_while_the_loop_writes() -> None:
    reg = Registry(100_000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                for i in range(STRIPES):
                    for c in reg.stripe(i):
                        assert c.uid & (STRIPES - 1) == i
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        conns = [FakeConn(uid) for uid in range(5000)]
        for c in conns:
            up(reg, c)
        for c in conns[::2]:
            down(reg, c)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert reg.count == 2500
