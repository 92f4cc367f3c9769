"""The node's ordered log (``log.core.Log``): group commit, ids, presence,
routing, with a real SQLite store in a temp folder and real ports.

``RecordingPort`` implements the log's ``Port`` interface the way a shard's
end of the bus does, except that it keeps what it is sent: every batch,
``(items, hw)``, in order. A hook on it runs when a batch arrives, so a test
can put a placement or a routing change between two commits of a stream of
messages, without sleeps.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import TEST_PASSWORD_HASH, UNIT

from chatd.bus.frames import (
    Acked,
    AnyItem,
    Banned,
    Deliver,
    Here,
    Joined,
    Left,
    Refused,
    Revoked,
    Unbanned,
)
from chatd.errors import NotFoundError, StoreUnavailable
from chatd.log import Log
from chatd.store.sqlite import SqliteStore
from chatd.wire import CMD_GROUP, CMD_PRIVATE, ERR_BUSY, ERR_NOT_FOUND, ERR_SERVER, Message

T = TypeVar("T")


class RecordingPort:
    """A ``Port`` that keeps every batch it is sent."""

    def __init__(self, on_batch: Callable[[RecordingPort], None] | None = None) -> None:
        self.batches: list[tuple[list[AnyItem], int]] = []
        self.on_batch = on_batch
        self.arrived = asyncio.Event()
        self.id = 0

    def send(self, items: list[AnyItem], hw: int) -> None:
        self.batches.append((list(items), hw))
        self.arrived.set()
        if self.on_batch is not None:
            self.on_batch(self)

    @property
    def items(self) -> list[AnyItem]:
        return [item for items, _ in self.batches for item in items]

    def of(self, kind: type[T]) -> list[T]:
        return [item for item in self.items if isinstance(item, kind)]

    def delivered(self) -> list[int]:
        return [d.msg.id for d in self.of(Deliver)]

    def hw_of(self, item: AnyItem) -> int:
        """The high-water of the batch that carried ``item``."""
        for items, hw in self.batches:
            if any(i is item for i in items):
                return hw
        raise AssertionError(f"{item} was not sent")

    async def until(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until ``pred()`` holds after some batch."""
        async def go() -> None:
            while not pred():
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(go(), timeout * UNIT)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "chatd.db")
    yield s
    await s.close()


@pytest.fixture
async def make_log(store: SqliteStore) -> AsyncIterator[Callable[..., Awaitable[Log]]]:
    logs: list[Log] = []

    async def make(**kwargs: Any) -> Log:
        log = Log(store, **kwargs)
        await log.start()
        logs.append(log)
        return log

    yield make
    for log in logs:
        await log.close()


async def users(store: SqliteStore, n: int) -> list[int]:
    return [await store.create_user(f"1370000{i:04d}", TEST_PASSWORD_HASH) for i in range(n)]


def attach(log: Log, port: RecordingPort) -> int:
    port.id, _ = log.attach(port)
    return port.id


async def online(log: Log, port: RecordingPort, uid: int) -> Here:
    """``port`` reports its first connection of ``uid``; the log's ``Here``."""
    before = len(port.of(Here))
    log.online(port.id, uid)
    await port.until(lambda: len(port.of(Here)) > before)
    here = port.of(Here)[-1]
    assert here.uid == uid
    return here


def pm(src: int, dst: int, cid: str = "", content: str = "hi") -> Message:
    return Message(userid=src, cmd=CMD_PRIVATE, dstid=dst, media=1, content=content, cid=cid)


def gm(src: int, gid: int, cid: str = "") -> Message:
    return Message(userid=src, cmd=CMD_GROUP, dstid=gid, media=1, content="all", cid=cid)


async def flush(log: Log) -> None:
    await asyncio.wait_for(log.flush(), 5 * UNIT)


async def group_ids(store: SqliteStore, gid: int) -> list[int]:
    """Ids of every message stored for group ``gid``, in order."""
    return [m.id for m in await store.group_history(gid, 0, 1 << 62, 10_000, False)]


# --- group commit, ids, acks ---------------------------------------------------------------


async def test_a_burst_is_committed_in_batches_acked_in_order_and_delivered_once(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob, carol = await users(store, 3)
    log = await make_log(batch_max=8)
    a, b, c = RecordingPort(), RecordingPort(), RecordingPort()
    for port in (a, b, c):
        attach(log, port)
    await online(log, a, alice)
    await online(log, b, bob)
    await online(log, c, carol)
    n = 50
    for seq in range(1, n + 1):  # all queued before the writer runs: batches fill up
        assert log.submit(a.id, seq, pm(alice, bob, cid=f"c{seq}", content=f"m{seq}"))
    await flush(log)

    acks = a.of(Acked)
    assert [x.seq for x in acks] == list(range(1, n + 1)), "acked in submission order"
    ids = [x.id for x in acks]
    assert ids == sorted(ids) and len(set(ids)) == n and all(x.stored for x in acks)
    # one transaction per batch, at most batch_max each, every message in one
    assert store.batches == log.batches == len([1 for items, _ in a.batches
                                                 if any(isinstance(i, Acked) for i in items)])
    assert log.batches == 7, "50 queued at once: 6 full batches of 8, then 2"
    assert all(sum(isinstance(i, Acked) for i in items) <= 8 for items, _ in a.batches)
    # the store's ids are the commit order, and hold what was sent
    history = await store.private_history(alice, bob, 0, 1 << 62, 100, False)
    assert [m.id for m in history] == ids
    assert [m.content for m in history] == [f"m{s}" for s in range(1, n + 1)]
    # the receiver's port: each once, in id order; never the origin; nothing elsewhere
    assert b.delivered() == ids
    assert [d.msg.content for d in b.of(Deliver)] == [m.content for m in history]
    assert a.of(Deliver) == [] and c.of(Deliver) == []
    assert len(c.batches) == 1, "a port with nothing to deliver gets nothing (but its Here)"
    # every batch's high-water covers what it carries; the log ends at the last id
    for items, hw in a.batches + b.batches:
        assert all(i.id <= hw for i in items if isinstance(i, Acked))
        assert all(i.msg.id <= hw for i in items if isinstance(i, Deliver))
    assert log.hw == ids[-1] == await store.max_message_id()


async def _three_in_two_steps(log: Log, alice: int, bob: int, tag: str) -> int:
    """Submit one message, wait for its ack, then two more with the writer
    woken in between; the number of commits the three took."""
    port = RecordingPort()
    attach(log, port)
    await online(log, port, alice)
    start = log.batches
    assert log.submit(port.id, 1, pm(alice, bob, cid=f"{tag}1"))
    await port.until(lambda: len(port.of(Acked)) == 1)
    assert log.submit(port.id, 2, pm(alice, bob, cid=f"{tag}2"))
    for _ in range(3):
        await asyncio.sleep(0)  # the writer wakes up for the second one
    assert log.submit(port.id, 3, pm(alice, bob, cid=f"{tag}3"))
    await port.until(lambda: len(port.of(Acked)) == 3)
    acks = port.of(Acked)
    assert [x.seq for x in acks] == [1, 2, 3] and all(x.stored for x in acks)
    return log.batches - start


async def test_commit_interval_lets_a_batch_grow_after_a_commit_and_not_after_a_quiet_spell(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    # without the interval the writer commits the second message as soon as it wakes
    assert await _three_in_two_steps(await make_log(), alice, bob, "r") == 3
    # with it (far longer than the test), the first one, after a quiet spell,
    # goes at once; the writer then waits, and the batch it lets grow goes
    # when it is full (batch_max 2), not when the interval ends
    paced = await make_log(commit_interval_s=3600.0, batch_max=2)
    assert await _three_in_two_steps(paced, alice, bob, "q") == 2


async def test_private_messages_reach_the_receivers_ports_and_the_senders_other_ports(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob, carol = await users(store, 3)
    log = await make_log()
    p1, p2, p3, p4 = (RecordingPort() for _ in range(4))
    for port in (p1, p2, p3, p4):
        attach(log, port)
    await online(log, p1, alice)  # alice's phone
    await online(log, p2, alice)  # alice's laptop, on the port that also holds bob
    await online(log, p2, bob)
    await online(log, p3, bob)
    await online(log, p4, carol)
    log.submit(p1.id, 1, pm(alice, bob))  # from the phone
    log.submit(p3.id, 2, pm(bob, bob))  # to oneself
    log.submit(p2.id, 3, pm(alice, bob))  # from the laptop, next to bob
    await flush(log)
    [m1, m2, m3] = [x.id for x in sorted(p1.of(Acked) + p3.of(Acked) + p2.of(Acked),
                                          key=lambda x: x.seq)]
    assert p1.delivered() == [m3]  # alice's other device
    assert p2.delivered() == [m1, m2], "one copy per port, although it holds both users"
    assert p3.delivered() == [m1, m3]
    assert p4.delivered() == []
    assert [x.seq for x in p1.of(Acked)] == [1]
    assert [x.seq for x in p2.of(Acked)] == [3] and [x.seq for x in p3.of(Acked)] == [2]


async def test_group_messages_reach_each_port_with_an_online_member_once(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob, carol, dave = await users(store, 4)
    log = await make_log()
    p1, p2, p3, p4 = (RecordingPort() for _ in range(4))
    for port in (p1, p2, p3, p4):
        attach(log, port)
    await online(log, p1, alice)
    gid = await log.create_group("g", alice)
    for uid in (bob, carol):
        assert await log.join_group(gid, uid)
    await online(log, p2, bob)
    assert (await online(log, p2, carol)).groups == [gid]
    await online(log, p3, dave)  # not a member
    await online(log, p4, carol)  # carol's other device
    log.submit(p1.id, 1, gm(alice, gid))
    log.submit(p2.id, 2, gm(carol, gid))
    await flush(log)
    [g1] = [x.id for x in p1.of(Acked)]
    [g2] = [x.id for x in p2.of(Acked)]
    assert p1.delivered() == [g2]
    assert p2.delivered() == [g1], "bob and carol share one copy; not its own message"
    assert p3.delivered() == []
    assert p4.delivered() == [g1, g2]


async def test_unknown_receivers_and_a_full_queue_are_refused(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log(queue_max=3)
    a, b = RecordingPort(), RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, alice)
    await online(log, b, bob)
    assert log.submit(a.id, 1, pm(alice, bob))
    assert log.submit(a.id, 2, pm(alice, 99_999))  # nobody
    assert log.submit(a.id, 3, pm(alice, bob))
    assert log.queued == 3
    assert not log.submit(a.id, 4, pm(alice, bob)), "past queue_max: the shard answers 503"
    await flush(log)
    assert [x.seq for x in a.of(Acked)] == [1, 3]
    [refused] = a.of(Refused)
    assert (refused.seq, refused.code) == (2, ERR_NOT_FOUND)
    assert b.delivered() == [x.id for x in a.of(Acked)]
    assert log.submit(a.id, 5, pm(alice, bob)), "room again once committed"
    await flush(log)
    assert [x.seq for x in a.of(Acked)] == [1, 3, 5]
    assert log.committed == 3 == await store.max_message_id()


async def test_a_retried_cid_is_stored_once_and_acked_with_the_same_id(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log()
    a, b = RecordingPort(), RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, alice)
    await online(log, b, bob)
    log.submit(a.id, 1, pm(alice, bob, cid="x"))
    await flush(log)
    log.submit(a.id, 2, pm(alice, bob, cid="x"))  # a later batch
    log.submit(a.id, 3, pm(alice, bob, cid="y"))
    log.submit(a.id, 4, pm(alice, bob, cid="y"))  # the same batch
    await flush(log)
    acks = {x.seq: x for x in a.of(Acked)}
    assert acks[2].id == acks[1].id and not acks[2].stored and acks[1].stored
    assert acks[4].id == acks[3].id and not acks[4].stored and acks[3].stored
    assert b.delivered() == [acks[1].id, acks[3].id], "a retry is not delivered again"
    assert store.committed == 2


# --- presence: Here, Online, Offline, detach -------------------------------------------------


async def test_online_is_answered_from_the_store_then_from_presence(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    g1 = await store.create_group("one", bob)
    log = await make_log()
    a, b, gone = RecordingPort(), RecordingPort(), RecordingPort()
    for port in (a, b, gone):
        attach(log, port)
    await online(log, a, alice)
    log.submit(a.id, 1, pm(alice, bob))
    await flush(log)
    # not online anywhere: its groups are read from the store
    first = await online(log, a, bob)
    assert first == Here(bob, [g1], log.hw) and log.hw == 1
    # a membership written behind the log's back is not seen by a known user's
    # Here: presence answers it at once, without reading the store
    g2 = await store.create_group("two", alice)
    assert await store.join_group(g2, bob)
    second = await online(log, b, bob)
    assert second == Here(bob, [g1], 1)
    # a port that is gone gets no answer
    log.detach(gone.id)
    log.online(gone.id, bob)
    await flush(log)
    assert gone.batches == []


async def test_here_takes_its_place_in_the_order_of_the_messages(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    """A port that asks for a user while messages for it are being committed
    gets everything above its Here's hw, and nothing at or below it (that is
    the store's, for the replay) — by the lookup and by presence alike."""
    alice, bob = await users(store, 2)
    log = await make_log(batch_max=4)
    asked = RecordingPort()
    known = RecordingPort()
    bobs = RecordingPort()

    def ask(port: RecordingPort) -> None:
        if len(port.of(Acked)) == 4 and not asked.batches and not known.batches:
            log.online(asked.id, bob)  # bob is online nowhere: a lookup
    a = RecordingPort(on_batch=ask)
    for port in (a, asked, known, bobs):
        attach(log, port)
    await online(log, a, alice)
    for seq in range(1, 13):
        log.submit(a.id, seq, pm(alice, bob))
    await flush(log)
    [here] = asked.of(Here)
    ids = [x.id for x in a.of(Acked)]
    assert ids[0] <= here.hw < ids[-1], "placed in the middle of the stream"
    assert asked.delivered() == [i for i in ids if i > here.hw]

    # the same through presence: bob is online on another port now
    await online(log, bobs, bob)

    def ask_known(port: RecordingPort) -> None:
        if len(port.of(Acked)) == 16 and not known.batches:
            log.online(known.id, bob)
    a.on_batch = ask_known
    for seq in range(13, 25):
        log.submit(a.id, seq, pm(alice, bob))
    await flush(log)
    await known.until(lambda: bool(known.of(Here)))
    [here] = known.of(Here)
    later = [x.id for x in a.of(Acked)][12:]
    assert later[0] <= here.hw < later[-1]
    assert known.delivered() == [i for i in later if i > here.hw]


async def test_offline_stops_delivery_and_online_again_starts_it_at_a_new_place(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log()
    a, b = RecordingPort(), RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, alice)
    await online(log, b, bob)
    log.submit(a.id, 1, pm(alice, bob))
    await flush(log)
    log.offline(b.id, bob)
    assert log.figures()["online_users"] == 1
    log.submit(a.id, 2, pm(alice, bob))
    await flush(log)
    here = await online(log, b, bob)
    log.submit(a.id, 3, pm(alice, bob))
    await flush(log)
    m1, m2, m3 = (x.id for x in a.of(Acked))
    assert here.hw == m2, "the store has everything up to the new place"
    assert b.delivered() == [m1, m3]


async def test_a_detached_port_is_forgotten_and_its_queued_messages_still_commit(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob, carol = await users(store, 3)
    log = await make_log()
    a, b, c = RecordingPort(), RecordingPort(), RecordingPort()
    for port in (a, b, c):
        attach(log, port)
    await online(log, a, alice)
    await online(log, b, bob)
    assert log.figures()["ports"] == 3
    log.online(c.id, carol)  # a lookup that will not be answered: c goes first
    log.submit(b.id, 1, pm(bob, alice))
    log.detach(b.id)
    log.detach(c.id)
    log.submit(a.id, 1, pm(alice, bob))
    await flush(log)
    assert b.batches[1:] == [] and c.batches == []
    assert a.delivered() == [1] and [x.id for x in a.of(Acked)] == [2]
    assert await store.max_message_id() == 2
    figures = log.figures()
    assert figures["ports"] == 1 and figures["online_users"] == 1
    assert log.presence.users == {alice: {a.id}}


# --- routing changes at their place in the order ----------------------------------------


async def test_a_join_delivers_what_is_committed_after_it_and_nothing_before(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    owner, newcomer = await users(store, 2)
    log = await make_log(batch_max=4)
    tasks: list[asyncio.Task[bool]] = []
    gid = 0

    def join_midway(port: RecordingPort) -> None:
        if len(port.of(Acked)) >= 4 and not tasks:
            tasks.append(asyncio.get_running_loop().create_task(log.join_group(gid, newcomer)))
    a = RecordingPort(on_batch=join_midway)
    b = RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, owner)
    gid = await log.create_group("g", owner)
    assert a.of(Joined) == [Joined(owner, gid)]
    assert (await online(log, b, newcomer)).groups == []
    for seq in range(1, 13):
        log.submit(a.id, seq, gm(owner, gid))
    await a.until(lambda: bool(tasks))
    assert await asyncio.wait_for(tasks[0], 5 * UNIT)
    for seq in range(13, 17):  # after the join, for certain
        log.submit(a.id, seq, gm(owner, gid))
    await flush(log)
    joined_id = await store.joined_id(gid, newcomer)
    assert joined_id is not None
    ids = await group_ids(store, gid)
    before = [i for i in ids if i <= joined_id]
    after = [i for i in ids if i > joined_id]
    assert len(before) >= 4 and after, "the join landed between the messages"
    assert b.delivered() == after
    [joined] = b.of(Joined)
    assert joined == Joined(newcomer, gid) and b.hw_of(joined) == joined_id
    assert b.items.index(joined) < b.items.index(b.of(Deliver)[0])
    assert not await log.join_group(gid, newcomer), "already a member"
    await flush(log)
    assert b.of(Joined) == [joined]


async def test_a_leave_stops_delivery_at_its_place(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    owner, member = await users(store, 2)
    log = await make_log(batch_max=4)
    tasks: list[asyncio.Task[bool]] = []
    gid = 0

    def leave_midway(port: RecordingPort) -> None:
        if len(port.of(Acked)) >= 4 and not tasks:
            tasks.append(asyncio.get_running_loop().create_task(log.leave_group(gid, member)))
    a = RecordingPort(on_batch=leave_midway)
    b = RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, owner)
    gid = await log.create_group("g", owner)
    assert await log.join_group(gid, member)
    assert (await online(log, b, member)).groups == [gid]
    for seq in range(1, 13):
        log.submit(a.id, seq, gm(owner, gid))
    await a.until(lambda: bool(tasks))
    assert await asyncio.wait_for(tasks[0], 5 * UNIT)
    for seq in range(13, 17):
        log.submit(a.id, seq, gm(owner, gid))
    await flush(log)
    [left] = b.of(Left)
    assert left == Left(member, gid)
    at = b.hw_of(left)
    ids = await group_ids(store, gid)
    assert [i for i in ids if i <= at] and [i for i in ids if i > at]
    assert b.delivered() == [i for i in ids if i <= at]
    assert b.items.index(left) > b.items.index(b.of(Deliver)[-1])
    assert await store.joined_id(gid, member) is None
    assert not await log.leave_group(gid, member)


async def test_revocations_and_bans_reach_every_port_at_their_place(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob, mallory = await users(store, 3)
    log = await make_log(batch_max=4)
    tasks: list[asyncio.Task[Any]] = []

    def revoke_midway(port: RecordingPort) -> None:
        if len(port.of(Acked)) >= 4 and not tasks:
            tasks.append(asyncio.get_running_loop().create_task(log.revoke_tokens(mallory)))
    a = RecordingPort(on_batch=revoke_midway)
    b = RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, alice)
    await online(log, b, bob)
    for seq in range(1, 13):
        log.submit(a.id, seq, pm(alice, bob))
    await a.until(lambda: bool(tasks))
    assert await asyncio.wait_for(tasks[0], 5 * UNIT) == 1
    for seq in range(13, 17):
        log.submit(a.id, seq, pm(alice, bob))
    await flush(log)
    for port in (a, b):
        [revoked] = port.of(Revoked)
        assert revoked == Revoked(mallory, 1)
        at = port.hw_of(revoked)
        where = port.items.index(revoked)
        ids = [i.id if isinstance(i, Acked) else i.msg.id
               for i in port.items if isinstance(i, Acked | Deliver)]
        earlier = [i.id if isinstance(i, Acked) else i.msg.id
                   for i in port.items[:where] if isinstance(i, Acked | Deliver)]
        assert earlier == [i for i in ids if i <= at] and 0 < len(earlier) < len(ids)
    assert await store.token_version(mallory) == 1

    assert await log.set_banned(mallory, True)
    assert not await log.set_banned(mallory, True), "already banned"
    await flush(log)
    for port in (a, b):
        assert port.of(Banned) and all(x == Banned(mallory) for x in port.of(Banned))
    _, welcome = log.attach(RecordingPort())
    assert welcome.banned == [mallory] and welcome.versions == {mallory: 1}
    assert welcome.hw == log.hw
    assert await log.set_banned(mallory, False)
    await flush(log)
    assert a.of(Unbanned) == [Unbanned(mallory)] == b.of(Unbanned)
    assert log.attach(RecordingPort())[1].banned == []
    assert await store.banned_users() == []


async def test_a_new_group_is_announced_to_its_owners_ports_only(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    owner, other = await users(store, 2)
    log = await make_log()
    a1, a2, b = RecordingPort(), RecordingPort(), RecordingPort()
    for port in (a1, a2, b):
        attach(log, port)
    await online(log, a1, owner)
    await online(log, a2, owner)
    await online(log, b, other)
    gid = await log.create_group("g", owner)
    await flush(log)
    assert a1.of(Joined) == a2.of(Joined) == [Joined(owner, gid)]
    assert b.of(Joined) == []
    assert await store.joined_id(gid, owner) == 0
    assert set(log.presence.group_targets(gid)) == {a1.id, a2.id}


async def test_a_change_that_fails_raises_for_its_caller_and_the_writer_goes_on(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log()
    a = RecordingPort()
    attach(log, a)
    await online(log, a, alice)
    with pytest.raises(NotFoundError):
        await log.create_group("g", 99_999)
    with pytest.raises(NotFoundError):
        await log.join_group(12_345, alice)
    gid = await log.create_group("g", alice)
    with pytest.raises(NotFoundError):
        await log.join_group(gid, 99_999)
    log.submit(a.id, 1, gm(alice, gid))
    await flush(log)
    assert [x.id for x in a.of(Acked)] == [1]
    assert a.of(Joined) == [Joined(alice, gid)], "nothing announced for what failed"


# --- flush, close, failures, figures -------------------------------------------------------


async def test_close_commits_what_is_queued_then_refuses_changes(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log()
    a = RecordingPort()
    attach(log, a)
    await online(log, a, alice)
    for seq in range(1, 11):
        log.submit(a.id, seq, pm(alice, bob))
    await asyncio.wait_for(log.close(), 5 * UNIT)
    assert [x.seq for x in a.of(Acked)] == list(range(1, 11))
    assert await store.max_message_id() == 10 and log.committed == 10
    with pytest.raises(StoreUnavailable):
        await log.join_group(1, bob)


async def test_a_locked_store_refuses_the_batch_with_503_and_the_writer_goes_on(
    tmp_path: Path, store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log()
    a, b = RecordingPort(), RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, alice)
    await online(log, b, bob)
    # the store's writer gives up after 20 ms instead of 10 s
    await store._w.execute("PRAGMA busy_timeout = 20")
    other = sqlite3.connect(tmp_path / "chatd.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the file
        for seq in range(1, 4):
            log.submit(a.id, seq, pm(alice, bob, cid=f"c{seq}"))
        await flush(log)
        refused = a.of(Refused)
        assert [(r.seq, r.code) for r in refused] == [(1, ERR_BUSY), (2, ERR_BUSY), (3, ERR_BUSY)]
        assert a.of(Acked) == [] and b.of(Deliver) == []
        assert log.hw == 0 and log.batches == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    for seq in range(4, 7):  # the senders retry, same cids
        log.submit(a.id, seq, pm(alice, bob, cid=f"c{seq - 3}"))
    await flush(log)
    acks = a.of(Acked)
    assert [(x.seq, x.id, x.stored) for x in acks] == [(4, 1, True), (5, 2, True), (6, 3, True)]
    assert b.delivered() == [1, 2, 3]
    assert log.batches == 1 and await store.max_message_id() == 3


async def test_a_broken_store_refuses_the_batch_with_500_and_the_writer_goes_on(
    tmp_path: Path, store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log()
    a = RecordingPort()
    attach(log, a)
    await online(log, a, alice)
    other = sqlite3.connect(tmp_path / "chatd.db", isolation_level=None)
    try:
        other.execute("ALTER TABLE messages RENAME TO hidden")  # not transient: an error
        log.submit(a.id, 1, pm(alice, bob))
        await flush(log)
        [refused] = a.of(Refused)
        assert (refused.seq, refused.code) == (1, ERR_SERVER) and a.of(Acked) == []
    finally:
        other.execute("ALTER TABLE hidden RENAME TO messages")
        other.close()
    log.submit(a.id, 2, pm(alice, bob))
    await flush(log)
    assert [(x.seq, x.id) for x in a.of(Acked)] == [(2, 1)]


class BrokenPort(RecordingPort):
    """A shard's end of the bus whose socket broke: sending raises."""

    def send(self, items: list[AnyItem], hw: int) -> None:
        super().send(items, hw)
        raise ConnectionResetError("the shard is gone")


async def test_a_port_that_fails_to_send_costs_the_others_nothing(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob, carol = await users(store, 3)
    log = await make_log()
    a, broken, c = RecordingPort(), BrokenPort(), RecordingPort()
    for port in (a, broken, c):
        attach(log, port)
    await online(log, a, alice)
    await online(log, broken, bob)
    await online(log, c, carol)
    log.submit(a.id, 1, pm(alice, bob))
    log.submit(a.id, 2, pm(alice, carol))
    await flush(log)
    log.submit(a.id, 3, pm(alice, carol))
    await flush(log)
    assert [x.id for x in a.of(Acked)] == [1, 2, 3]
    assert broken.delivered() == [1] and c.delivered() == [2, 3]


async def test_figures_count_what_happened(
    store: SqliteStore, make_log: Callable[..., Awaitable[Log]]
) -> None:
    alice, bob = await users(store, 2)
    log = await make_log(batch_max=5)
    a, b = RecordingPort(), RecordingPort()
    attach(log, a)
    attach(log, b)
    await online(log, a, alice)
    await online(log, b, bob)
    for seq in range(1, 13):
        log.submit(a.id, seq, pm(alice, bob))
    assert log.figures()["queued"] == 12
    await flush(log)
    figures = log.figures()
    assert figures["committed"] == 12 and figures["queued"] == 0 and figures["hw"] == 12
    assert figures["batches"] == 3 == figures["batch_size"]["count"]
    assert figures["batch_size"]["sum"] == 12
    assert figures["batch_size"]["buckets"][-1] == [float("inf"), 3]
    assert figures["commit_seconds"]["count"] == 3
    assert figures["ports"] == 2 and figures["online_users"] == 2
    # cumulative buckets: 5, 5 and 2 messages
    buckets = dict((bound, n) for bound, n in figures["batch_size"]["buckets"])
    assert buckets[2] == 1 and buckets[5] == 3
