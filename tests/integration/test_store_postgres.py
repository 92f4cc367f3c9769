"""The PostgreSQL store's own promises: migrations, the chain, faults.

Several ``PostgresStore`` instances on one database stand for several nodes
(each has its own pool, so their transactions really race in the server).
The server is the session's throwaway cluster (``pg_server``); the fault
tests stop, restart and kill it, with ``synchronous_commit=on``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from conftest import TEST_PASSWORD_HASH, UNIT
from pg_helpers import PgServer

from chatd.errors import NotFoundError, StoreError, StoreUnavailable
from chatd.store import (
    DUPLICATE,
    EVENT_BAN,
    EVENT_JOIN,
    EVENT_LEAVE,
    EVENT_REVOKE,
    EVENT_UNBAN,
    NO_RECEIVER,
    STORED,
    ChainStore,
    Event,
)
from chatd.store.postgres import MIGRATIONS, PostgresStore, _translate
from chatd.wire import CMD_GROUP, CMD_PRIVATE, Message

TOP = 1 << 62


@pytest.fixture
async def opened(pg_dsn: str) -> AsyncIterator[Callable[..., Awaitable[PostgresStore]]]:
    """Open ``PostgresStore``s on the test's database; all closed at teardown."""
    stores: list[PostgresStore] = []

    async def open_one(**kwargs: Any) -> PostgresStore:
        s = await PostgresStore.open(pg_dsn, **kwargs)
        stores.append(s)
        return s

    yield open_one
    for s in stores:
        await s.close()


async def users(store: PostgresStore, n: int, prefix: str = "u") -> list[int]:
    return [await store.create_user(f"{prefix}{i}", TEST_PASSWORD_HASH) for i in range(n)]


def pm(src: int, dst: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=CMD_PRIVATE, dstid=dst, media=1, content=content, cid=cid)


def gm(src: int, gid: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=CMD_GROUP, dstid=gid, media=1, content=content, cid=cid)


async def whole_chain(store: PostgresStore) -> list[Message | Event]:
    return await store.chain_range(0, await store.head(), 1 << 30)


# --- schema and migrations -----------------------------------------------------------


async def test_it_is_a_chain_store(opened: Callable[..., Awaitable[PostgresStore]]) -> None:
    store: ChainStore = await opened()
    assert await store.head() == 0 and store.last_span is None and store.last_event is None


async def test_open_migrates_once(pg_dsn: str) -> None:
    s = await PostgresStore.open(pg_dsn)
    uid = await s.create_user("1", TEST_PASSWORD_HASH)
    await s.close()
    s = await PostgresStore.open(pg_dsn)
    try:
        assert await s.token_version(uid) == 0
    finally:
        await s.close()
    con = await asyncpg.connect(pg_dsn)
    try:
        rows = await con.fetch("SELECT version FROM schema_version ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
        assert await con.fetchval("SELECT last FROM chain_head") == 0
    finally:
        await con.close()


async def test_a_newer_schema_or_none_is_refused(pg_dsn: str) -> None:
    with pytest.raises(StoreError) as info:
        await PostgresStore.open(pg_dsn, migrate=False)
    assert not isinstance(info.value, StoreUnavailable)
    await (await PostgresStore.open(pg_dsn)).close()
    await (await PostgresStore.open(pg_dsn, migrate=False)).close()
    con = await asyncpg.connect(pg_dsn)
    try:
        await con.execute("INSERT INTO schema_version VALUES ($1, 0)", len(MIGRATIONS) + 1)
    finally:
        await con.close()
    with pytest.raises(StoreError, match="newer"):
        await PostgresStore.open(pg_dsn)
    with pytest.raises(StoreError):
        await PostgresStore.open(pg_dsn, migrate=False)


async def test_nodes_opening_at_once_migrate_once(pg_dsn: str) -> None:
    """Eight opens race on an empty database: the migration lock lets one
    migrate; every other waits, then finds the schema there."""
    stores = await asyncio.gather(*(PostgresStore.open(pg_dsn) for _ in range(8)))
    try:
        uid = await stores[0].create_user("1", TEST_PASSWORD_HASH)
        for s in stores:
            assert await s.user_by_id(uid) is not None
        con = await asyncpg.connect(pg_dsn)
        try:
            rows = await con.fetch("SELECT version FROM schema_version ORDER BY version")
            assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
            # the lock is released: nobody holds an advisory lock any more
            locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            assert await con.fetchval(locks) == 0
        finally:
            await con.close()
    finally:
        for s in stores:
            await s.close()


async def test_unreachable_and_refusing_servers(pg_server: PgServer, pg_dsn: str) -> None:
    """Nobody listening: StoreUnavailable (retry later). A database that does not
    exist: StoreError (retrying will not help)."""
    with pytest.raises(StoreUnavailable):
        await PostgresStore.open(
            f"postgresql://postgres@127.0.0.1:{_dead_port()}/x", connect_timeout_s=5 * UNIT
        )
    with pytest.raises(StoreError) as info:
        await PostgresStore.open(pg_server.dsn("no_such_database"))
    assert not isinstance(info.value, StoreUnavailable)


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_too_many_connections_is_unavailable(pg_server: PgServer, pg_dsn: str) -> None:
    """A role at its connection limit: StoreUnavailable (retry), not a plain error."""
    await (await PostgresStore.open(pg_dsn)).close()
    role = pg_dsn.rsplit("/", 1)[1] + "_app"
    pg_server.psql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    try:
        dsn = pg_dsn.replace("postgres@", f"{role}@")
        holder = await asyncpg.connect(dsn)
        try:
            with pytest.raises(StoreUnavailable, match="TooManyConnections"):
                await PostgresStore.open(dsn, migrate=False)
        finally:
            await holder.close()
    finally:
        pg_server.psql(f"DROP ROLE {role}")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.exceptions.SerializationError, StoreUnavailable),
        (asyncpg.exceptions.DeadlockDetectedError, StoreUnavailable),
        (asyncpg.exceptions.DiskFullError, StoreUnavailable),
        (asyncpg.exceptions.OutOfMemoryError, StoreUnavailable),
        (asyncpg.exceptions.TooManyConnectionsError, StoreUnavailable),
        (asyncpg.exceptions.AdminShutdownError, StoreUnavailable),
        (asyncpg.exceptions.CannotConnectNowError, StoreUnavailable),
        (asyncpg.exceptions.ConnectionFailureError, StoreUnavailable),
        (asyncpg.exceptions.LockNotAvailableError, StoreUnavailable),
        (asyncpg.exceptions.UniqueViolationError, StoreError),
        (asyncpg.exceptions.UndefinedTableError, StoreError),
        (asyncpg.exceptions.NoDataFoundError, NotFoundError),
        (asyncpg.exceptions.DataError, StoreError),
        (asyncpg.InterfaceError, StoreUnavailable),  # e.g. "connection is closed"
        (asyncpg.exceptions.ClientConfigurationError, StoreError),
    ],
)
def test_which_errors_mean_retry(error: type[Exception], expected: type[StoreError]) -> None:
    """The SQLSTATE classes the real-server tests cannot all provoke (a full
    disk, a serialization failure) map as documented."""
    mine = _translate(error("boom"))
    assert type(mine) is expected
    assert type(_translate(ConnectionRefusedError())) is StoreUnavailable
    assert type(_translate(TimeoutError())) is StoreUnavailable
    assert _translate(KeyError()) is None


async def test_a_value_out_of_range_is_a_store_error(
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    store = await opened()
    a, b = await users(store, 2)
    msg = Message(userid=a, cmd=CMD_PRIVATE, dstid=b, media=1, content="x", amount=1 << 70)
    with pytest.raises(StoreError) as info:
        await store.append([msg])
    assert not isinstance(info.value, StoreUnavailable)
    assert (msg.id, msg.ts) == (0, 0)
    assert await store.append([pm(a, b)]) == [STORED]


async def test_statements_are_prepared_once_whatever_the_batch_size(
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """Batches, id lists and user lists of every length reuse one prepared
    statement each (arrays, not one placeholder per item)."""
    store = await opened(max_size=1)
    a, b = await users(store, 2)
    ids: list[int] = []
    count_sql = "SELECT count(*) FROM pg_prepared_statements"
    counts = []
    for n in range(1, 41):
        batch = [pm(a, b, cid=f"{n}-{i}") for i in range(n)]
        await store.append(batch)
        ids.extend(m.id for m in batch)
        assert len(await store.get_messages(ids[-n:])) == n
        await store.group_ids_of(list(range(1, n + 1)))
        counts.append(await store._pool.fetchval(count_sql))
    assert counts[1:] == [counts[0]] * 39


# --- the chain -----------------------------------------------------------------------


async def test_positions_spans_and_events(opened: Callable[..., Awaitable[PostgresStore]]) -> None:
    store = await opened()
    a, b = await users(store, 2)
    batch = [pm(a, b, "1", "k1"), pm(a, 4242, "nobody"), pm(a, b, "1 again", "k1"), pm(a, b, "2")]
    assert await store.append(batch) == [STORED, NO_RECEIVER, DUPLICATE, STORED]
    assert store.last_span == (0, 4) and store.last_event is None
    assert [m.id for m in batch] == [1, 0, 1, 4]  # positions 2 and 3 are gaps
    assert await store.head() == 4
    assert await store.append([]) == [] and store.last_span == (4, 4)

    gid = await store.create_group("g", a)
    assert store.last_span == (4, 5) and store.last_event == Event(5, EVENT_JOIN, a, gid)
    assert await store.join_group(gid, b) is True
    assert store.last_event == Event(6, EVENT_JOIN, b, gid) and store.last_span == (5, 6)
    assert await store.joined_id(gid, b) == 6
    assert await store.join_group(gid, b) is False
    assert store.last_event is None and store.last_span is None
    assert await store.head() == 6
    assert await store.bump_token_version(b) == 1
    assert store.last_event == Event(7, EVENT_REVOKE, b, version=1)
    assert await store.set_banned(b, True) is True
    assert store.last_event == Event(8, EVENT_BAN, b)
    assert await store.set_banned(b, True) is False and store.last_event is None
    assert await store.set_banned(b, False) is True
    assert store.last_event == Event(9, EVENT_UNBAN, b)
    assert await store.leave_group(gid, b) is True
    assert store.last_event == Event(10, EVENT_LEAVE, b, gid)
    assert await store.leave_group(gid, b) is False and store.last_event is None
    with pytest.raises(NotFoundError):
        await store.join_group(gid, 9999)
    with pytest.raises(NotFoundError):
        await store.bump_token_version(9999)
    assert await store.head() == 10  # nothing changed, no position taken
    after = [gm(a, gid, "g1")]
    await store.append(after)
    assert after[0].id == 11 and await store.max_message_id() == 11

    chain = await whole_chain(store)
    assert [x.id for x in chain] == [1, 4, 5, 6, 7, 8, 9, 10, 11]
    assert chain[0] == batch[0] and chain[1] == batch[3] and chain[-1] == after[0]
    assert chain[2:8] == [
        Event(5, EVENT_JOIN, a, gid),
        Event(6, EVENT_JOIN, b, gid),
        Event(7, EVENT_REVOKE, b, version=1),
        Event(8, EVENT_BAN, b),
        Event(9, EVENT_UNBAN, b),
        Event(10, EVENT_LEAVE, b, gid),
    ]
    assert [x.id for x in await store.chain_range(4, 9, 3)] == [5, 6, 7]
    assert [x.id for x in await store.chain_range(10, 1 << 40, 100)] == [11]


async def test_two_nodes_racing_build_one_chain(
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """Two stores append 50 batches each at once, while a third makes routing
    changes and a fourth polls the head and reads the chain up to it.

    Spans never overlap and follow each other; every id is at most the head;
    the chain holds every stored message and event exactly once, in id order;
    and the poller, reading only (the head it last saw, the head now], still
    got everything: no id ever committed below a head it had seen
    (invariant 2).
    """
    node1, node2, admin, reader = [await opened() for _ in range(4)]
    uids = await users(node1, 20)
    gid = await admin.create_group("g", uids[0])
    rng = random.Random(7)
    assert admin.last_span == (0, 1) and admin.last_event is not None
    spans: list[tuple[int, int]] = [admin.last_span]
    events: list[Event] = [admin.last_event]
    stored: dict[int, Message] = {}
    done = asyncio.Event()

    async def writer(store: PostgresStore, name: str) -> None:
        for k in range(50):
            batch = []
            for i in range(rng.randint(1, 30)):
                src, dst = rng.sample(uids, 2)
                batch.append(
                    gm(src, gid, f"{name}{k}.{i}")
                    if i % 3 == 0
                    else pm(src, dst, f"{name}{k}.{i}", f"{name}{k}.{i}")
                )
            outcomes = await store.append(batch)
            assert store.last_span is not None
            spans.append(store.last_span)
            assert outcomes == [STORED] * len(batch)
            for m in batch:
                stored[m.id] = m

    async def changer() -> None:
        for uid in uids[1:]:
            await admin.join_group(gid, uid)
            note()
            await admin.bump_token_version(uid)
            note()
            await admin.leave_group(gid, uid)
            note()

    def note() -> None:
        assert admin.last_span is not None and admin.last_event is not None
        spans.append(admin.last_span)
        events.append(admin.last_event)

    async def poller() -> list[int]:
        seen, got = 0, []
        while True:
            finished = done.is_set()
            head = await reader.head()
            assert head >= seen
            if head > seen:
                got.extend(x.id for x in await reader.chain_range(seen, head, 1 << 30))
                seen = head
            if finished:
                return got
            await asyncio.sleep(0)

    polling = asyncio.ensure_future(poller())
    await asyncio.gather(writer(node1, "a"), writer(node2, "b"), changer())
    done.set()
    polled = await polling

    head = await reader.head()
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == head
    for before, after in zip(spans, spans[1:], strict=False):
        assert after[0] == before[1], (before, after)  # chained: no overlap, no hole
    chain = await whole_chain(reader)
    ids = [x.id for x in chain]
    assert ids == sorted(set(ids)) and ids[-1] <= head
    assert [x for x in chain if isinstance(x, Message)] == [stored[i] for i in sorted(stored)]
    assert [x for x in chain if isinstance(x, Event)] == sorted(events, key=lambda e: e.id)
    assert len(events) == 1 + 3 * 19
    assert polled == ids


async def test_the_same_message_from_two_nodes_is_stored_once(
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """A retry that reaches two nodes at once: both batches carry the same
    (userid, cid)s; each is stored once, and both nodes answer with its id."""
    node1, node2 = await opened(), await opened()
    a, b = await users(node1, 2)
    for rnd in range(20):
        one = [pm(a, b, f"r{rnd}-{i}", f"r{rnd}-{i}") for i in range(10)]
        two = [pm(a, b, f"r{rnd}-{i}", f"r{rnd}-{i}") for i in range(10)]
        out1, out2 = await asyncio.gather(node1.append(one), node2.append(two))
        for i in range(10):
            assert sorted([out1[i], out2[i]]) == [STORED, DUPLICATE]
            assert one[i].id == two[i].id and one[i].ts == two[i].ts and one[i].id > 0
    chain = await whole_chain(node1)
    cids = [x.cid for x in chain if isinstance(x, Message)]
    assert len(cids) == 200 == len(set(cids))


async def test_a_join_is_ordered_with_the_messages_of_other_nodes(
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """Group messages race a join from another node: the member's sync is
    exactly the group's messages after the join's position."""
    node1, node2 = await opened(), await opened()
    owner, member = await users(node1, 2)
    gid = await node1.create_group("g", owner)
    sent: list[Message] = []

    async def talk() -> None:
        for k in range(40):
            batch = [gm(owner, gid, f"{k}.{i}") for i in range(5)]
            await node1.append(batch)
            sent.extend(batch)

    async def join() -> Event:
        await asyncio.sleep(0)
        for _ in range(3):  # some batches commit first
            await node2.head()
        assert await node2.join_group(gid, member)
        assert node2.last_event is not None
        return node2.last_event

    _, event = await asyncio.gather(talk(), join())
    assert await node2.joined_id(gid, member) == event.id
    expected = [m.content for m in sent if m.id > event.id]
    page = await node2.sync_page(member, 0, TOP, 1000)
    assert [m.content for m in page] == expected
    chain = await whole_chain(node2)
    assert event in chain


# --- faults --------------------------------------------------------------------------


async def _in_thread(fn: Callable[[], None]) -> None:
    """A blocking server command, with the event loop free meanwhile (so the
    pool sees its connections close)."""
    await asyncio.wait_for(asyncio.to_thread(fn), 120 * UNIT)


@pytest.mark.slow
async def test_a_restart_under_a_running_store(
    pg_server: PgServer,
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """PostgreSQL stops: every call raises StoreUnavailable and a batch gets no
    ids; it starts again: the same store works on its next call, and the
    chain holds exactly what was acked."""
    store = await opened(max_size=4)
    a, b = await users(store, 2)
    gid = await store.create_group("g", a)
    acked = [pm(a, b, f"before{i}", f"before{i}") for i in range(10)]
    assert await store.append(acked) == [STORED] * 10
    head = await store.head()

    await _in_thread(pg_server.stop)
    refused = [pm(a, b, f"during{i}", f"during{i}") for i in range(10)]
    with pytest.raises(StoreUnavailable):
        await store.append(refused)
    assert all(m.id == 0 and m.ts == 0 for m in refused)
    calls: list[Callable[[], Awaitable[Any]]] = [
        store.head,
        lambda: store.sync_page(b, 0, TOP, 10),
        lambda: store.join_group(gid, b),
        lambda: store.create_user("x", TEST_PASSWORD_HASH),
        store.token_versions,
        lambda: store.chain_range(0, TOP, 10),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            await call()

    await _in_thread(pg_server.start)
    assert await store.head() == head  # nothing half-written, nothing lost
    later = [pm(a, b, "after", "after")]
    assert await store.append(later) == [STORED]
    assert later[0].id == head + 1
    page = await store.sync_page(b, 0, TOP, 100)
    assert [m.content for m in page] == [m.content for m in acked] + ["after"]
    # a retry of what was refused is stored now, once
    assert await store.append(refused) == [STORED] * 10

    # a restart between two calls: the next call already works
    await _in_thread(pg_server.restart)
    assert await store.sync_page(b, 0, TOP, 100) == page + refused
    assert await store.join_group(gid, b) is True


@pytest.mark.slow
async def test_a_batch_in_flight_when_the_server_dies(
    pg_server: PgServer,
    opened: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """``pg_ctl stop -m immediate`` while two stores append without pause: a
    batch reported stored is there after recovery, with its ids; a batch that
    raised is there entirely or not at all, and its retry says which."""
    node1, node2 = await opened(), await opened()
    uids = await users(node1, 10)
    results: list[tuple[list[Message], bool]] = []
    progress = asyncio.Event()
    killed = asyncio.Event()

    async def writer(store: PostgresStore, name: str) -> None:
        k = 0
        while True:
            batch = [
                pm(uids[i % 10], uids[(i + 1) % 10], f"{name}{k}.{i}", f"{name}{k}.{i}")
                for i in range(20)
            ]
            k += 1
            try:
                outcomes = await store.append(batch)
            except StoreUnavailable:
                results.append((batch, False))
                await killed.wait()
                return
            assert outcomes == [STORED] * 20
            results.append((batch, True))
            if len(results) >= 40:
                progress.set()

    async def kill() -> None:
        await asyncio.wait_for(progress.wait(), 60 * UNIT)
        await _in_thread(pg_server.kill)
        killed.set()

    await asyncio.gather(writer(node1, "a"), writer(node2, "b"), kill())
    await _in_thread(pg_server.start)

    failed = [batch for batch, ok in results if not ok]
    chain = await whole_chain(node1)
    present = {(m.userid, m.cid): m for m in chain if isinstance(m, Message)}
    acked = 0
    for batch, ok in results:
        if ok:
            acked += len(batch)
            for m in batch:
                assert present.get((m.userid, m.cid)) == m, f"acked, then lost: {m}"
    landed = 0
    for batch in failed:
        there = [(m.userid, m.cid) in present for m in batch]
        assert all(there) or not any(there), there  # never half a batch
        outcomes = await node2.append(batch)
        assert outcomes == [DUPLICATE if there[0] else STORED] * len(batch)
        landed += len(batch) if there[0] else 0
    assert len(present) == acked + landed
