"""The store: schema, accounts, group commit outcomes, sync pages."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PASSWORD_HASH, UNIT

from chatd.errors import NotFoundError, StoreError
from chatd.store import DUPLICATE, MIGRATIONS, NO_RECEIVER, STORED, Store
from chatd.wire import Message


class Committed:
    """Collects what the writer reports, one entry per message."""

    def __init__(self) -> None:
        self.outcomes: asyncio.Queue[tuple[Message, Any, int]] = asyncio.Queue()
        self.batches: list[int] = []

    def __call__(self, outcomes: list[tuple[Message, Any, int]]) -> None:
        self.batches.append(len(outcomes))
        for item in outcomes:
            self.outcomes.put_nowait(item)

    async def take(self, n: int) -> list[tuple[Message, Any, int]]:
        async def go() -> list[tuple[Message, Any, int]]:
            return [await self.outcomes.get() for _ in range(n)]
        return await asyncio.wait_for(go(), 5 * UNIT)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "chatd.db")
    yield s
    await s.close()


@pytest.fixture
async def committed(store: Store) -> Committed:
    c = Committed()
    store.start_writer(c)
    return c


async def users(store: Store, n: int) -> list[int]:
    return [await store.create_user(f"1390000{i:04d}", TEST_PASSWORD_HASH) for i in range(n)]


def pm(src: int, dst: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=10, dstid=dst, media=1, content=content, cid=cid)


def gm(src: int, gid: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=11, dstid=gid, media=1, content=content, cid=cid)


async def test_open_creates_the_schema_in_wal_mode(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "sub" / "chatd.db")
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
    await (await Store.open(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError):
        await Store.open(path)


async def test_reopen_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "chatd.db"
    s = await Store.open(path)
    uid = await s.create_user("1", TEST_PASSWORD_HASH)
    await s.close()
    s = await Store.open(path)
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


async def test_group_commit_assigns_increasing_ids_and_ts(store: Store,
                                                         committed: Committed) -> None:
    a, b = await users(store, 2)
    msgs = [pm(a, b, f"m{i}", f"c{i}") for i in range(20)]
    for i, m in enumerate(msgs):
        assert store.submit(m, i)
    out = await committed.take(20)
    assert [ctx for _, ctx, _ in out] == list(range(20))
    assert all(status == STORED for _, _, status in out)
    ids = [m.id for m, _, _ in out]
    assert ids == sorted(ids) and len(set(ids)) == 20 and ids[0] > 0
    assert all(m.ts > 0 for m, _, _ in out)
    stored = await store.get_messages(ids)
    assert [m.content for m in stored] == [f"m{i}" for i in range(20)]
    assert store.committed == 20


async def test_private_message_to_nobody_is_not_stored(store: Store,
                                                       committed: Committed) -> None:
    (a,) = await users(store, 1)
    store.submit(pm(a, 4242, cid="x"), None)
    ((msg, _, status),) = await committed.take(1)
    assert status == NO_RECEIVER and msg.id == 0
    assert await store.max_message_id() == 0


async def test_same_cid_is_stored_once_across_batches(store: Store,
                                                      committed: Committed) -> None:
    a, b = await users(store, 2)
    store.submit(pm(a, b, "first", "dup"), 1)
    ((first, _, s1),) = await committed.take(1)
    store.submit(pm(a, b, "retry", "dup"), 2)
    ((again, _, s2),) = await committed.take(1)
    assert (s1, s2) == (STORED, DUPLICATE)
    assert (again.id, again.ts) == (first.id, first.ts)
    assert [m.content for m in await store.sync_page(b, 0, 1 << 62, 100)] == ["first"]


async def test_same_cid_is_stored_once_within_a_batch(store: Store,
                                                      committed: Committed) -> None:
    a, b = await users(store, 2)
    for i in range(3):
        store.submit(pm(a, b, f"try{i}", "dup"), i)  # queued together: one batch
    out = await committed.take(3)
    assert [s for _, _, s in out] == [STORED, DUPLICATE, DUPLICATE]
    assert len({m.id for m, _, _ in out}) == 1
    assert len(await store.sync_page(b, 0, 1 << 62, 100)) == 1


async def test_same_cid_from_another_user_is_another_message(store: Store,
                                                             committed: Committed) -> None:
    a, b = await users(store, 2)
    store.submit(pm(a, b, cid="same"), None)
    store.submit(pm(b, a, cid="same"), None)
    out = await committed.take(2)
    assert [s for _, _, s in out] == [STORED, STORED]


async def test_empty_cid_never_dedupes(store: Store, committed: Committed) -> None:
    a, b = await users(store, 2)
    store.submit(pm(a, b), None)
    store.submit(pm(a, b), None)
    out = await committed.take(2)
    assert [s for _, _, s in out] == [STORED, STORED]


async def test_a_full_queue_refuses(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "chatd.db", queue_max=2)
    try:
        assert s.submit(pm(1, 2), None) and s.submit(pm(1, 2), None)
        assert not s.submit(pm(1, 2), None)
    finally:
        await s.close()


async def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "chatd.db"
    s = await Store.open(path)
    a = await s.create_user("1", TEST_PASSWORD_HASH)
    b = await s.create_user("2", TEST_PASSWORD_HASH)
    c = Committed()
    s.start_writer(c)
    for i in range(50):
        s.submit(pm(a, b, f"q{i}"), None)
    await s.close()
    assert sum(c.batches) == 50
    s = await Store.open(path)
    try:
        page = await s.sync_page(b, 0, 1 << 62, 100)
        assert [m.content for m in page] == [f"q{i}" for i in range(50)]
    finally:
        await s.close()


async def test_sync_page_is_only_the_users_conversations(store: Store,
                                                         committed: Committed) -> None:
    a, b, c, d = await users(store, 4)
    g_ab = await store.create_group("ab", a)
    await store.join_group(g_ab, b)
    g_cd = await store.create_group("cd", c)
    await store.join_group(g_cd, d)
    g_late = await store.create_group("late", c)
    sent = [pm(a, b, "a>b"), pm(b, a, "b>a"), pm(c, d, "c>d"), pm(d, c, "d>c"),
            gm(a, g_ab, "ab1"), gm(c, g_cd, "cd1"), gm(c, g_late, "before-join"),
            pm(b, b, "note to self")]
    for m in sent:
        store.submit(m, None)
    await committed.take(len(sent))
    await store.join_group(g_late, b)
    store.submit(gm(c, g_late, "after-join"), None)
    await committed.take(1)
    page = await store.sync_page(b, 0, 1 << 62, 100)
    assert [m.content for m in page] == ["a>b", "b>a", "ab1", "note to self", "after-join"]
    ids = [m.id for m in page]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_sync_page_bounds_and_limit(store: Store, committed: Committed) -> None:
    a, b = await users(store, 2)
    for i in range(10):
        store.submit(pm(a, b, f"m{i}"), None)
    ids = [m.id for m, _, _ in await committed.take(10)]
    first = await store.sync_page(b, 0, 1 << 62, 3)
    assert [m.id for m in first] == ids[:3]
    after = await store.sync_page(b, ids[2], 1 << 62, 3)
    assert [m.id for m in after] == ids[3:6]
    bounded = await store.sync_page(b, ids[2], ids[5], 100)
    assert [m.id for m in bounded] == ids[3:5]
    assert await store.sync_page(b, ids[-1], 1 << 62, 100) == []


async def test_stored_fields_come_back_intact(store: Store, committed: Committed) -> None:
    a, b = await users(store, 2)
    sent = Message(userid=a, cmd=10, dstid=b, media=2, content="标题 🎉", pic="/p.png",
                   url="https://x/y", memo="memo", amount=-5, cid="c-1")
    store.submit(sent, None)
    ((msg, _, _),) = await committed.take(1)
    (got,) = await store.sync_page(b, 0, 1 << 62, 10)
    assert got == msg and got.content == "标题 🎉" and got.amount == -5


async def test_token_versions_lists_only_revokers(store: Store, tmp_path: Path) -> None:
    a, b = await users(store, 2)
    db = sqlite3.connect(tmp_path / "chatd.db")
    db.execute("UPDATE users SET token_version = 3 WHERE id = ?", (b,))
    db.commit()
    db.close()
    assert await store.token_versions() == {b: 3}
    assert await store.token_version(a) == 0
