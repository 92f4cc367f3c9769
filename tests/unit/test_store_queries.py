"""The SQLite store's message indexes and queries (migration 2, issue 10).

Sync and history walk the partitions of their id range (``id >> 12``) through
indexes that lead with the partition; these tests hold them to the answers of
the queries they replaced (``TODAY_*``, run on the same rows) and of a plain
Python model of the rows, check that each query uses the index it was written
for, and that a database made by migration 1 comes through migration 2 whole.
"""

from __future__ import annotations

import random
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TEST_PASSWORD_HASH

from chatd.store import BROADCAST, DUPLICATE, STORED, SYSTEM_USER
from chatd.store import sqlite as sqlite_store
from chatd.store.sqlite import (
    CID_LOOKUP_SQL,
    GROUP_HISTORY_SQL,
    MIGRATIONS,
    PARTITION_BITS,
    PRIVATE_HISTORY_SQL,
    SYNC_SQL,
    SqliteStore,
    cid_keys,
    row_to_message,
)
from chatd.wire import CMD_GROUP, CMD_PRIVATE, Message

TOP = 1 << 62
COLS = "id, userid, cmd, dstid, media, content, pic, url, memo, amount, cid, ts"

# --- the queries of migration 1, as they were before the partitions -------------------

TODAY_SYNC = f"""
    SELECT {COLS} FROM messages
     WHERE cmd = 10 AND dstid = :uid AND id > :after AND id < :before
    UNION ALL
    SELECT {COLS} FROM messages
     WHERE userid = :uid AND id > :after AND id < :before AND cmd = 10 AND dstid != :uid
    UNION ALL
    SELECT {COLS} FROM messages
     WHERE cmd = 10 AND dstid = 0 AND id > :after AND id < :before
    UNION ALL
    SELECT m.id, m.userid, m.cmd, m.dstid, m.media, m.content, m.pic, m.url, m.memo,
           m.amount, m.cid, m.ts
      FROM members g JOIN messages m
        ON m.cmd = 11 AND m.dstid = g.gid AND m.id > max(:after, g.joined_id)
       AND m.id < :before
     WHERE g.uid = :uid
    ORDER BY 1 LIMIT :limit
"""
TODAY_PRIVATE_HISTORY = (
    f"SELECT * FROM (SELECT {COLS} FROM messages "
    "WHERE userid = :a AND cmd = 10 AND dstid = :b AND id > :after AND id < :before "
    f"UNION ALL SELECT {COLS} FROM messages "
    "WHERE userid = :b AND cmd = 10 AND dstid = :a AND :a != :b "
    "AND id > :after AND id < :before) ORDER BY id {order} LIMIT :limit"
)
TODAY_GROUP_HISTORY = (
    f"SELECT {COLS} FROM messages WHERE cmd = 11 AND dstid = ? AND id > ? AND id < ? "
    "ORDER BY id {order} LIMIT ?"
)


def today_sync(db: sqlite3.Connection, uid: int, after: int, before: int,
               limit: int) -> list[Message]:
    rows = db.execute(TODAY_SYNC, {"uid": uid, "after": after, "before": before,
                                   "limit": limit})
    return [row_to_message(r) for r in rows]


def today_private_history(db: sqlite3.Connection, a: int, b: int, after: int, before: int,
                          limit: int, newest: bool) -> list[Message]:
    sql = TODAY_PRIVATE_HISTORY.format(order="DESC" if newest else "ASC")
    rows = [row_to_message(r) for r in db.execute(
        sql, {"a": a, "b": b, "after": after, "before": before, "limit": limit})]
    return rows[::-1] if newest else rows


def today_group_history(db: sqlite3.Connection, gid: int, after: int, before: int,
                        limit: int, newest: bool) -> list[Message]:
    sql = TODAY_GROUP_HISTORY.format(order="DESC" if newest else "ASC")
    rows = [row_to_message(r) for r in db.execute(sql, (gid, after, before, limit))]
    return rows[::-1] if newest else rows


# --- a plain model of the rows ------------------------------------------------------------


@dataclass
class Model:
    """What the store holds, kept beside it: the stored messages and the members."""

    rows: list[Message] = field(default_factory=list)
    members: dict[tuple[int, int], int] = field(default_factory=dict)  # (gid, uid) -> joined_id

    def sync(self, uid: int, after: int, before: int, limit: int) -> list[Message]:
        def mine(m: Message) -> bool:
            if m.cmd == CMD_PRIVATE:
                return m.dstid in (uid, BROADCAST) or m.userid == uid
            joined = self.members.get((m.dstid, uid))
            return joined is not None and m.id > joined

        return [m for m in self.rows if after < m.id < before and mine(m)][:limit]

    def private_history(self, a: int, b: int, after: int, before: int, limit: int,
                        newest: bool) -> list[Message]:
        found = [m for m in self.rows if after < m.id < before and m.cmd == CMD_PRIVATE
                 and {(m.userid, m.dstid)} & {(a, b), (b, a)}]
        return found[-limit:] if newest else found[:limit]

    def group_history(self, gid: int, after: int, before: int, limit: int,
                      newest: bool) -> list[Message]:
        found = [m for m in self.rows if after < m.id < before and m.cmd == CMD_GROUP
                 and m.dstid == gid]
        return found[-limit:] if newest else found[:limit]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "chatd.db")
    yield s
    await s.close()


def reader(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


async def random_history(store: SqliteStore, rng: random.Random,
                         n: int) -> tuple[Model, list[int], list[int]]:
    """About ``n`` messages over several partitions, through the store's own
    calls: private messages (to oneself too, to nobody too), broadcasts, group
    messages, retried cids; users who arrive late, members who join, leave and
    come back. The model follows every call's outcome."""
    model = Model()
    uids = [await store.create_user(f"1380000{i:04d}", TEST_PASSWORD_HASH) for i in range(6)]
    gids = [await store.create_group(f"g{i}", uids[i]) for i in range(3)]
    for i, gid in enumerate(gids):
        model.members[(gid, uids[i])] = 0
    sent = 0
    while sent < n:
        # between batches: someone new, a join, a leave
        r = rng.random()
        if r < 0.02:
            uids.append(await store.create_user(f"1381000{len(uids):04d}", TEST_PASSWORD_HASH))
        elif r < 0.06:
            gid, uid = rng.choice(gids), rng.choice(uids)
            if await store.join_group(gid, uid):
                model.members[(gid, uid)] = await store.max_message_id()
        elif r < 0.08:
            gid, uid = rng.choice(gids), rng.choice(uids)
            if await store.leave_group(gid, uid):
                del model.members[(gid, uid)]
        batch: list[Message] = []
        for _ in range(rng.choice((1, 20, 200, 700))):
            src = rng.choice(uids)
            k = rng.random()
            if k < 0.002:
                msg = Message(userid=SYSTEM_USER, cmd=CMD_PRIVATE, dstid=BROADCAST, media=1,
                              content="to all")
            elif k < 0.1:
                msg = Message(userid=src, cmd=CMD_GROUP, dstid=rng.choice(gids), media=1,
                              content=f"g{sent}", cid=f"c{rng.randrange(10**9)}")
            else:
                dst = src if k < 0.12 else 999_999 if k < 0.125 else rng.choice(uids)
                # a few favourite pairs, so that some conversations are dense
                if k > 0.6:
                    dst = uids[(uids.index(src) + 1) % 3] if src in uids[:3] else dst
                msg = Message(userid=src, cmd=CMD_PRIVATE, dstid=dst, media=2, content=f"p{sent}",
                              pic="/p.png", memo="m", amount=sent,
                              cid="" if k < 0.3 else f"{sent:012x}{rng.randrange(10**6)}")
            batch.append(msg)
            sent += 1
        if model.rows and rng.random() < 0.3:  # a retry of a stored message, same cid
            old = rng.choice(model.rows[-500:])
            if old.cid:
                batch.insert(rng.randrange(len(batch) + 1), Message(
                    userid=old.userid, cmd=old.cmd, dstid=old.dstid, media=1,
                    content="retry", cid=old.cid))
        outcomes = await store.append(batch)
        model.rows.extend(m for m, o in zip(batch, outcomes, strict=True) if o == STORED)
    # one more user after everything: their partitions start at the end
    uids.append(await store.create_user("13820000000", TEST_PASSWORD_HASH))
    return model, uids, gids


def bounds(rng: random.Random, top: int) -> tuple[int, int]:
    """(after, before): at partition edges, unbounded, empty, out of range."""
    edge = 1 << PARTITION_BITS

    def point() -> int:
        k = rng.random()
        if k < 0.3:
            return rng.randrange(-2, top + 3)
        if k < 0.7:
            return rng.randrange(0, top // edge + 2) * edge + rng.choice((-1, 0, 1))
        return rng.choice((-5, 0, 1, top, top + 1, TOP))

    a, b = point(), point()
    if rng.random() < 0.1:
        return a, b  # possibly after >= before: nothing
    return min(a, b), max(a, b)


@pytest.mark.parametrize(("first", "growth"), [(None, None), (1, 2)])
async def test_queries_answer_as_before_on_a_random_history(
        store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        first: int | None, growth: int | None) -> None:
    """Sync pages and both histories equal the model's answer and the answer of
    the migration-1 queries on the same file, for hundreds of ranges and limits
    (with the walk's own chunk sizes, and with small chunks that make it take
    many steps over the same history)."""
    if first is not None:
        monkeypatch.setattr(sqlite_store, "WALK_FIRST_PARTITIONS", first)
        monkeypatch.setattr(sqlite_store, "WALK_GROWTH", growth)
    rng = random.Random(20 if first is None else 21)
    model, uids, gids = await random_history(store, rng, 26_000)
    top = await store.max_message_id()
    assert top >> PARTITION_BITS >= 5 and len(model.rows) == top  # ids are dense
    assert await store.get_messages([m.id for m in model.rows[::97]]) == model.rows[::97]
    old = reader(tmp_path / "chatd.db")
    try:
        checked = 0
        for _ in range(400):
            uid = rng.choice(uids + [999_999])
            after, before = bounds(rng, top)
            limit = rng.choice((1, 7, 50, 500, 100_000))
            got = await store.sync_page(uid, after, before, limit)
            assert got == model.sync(uid, after, before, limit), (uid, after, before, limit)
            assert got == today_sync(old, uid, after, before, limit)
            checked += len(got)
        for _ in range(200):
            a, b = rng.choice(uids), rng.choice(uids[:4])
            after, before = bounds(rng, top)
            limit, newest = rng.choice((1, 20, 50, 1000)), rng.random() < 0.7
            got = await store.private_history(a, b, after, before, limit, newest)
            assert got == model.private_history(a, b, after, before, limit, newest), (
                a, b, after, before, limit, newest)
            assert got == today_private_history(old, a, b, after, before, limit, newest)
            checked += len(got)
        for _ in range(60):
            gid = rng.choice(gids)
            after, before = bounds(rng, top)
            limit, newest = rng.choice((1, 50, 1000)), rng.random() < 0.5
            got = await store.group_history(gid, after, before, limit, newest)
            assert got == model.group_history(gid, after, before, limit, newest)
            assert got == today_group_history(old, gid, after, before, limit, newest)
            checked += len(got)
        assert checked > 20_000  # the cases were not all empty
    finally:
        old.close()


def plan(db: sqlite3.Connection, sql: str, params: object) -> str:
    return "\n".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))


def assert_plans(db: sqlite3.Connection) -> None:
    walk = {"uid": 1, "a": 1, "b": 2, "after": 0, "before": 9000, "pa": 0, "pb": 2,
            "limit": 50}
    sync = plan(db, SYNC_SQL, walk)
    for index in ("messages_in (p=? AND dstid=? AND rowid>? AND rowid<?)",
                  "messages_out (p=? AND userid=? AND rowid>? AND rowid<?)",
                  "messages_broadcast (dstid=? AND rowid>? AND rowid<?)",
                  "messages_group (dstid=? AND rowid>? AND rowid<?)",
                  "g USING INDEX members_uid (uid=?)",
                  "INTEGER PRIMARY KEY (rowid=?)"):
        assert index in sync, sync
    for order in ("ASC", "DESC"):
        history = plan(db, PRIVATE_HISTORY_SQL.format(order=order), walk)
        assert history.count("messages_in (p=? AND dstid=? AND rowid>? AND rowid<?)") == 2
        group = plan(db, GROUP_HISTORY_SQL.format(order=order), (1, 0, 9000, 50))
        assert group == ("SEARCH messages USING INDEX messages_group "
                         "(dstid=? AND rowid>? AND rowid<?)")
    dedupe = plan(db, cid_keys(2) + CID_LOOKUP_SQL, (1, "a", 2, "b"))
    assert "messages_cid (cid=? AND userid=?)" in dedupe
    for sql in (sync, dedupe):
        assert "SCAN m\n" not in sql + "\n" and "SCAN messages" not in sql


async def test_each_query_searches_its_index_also_after_analyze(
        store: SqliteStore, tmp_path: Path) -> None:
    """The plans are pinned (INDEXED BY, CROSS JOIN): statistics from ANALYZE
    do not move them (an index on an expression did, on SQLite 3.40)."""
    rng = random.Random(5)
    await random_history(store, rng, 9000)
    db = sqlite3.connect(tmp_path / "chatd.db", isolation_level=None)
    try:
        assert_plans(db)
        db.execute("ANALYZE")
        assert_plans(db)
    finally:
        db.close()


async def test_a_row_with_a_wrong_partition_is_refused(store: SqliteStore,
                                                        tmp_path: Path) -> None:
    """A row that sync would never find (its ``p`` is not ``id >> 12``) is an
    error, not a silent loss."""
    a = await store.create_user("1", TEST_PASSWORD_HASH)
    insert = "INSERT INTO messages (id, userid, cmd, dstid, p, ts) VALUES (9000, ?, 10, ?, ?, 0)"
    db = sqlite3.connect(tmp_path / "chatd.db", isolation_level=None)
    try:
        for wrong in (0, 1, 3, None):
            with pytest.raises(sqlite3.IntegrityError):
                db.execute(insert, (a, a, wrong))
        db.execute(insert, (a, a, 9000 >> PARTITION_BITS))
    finally:
        db.close()
    assert [m.id for m in await store.sync_page(a, 0, TOP, 10)] == [9000]


async def test_a_late_user_still_gets_the_broadcasts_sent_before_it(
        store: SqliteStore) -> None:
    """A user's private rows start after its creation (``created_id``: its walk
    skips the partitions below), but broadcasts and the rest do not."""
    a, b = [await store.create_user(f"{i}", TEST_PASSWORD_HASH) for i in range(2)]
    early = Message(userid=SYSTEM_USER, cmd=CMD_PRIVATE, dstid=BROADCAST, media=1,
                    content="early")
    await store.append([early])
    await store.append([Message(userid=a, cmd=CMD_PRIVATE, dstid=b, media=1, content="x")
                        for _ in range(3 << PARTITION_BITS)])
    late = await store.create_user("late", TEST_PASSWORD_HASH)
    hello = Message(userid=a, cmd=CMD_PRIVATE, dstid=late, media=1, content="hello")
    await store.append([hello])
    assert [m.content for m in await store.sync_page(late, 0, TOP, 10)] == ["early", "hello"]
    assert [m.content for m in await store.private_history(late, a, 0, TOP, 10, True)] == [
        "hello"]


# --- migration 2 on a database made by migration 1 ------------------------------------------


def migration_1_database(path: Path, rng: random.Random) -> None:
    """A file as chatd made it before migration 2, with users, groups and
    ~10k messages over three partitions."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("BEGIN")
    db.executemany("INSERT INTO users (id, mobile, passwd, created_ms) VALUES (?, ?, 'x', 0)",
                   [(u, f"m{u}") for u in range(1, 9)])
    db.executemany("INSERT INTO communities (id, name, ownerid, created_ms) VALUES (?, 'g', 1, 0)",
                   [(1,), (2,)])
    rows = []
    for i in range(1, 10_001):
        src = rng.randint(1, 8)
        k = rng.random()
        if k < 0.001:
            row = (i, 0, 10, 0, "all", None)
        elif k < 0.1:
            row = (i, src, 11, rng.randint(1, 2), f"g{i}", f"cid{i}")
        else:
            row = (i, src, 10, rng.randint(1, 8), f"p{i}", f"cid{i}" if k < 0.8 else None)
        rows.append(row)
    db.executemany("INSERT INTO messages (id, userid, cmd, dstid, media, content, cid, ts) "
                   "VALUES (?, ?, ?, ?, 1, ?, ?, 1700000000000)", rows)
    db.executemany("INSERT INTO members (gid, uid, joined_id, created_ms) VALUES (?, ?, ?, 0)",
                   [(1, 1, 0), (1, 2, 3000), (2, 2, 0), (2, 5, 9000), (1, 7, 5000)])
    db.execute("COMMIT")
    db.close()


async def test_a_migration_tells_systemd_the_start_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 2 rebuilds the messages table before READY=1: under systemd it
    extends the start timeout while it runs; a start with nothing to migrate
    says nothing."""
    path = tmp_path / "chatd.db"
    migration_1_database(path, random.Random(3))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        store = await SqliteStore.open(path)
        await store.close()
        said = sock.recv(200).decode().split("\n")
        assert said == ["EXTEND_TIMEOUT_USEC=60000000",
                        "STATUS=migrating the database schema to 2"]
        store = await SqliteStore.open(path)
        await store.close()
        with pytest.raises(BlockingIOError):
            sock.recv(200)


async def test_migration_2_keeps_every_row_and_every_answer(tmp_path: Path) -> None:
    path = tmp_path / "chatd.db"
    rng = random.Random(9)
    migration_1_database(path, rng)
    db = reader(path)
    before_rows = db.execute(f"SELECT {COLS} FROM messages ORDER BY id").fetchall()
    (with_cid,) = db.execute(
        "SELECT min(id) FROM messages WHERE cid IS NOT NULL AND id > 5000").fetchone()
    cases = [(u, after, rng.choice((10, 500, 10_000)))
             for u in range(1, 9) for after in (0, 4095, 4096, 7000, 9999)]
    answers = [today_sync(db, u, after, TOP, limit) for u, after, limit in cases]
    histories = [today_private_history(db, a, b, 0, TOP, 50, True)
                 for a in range(1, 9) for b in (1, 2)]
    db.close()

    store = await SqliteStore.open(path)
    try:
        db = reader(path)
        try:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
            assert db.execute(f"SELECT {COLS} FROM messages ORDER BY id").fetchall() == before_rows
            assert db.execute("SELECT count(*) FROM messages WHERE p != id >> ?",
                              (PARTITION_BITS,)).fetchone() == (0,)
            indexes = {r[0]: r[1] for r in db.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'messages'")}
            assert set(indexes) == {"messages_cid", "messages_in", "messages_out",
                                    "messages_group", "messages_broadcast"}
            assert "messages(cid, userid)" in indexes["messages_cid"]
            assert db.execute("SELECT DISTINCT created_id FROM users").fetchall() == [(0,)]
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert_plans(db)
        finally:
            db.close()
        for (u, after, limit), want in zip(cases, answers, strict=True):
            assert await store.sync_page(u, after, TOP, limit) == want
        got = [await store.private_history(a, b, 0, TOP, 50, True)
               for a in range(1, 9) for b in (1, 2)]
        assert got == histories
        # a retry of a message stored before the migration gets its id back
        (old,) = await store.get_messages([with_cid])
        retry = Message(userid=old.userid, cmd=old.cmd, dstid=old.dstid, media=1,
                        content="again", cid=old.cid)
        new = Message(userid=1, cmd=CMD_PRIVATE, dstid=2, media=1, content="new")
        assert await store.append([retry, new]) == [DUPLICATE, STORED]
        assert (retry.id, new.id) == (with_cid, 10_001)
        assert [m.content for m in await store.sync_page(2, 10_000, TOP, 10)] == ["new"]
    finally:
        await store.close()
