"""The SQLite store: schema, accounts, one batch per transaction, sync pages."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import TEST_PASSWORD_HASH

from chatd.errors import NotFoundError, StoreError, StoreUnavailable
from chatd.store import DUPLICATE, NO_RECEIVER, STORED
from chatd.store.sqlite import MIGRATIONS, SqliteStore
from chatd.wire import Message

Store = SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "chatd.db")
    yield s
    await s.close()


async def users(store: Store, n: int) -> list[int]:
    return [await store.create_user(f"1390000{i:04d}", TEST_PASSWORD_HASH) for i in range(n)]


def pm(src: int, dst: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=10, dstid=dst, media=1, content=content, cid=cid)


def gm(src: int, gid: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=11, dstid=gid, media=1, content=content, cid=cid)


async def test_open_creates_the_schema_in_wal_mode(tmp_path: Path) -> None:
    s = await SqliteStore.open(tmp_path / "sub" / "chatd.db")
    await s.close()
    db = sqlite3.connect(tmp_path / "sub" / "chatd.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"users", "friends", "communities", "members", "messages"} <= tables
    finally:
        db.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "chatd.db"
    await (await SqliteStore.open(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError):
        await SqliteStore.open(path)


async def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "chatd.db"
    s = await SqliteStore.open(path)
    uid = await s.create_user("1", TEST_PASSWORD_HASH)
    await s.close()
    s = await SqliteStore.open(path)
    try:
        assert await s.token_version(uid) == 0
    finally:
        await s.close()


async def test_users_and_duplicate_mobile(store: Store) -> None:
    a = await store.create_user("100", TEST_PASSWORD_HASH, "alice")
    b = await store.create_user("101", TEST_PASSWORD_HASH)
    assert 0 < a < b
    with pytest.raises(StoreError) as info:
        await store.create_user("100", TEST_PASSWORD_HASH)
    assert not isinstance(info.value, NotFoundError)
    with pytest.raises(NotFoundError):
        await store.token_version(9999)


async def test_groups_and_membership(store: Store) -> None:
    a, b = await users(store, 2)
    gid = await store.create_group("g", a)
    assert await store.user_groups(a) == {gid}
    assert await store.join_group(gid, b) is True
    assert await store.join_group(gid, b) is False
    assert await store.user_groups(b) == {gid}
    with pytest.raises(NotFoundError):
        await store.join_group(gid + 100, b)
    with pytest.raises(NotFoundError):
        await store.join_group(gid, 9999)
    with pytest.raises(NotFoundError):
        await store.create_group("g2", 9999)
    # a failed call leaves no transaction open: the next write works
    assert await store.create_group("g3", b) > gid


async def test_a_batch_gets_increasing_ids_and_one_ts(store: Store) -> None:
    a, b = await users(store, 2)
    msgs = [pm(a, b, f"m{i}", f"c{i}") for i in range(20)]
    assert await store.append(msgs) == [STORED] * 20
    ids = [m.id for m in msgs]
    assert ids == sorted(ids) and len(set(ids)) == 20 and ids[0] > 0
    assert len({m.ts for m in msgs}) == 1 and msgs[0].ts > 0
    stored = await store.get_messages(ids)
    assert [m.content for m in stored] == [f"m{i}" for i in range(20)]
    assert store.committed == 20
    more = [pm(b, a, "next")]
    await store.append(more)
    assert more[0].id == ids[-1] + 1


async def test_private_message_to_nobody_is_not_stored(store: Store) -> None:
    (a,) = await users(store, 1)
    msg = pm(a, 4242, cid="x")
    assert await store.append([msg]) == [NO_RECEIVER]
    assert msg.id == 0
    assert await store.max_message_id() == 0


async def test_same_cid_is_stored_once_across_batches(store: Store) -> None:
    a, b = await users(store, 2)
    first, again = pm(a, b, "first", "dup"), pm(a, b, "retry", "dup")
    assert await store.append([first]) == [STORED]
    assert await store.append([again]) == [DUPLICATE]
    assert (again.id, again.ts) == (first.id, first.ts)
    assert [m.content for m in await store.sync_page(b, 0, 1 << 62, 100)] == ["first"]


async def test_same_cid_is_stored_once_within_a_batch(store: Store) -> None:
    a, b = await users(store, 2)
    batch = [pm(a, b, f"try{i}", "dup") for i in range(3)]
    assert await store.append(batch) == [STORED, DUPLICATE, DUPLICATE]
    assert len({m.id for m in batch}) == 1
    assert len(await store.sync_page(b, 0, 1 << 62, 100)) == 1


async def test_a_retry_in_a_batch_with_new_messages(store: Store) -> None:
    """The unique index refuses the batch; it is written again with the look-up."""
    a, b = await users(store, 2)
    old = pm(a, b, "old", "k")
    await store.append([old])
    batch = [pm(a, b, "new1", "n1"), pm(a, b, "old again", "k"), pm(a, b, "new2", "n2")]
    assert await store.append(batch) == [STORED, DUPLICATE, STORED]
    assert batch[1].id == old.id
    assert [m.content for m in await store.sync_page(b, 0, 1 << 62, 100)] == [
        "old", "new1", "new2"]


async def test_same_cid_from_another_user_is_another_message(store: Store) -> None:
    a, b = await users(store, 2)
    assert await store.append([pm(a, b, cid="same"), pm(b, a, cid="same")]) == [STORED, STORED]


async def test_empty_cid_never_dedupes(store: Store) -> None:
    a, b = await users(store, 2)
    assert await store.append([pm(a, b), pm(a, b)]) == [STORED, STORED]


async def test_sqlite_errors_come_out_as_store_errors(store: Store, tmp_path: Path) -> None:
    """A database locked by another writer: StoreUnavailable (retry), nothing stored."""
    a, b = await users(store, 2)
    await store._w.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "chatd.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        msg = pm(a, b, "blocked")
        with pytest.raises(StoreUnavailable):
            await store.append([msg])
        assert msg.id == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.append([pm(a, b, "after")]) == [STORED]


async def test_a_read_only_store_reads_and_refuses_writes(store: Store, tmp_path: Path) -> None:
    a, b = await users(store, 2)
    await store.append([pm(a, b, "hello")])
    reader = await SqliteStore.open(tmp_path / "chatd.db", writable=False)
    try:
        assert [m.content for m in await reader.sync_page(b, 0, 1 << 62, 10)] == ["hello"]
        with pytest.raises(StoreError):
            await reader.append([pm(a, b, "no")])
    finally:
        await reader.close()
    with pytest.raises(StoreError):
        await SqliteStore.open(tmp_path / "absent.db", writable=False)


async def test_ban_and_leave(store: Store) -> None:
    a, b = await users(store, 2)
    assert await store.set_banned(b, True) is True
    assert await store.set_banned(b, True) is False
    assert await store.banned_users() == [b]
    assert await store.set_banned(b, False) is True
    assert await store.banned_users() == []
    with pytest.raises(NotFoundError):
        await store.set_banned(9999, True)
    gid = await store.create_group("g", a)
    await store.join_group(gid, b)
    assert await store.leave_group(gid, b) is True
    assert await store.leave_group(gid, b) is False
    assert await store.user_groups(b) == frozenset()


async def test_sync_page_is_only_the_users_conversations(store: Store) -> None:
    a, b, c, d = await users(store, 4)
    g_ab = await store.create_group("ab", a)
    await store.join_group(g_ab, b)
    g_cd = await store.create_group("cd", c)
    await store.join_group(g_cd, d)
    g_late = await store.create_group("late", c)
    sent = [pm(a, b, "a>b"), pm(b, a, "b>a"), pm(c, d, "c>d"), pm(d, c, "d>c"),
            gm(a, g_ab, "ab1"), gm(c, g_cd, "cd1"), gm(c, g_late, "before-join"),
            pm(b, b, "note to self")]
    await store.append(sent)
    await store.join_group(g_late, b)
    await store.append([gm(c, g_late, "after-join")])
    page = await store.sync_page(b, 0, 1 << 62, 100)
    assert [m.content for m in page] == ["a>b", "b>a", "ab1", "note to self", "after-join"]
    ids = [m.id for m in page]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_sync_page_bounds_and_limit(store: Store) -> None:
    a, b = await users(store, 2)
    msgs = [pm(a, b, f"m{i}") for i in range(10)]
    await store.append(msgs)
    ids = [m.id for m in msgs]
    first = await store.sync_page(b, 0, 1 << 62, 3)
    assert [m.id for m in first] == ids[:3]
    after = await store.sync_page(b, ids[2], 1 << 62, 3)
    assert [m.id for m in after] == ids[3:6]
    bounded = await store.sync_page(b, ids[2], ids[5], 100)
    assert [m.id for m in bounded] == ids[3:5]
    assert await store.sync_page(b, ids[-1], 1 << 62, 100) == []


async def test_stored_fields_come_back_intact(store: Store) -> None:
    a, b = await users(store, 2)
    sent = Message(userid=a, cmd=10, dstid=b, media=2, content="标题 🎉", pic="/p.png",
                   url="https://x/y", memo="memo", amount=-5, cid="c-1")
    await store.append([sent])
    (got,) = await store.sync_page(b, 0, 1 << 62, 10)
    assert got == sent and got.content == "标题 🎉" and got.amount == -5


async def test_token_versions_lists_only_revokers(store: Store, tmp_path: Path) -> None:
    a, b = await users(store, 2)
    db = sqlite3.connect(tmp_path / "chatd.db")
    db.execute("UPDATE users SET token_version = 3 WHERE id = ?", (b,))
    db.commit()
    db.close()
    assert await store.token_versions() == {b: 3}
    assert await store.token_version(a) == 0


async def test_a_folder_name_with_uri_characters_is_a_folder_name(tmp_path: Path) -> None:
    """The read-only connections open the file by URI: ``?`` and ``#`` in the
    data folder must not cut the path short."""
    path = tmp_path / "odd?mode=rw#folder" / "chatd.db"
    store = await SqliteStore.open(path)
    try:
        uid = await store.create_user("13700000001", TEST_PASSWORD_HASH)
        gid = await store.create_group("g", uid)
        assert await store.group_ids_of([uid]) == {uid: frozenset({gid})}
        reader = await SqliteStore.open(path, writable=False)
        try:
            assert await reader.group_ids_of([uid]) == {uid: frozenset({gid})}
        finally:
            await reader.close()
    finally:
        await store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd?mode=rw#folder"]
