"""The store contract, on every engine: SQLite (the embedded default) and PostgreSQL.

Each test runs once per engine against a real database (a SQLite file in a
temp dir; a fresh database of the session's throwaway PostgreSQL cluster),
through the ``Store`` interface only: what the log, the shards and the API
rely on must mean the same on both. Engine-specific behaviour (SQLite's
pragmas and locks, PostgreSQL's chain) is tested in the engines' own files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import TEST_PASSWORD_HASH

from chatd.errors import NotFoundError, StoreError, StoreUnavailable
from chatd.store import BROADCAST, DUPLICATE, NO_RECEIVER, STORED, SYSTEM_USER
from chatd.store.postgres import PostgresStore
from chatd.store.sqlite import SqliteStore
from chatd.wire import CMD_GROUP, CMD_PRIVATE, Message

AnyStore = SqliteStore | PostgresStore
TOP = 1 << 62


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    s: AnyStore
    if request.param == "sqlite":
        s = await SqliteStore.open(tmp_path / "chatd.db")
    else:
        s = await PostgresStore.open(request.getfixturevalue("pg_dsn"))
    yield s
    await s.close()


async def users(store: AnyStore, n: int) -> list[int]:
    return [await store.create_user(f"1390000{i:04d}", TEST_PASSWORD_HASH) for i in range(n)]


def pm(src: int, dst: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=CMD_PRIVATE, dstid=dst, media=1, content=content, cid=cid)


def gm(src: int, gid: int, content: str = "x", cid: str = "") -> Message:
    return Message(userid=src, cmd=CMD_GROUP, dstid=gid, media=1, content=content, cid=cid)


def contents(page: list[Message]) -> list[str]:
    return [m.content for m in page]


# --- accounts ------------------------------------------------------------------------


async def test_users_and_a_taken_mobile(store: AnyStore) -> None:
    a = await store.create_user("100", TEST_PASSWORD_HASH, "alice", "/a.png", "F")
    b = await store.create_user("101", TEST_PASSWORD_HASH)
    assert 0 < a < b
    with pytest.raises(StoreError) as info:
        await store.create_user("100", TEST_PASSWORD_HASH)
    assert not isinstance(info.value, (NotFoundError, StoreUnavailable))
    assert await store.add_user("100", TEST_PASSWORD_HASH) is None
    c = await store.add_user("102", TEST_PASSWORD_HASH, "carol")
    assert c is not None and c > b
    alice = await store.user_by_mobile("100")
    assert alice is not None and alice == await store.user_by_id(a)
    assert (alice.id, alice.mobile, alice.passwd, alice.nickname, alice.avatar, alice.sex) == (
        a,
        "100",
        TEST_PASSWORD_HASH,
        "alice",
        "/a.png",
        "F",
    )
    assert (alice.token_version, bool(alice.banned), alice.memo) == (0, False, "")
    assert alice.created_ms > 0
    assert await store.user_by_mobile("999") is None
    assert await store.user_by_id(9999) is None
    with pytest.raises(NotFoundError):
        await store.token_version(9999)


async def test_token_versions_and_bans(store: AnyStore) -> None:
    a, b = await users(store, 2)
    assert await store.token_versions() == {}
    assert await store.bump_token_version(b) == 1
    assert await store.bump_token_version(b) == 2
    assert await store.token_versions() == {b: 2}
    assert await store.token_version(a) == 0 and await store.token_version(b) == 2
    with pytest.raises(NotFoundError):
        await store.bump_token_version(9999)
    assert await store.set_banned(b, True) is True
    assert await store.set_banned(b, True) is False
    assert await store.banned_users() == [b]
    user = await store.user_by_id(b)
    assert user is not None and bool(user.banned)
    assert await store.set_banned(b, False) is True
    assert await store.set_banned(b, False) is False
    assert await store.banned_users() == []
    with pytest.raises(NotFoundError):
        await store.set_banned(9999, True)


async def test_friends(store: AnyStore) -> None:
    a, b, c = await users(store, 3)
    assert await store.add_friend(a, b) is True
    assert await store.add_friend(b, a) is False
    assert await store.add_friend(a, c) is True
    assert [u.id for u in await store.friends(a)] == [b, c]
    assert [u.id for u in await store.friends(b)] == [a]
    with pytest.raises(NotFoundError):
        await store.add_friend(a, 9999)
    with pytest.raises(NotFoundError):
        await store.add_friend(9999, a)
    assert [u.id for u in await store.friends(a)] == [b, c]
    assert await store.friends(9999) == []


# --- groups --------------------------------------------------------------------------


async def test_groups_and_membership(store: AnyStore) -> None:
    a, b = await users(store, 2)
    gid = await store.create_group("g", a, "/i.png", 3, "about")
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
    g3 = await store.create_group("g3", b)
    assert g3 > gid
    group = await store.group_by_id(gid)
    assert group is not None
    assert (group.id, group.name, group.ownerid, group.icon, group.cate, group.memo) == (
        gid,
        "g",
        a,
        "/i.png",
        3,
        "about",
    )
    assert await store.group_by_id(9999) is None
    assert [g.id for g in await store.groups_of(b)] == [gid, g3]
    assert [u.id for u in await store.members_of(gid)] == [a, b]
    assert await store.group_ids_of([a, b, 9999]) == {a: {gid}, b: {gid, g3}}
    assert await store.group_ids_of([]) == {}
    assert await store.user_groups(9999) == frozenset()
    assert await store.leave_group(gid, b) is True
    assert await store.leave_group(gid, b) is False
    assert await store.user_groups(b) == {g3}
    assert await store.joined_id(gid, b) is None


async def test_the_apis_group_calls(store: AnyStore) -> None:
    a, b = await users(store, 2)
    gid = await store.add_group("g", a)
    assert await store.add_member(gid, b) is True
    assert await store.add_member(gid, b) is False
    assert await store.remove_member(gid, b) is True
    assert await store.remove_member(gid, b) is False
    with pytest.raises(NotFoundError):
        await store.add_member(gid, 9999)
    with pytest.raises(NotFoundError):
        await store.add_group("x", 9999)


async def test_a_member_sees_the_group_from_its_join(store: AnyStore) -> None:
    a, b, c = await users(store, 3)
    gid = await store.create_group("g", a)
    before = [gm(a, gid, "before")]
    await store.append(before)
    assert await store.join_group(gid, b)
    joined = await store.joined_id(gid, b)
    assert joined is not None and joined >= before[0].id
    owner_joined = await store.joined_id(gid, a)
    assert owner_joined is not None and owner_joined < before[0].id
    after = [gm(c, gid, "after")]  # a non-member's (the log checks senders)
    await store.append(after)
    assert after[0].id > joined
    assert contents(await store.sync_page(b, 0, TOP, 100)) == ["after"]
    assert contents(await store.sync_page(a, 0, TOP, 100)) == ["before", "after"]
    # a member who left sees none of the group's messages any more
    assert await store.leave_group(gid, b)
    await store.append([gm(a, gid, "gone")])
    assert contents(await store.sync_page(b, 0, TOP, 100)) == []


# --- append --------------------------------------------------------------------------


async def test_a_batch_gets_increasing_ids_and_one_ts(store: AnyStore) -> None:
    a, b = await users(store, 2)
    msgs = [pm(a, b, f"m{i}", f"c{i}") for i in range(20)]
    assert await store.append(msgs) == [STORED] * 20
    ids = [m.id for m in msgs]
    assert ids == sorted(ids) and len(set(ids)) == 20 and ids[0] > 0
    assert len({m.ts for m in msgs}) == 1 and msgs[0].ts > 0
    stored = await store.get_messages(ids[::-1])
    assert contents(stored) == [f"m{i}" for i in range(20)]
    assert stored == msgs
    assert await store.get_messages([]) == []
    assert store.committed == 20
    more = [pm(b, a, "next")]
    await store.append(more)
    assert more[0].id == ids[-1] + 1
    assert await store.max_message_id() == more[0].id
    assert store.committed == 21


async def test_a_private_message_to_nobody_is_not_stored(store: AnyStore) -> None:
    a, b = await users(store, 2)
    batch = [pm(a, 4242, "lost", "x"), pm(a, b, "kept", "y"), pm(a, SYSTEM_USER, "to 0")]
    assert await store.append(batch) == [NO_RECEIVER, STORED, NO_RECEIVER]
    assert (batch[0].id, batch[0].ts, batch[2].id) == (0, 0, 0)
    assert batch[1].id > 0
    assert contents(await store.sync_page(a, 0, TOP, 100)) == ["kept"]
    assert store.committed == 1


async def test_a_broadcast_reaches_every_user(store: AnyStore) -> None:
    a, b = await users(store, 2)
    gid = await store.create_group("g", a)
    sent = [
        Message(userid=SYSTEM_USER, cmd=CMD_PRIVATE, dstid=BROADCAST, media=1, content="to all"),
        Message(userid=SYSTEM_USER, cmd=CMD_GROUP, dstid=gid, media=1, content="to g"),
    ]
    assert await store.append(sent) == [STORED, STORED]
    assert contents(await store.sync_page(a, 0, TOP, 100)) == ["to all", "to g"]
    assert contents(await store.sync_page(b, 0, TOP, 100)) == ["to all"]


async def test_same_cid_is_stored_once_across_batches(store: AnyStore) -> None:
    a, b = await users(store, 2)
    first, again = pm(a, b, "first", "dup"), pm(a, b, "retry", "dup")
    assert await store.append([first]) == [STORED]
    assert await store.append([again]) == [DUPLICATE]
    assert (again.id, again.ts) == (first.id, first.ts)
    assert contents(await store.sync_page(b, 0, TOP, 100)) == ["first"]
    assert store.committed == 1


async def test_same_cid_is_stored_once_within_a_batch(store: AnyStore) -> None:
    a, b = await users(store, 2)
    batch = [pm(a, b, f"try{i}", "dup") for i in range(3)]
    assert await store.append(batch) == [STORED, DUPLICATE, DUPLICATE]
    assert len({m.id for m in batch}) == 1 and len({m.ts for m in batch}) == 1
    assert len(await store.sync_page(b, 0, TOP, 100)) == 1


async def test_a_retry_in_a_batch_with_new_messages(store: AnyStore) -> None:
    a, b = await users(store, 2)
    old = pm(a, b, "old", "k")
    await store.append([old])
    batch = [
        pm(a, b, "new1", "n1"),
        pm(a, b, "old again", "k"),
        pm(a, b, "new2", "n2"),
        pm(a, b, "new1 again", "n1"),
    ]
    assert await store.append(batch) == [STORED, DUPLICATE, STORED, DUPLICATE]
    assert (batch[1].id, batch[1].ts) == (old.id, old.ts)
    assert batch[3].id == batch[0].id and batch[2].id > batch[0].id > old.id
    assert contents(await store.sync_page(b, 0, TOP, 100)) == ["old", "new1", "new2"]


async def test_a_refused_message_does_not_take_its_cid(store: AnyStore) -> None:
    """A cid first sent to nobody, then to a user: the second one is stored."""
    a, b = await users(store, 2)
    batch = [pm(a, 4242, "nobody", "k"), pm(a, b, "somebody", "k")]
    assert await store.append(batch) == [NO_RECEIVER, STORED]
    assert contents(await store.sync_page(b, 0, TOP, 100)) == ["somebody"]


async def test_same_cid_from_another_user_is_another_message(store: AnyStore) -> None:
    a, b = await users(store, 2)
    assert await store.append([pm(a, b, cid="same"), pm(b, a, cid="same")]) == [STORED, STORED]


async def test_empty_cid_never_dedupes(store: AnyStore) -> None:
    a, b = await users(store, 2)
    assert await store.append([pm(a, b), pm(a, b)]) == [STORED, STORED]
    assert await store.append([pm(a, b)]) == [STORED]
    assert len(await store.sync_page(b, 0, TOP, 100)) == 3


async def test_stored_fields_come_back_intact(store: AnyStore) -> None:
    a, b = await users(store, 2)
    sent = Message(
        userid=a,
        cmd=10,
        dstid=b,
        media=2,
        content="标题 🎉",
        pic="/p.png",
        url="https://x/y",
        memo="memo",
        amount=-5,
        cid="c-1",
    )
    await store.append([sent])
    (got,) = await store.sync_page(b, 0, TOP, 10)
    assert got == sent and got.content == "标题 🎉" and got.amount == -5
    big = Message(userid=a, cmd=10, dstid=b, media=5, amount=(1 << 63) - 1, content="max")
    plain = pm(a, b, "plain")
    linked = Message(userid=b, cmd=10, dstid=a, media=7, url="https://z", content="link")
    await store.append([big, plain, linked])
    assert await store.get_messages([big.id, plain.id, linked.id]) == [big, plain, linked]
    assert (await store.get_messages([big.id]))[0].amount == (1 << 63) - 1


# --- sync and history ----------------------------------------------------------------


async def test_sync_page_is_only_the_users_conversations(store: AnyStore) -> None:
    a, b, c, d = await users(store, 4)
    g_ab = await store.create_group("ab", a)
    await store.join_group(g_ab, b)
    g_cd = await store.create_group("cd", c)
    await store.join_group(g_cd, d)
    g_late = await store.create_group("late", c)
    sent = [
        pm(a, b, "a>b"),
        pm(b, a, "b>a"),
        pm(c, d, "c>d"),
        pm(d, c, "d>c"),
        gm(a, g_ab, "ab1"),
        gm(c, g_cd, "cd1"),
        gm(c, g_late, "before-join"),
        pm(b, b, "note to self"),
    ]
    await store.append(sent)
    await store.join_group(g_late, b)
    await store.append([gm(c, g_late, "after-join")])
    page = await store.sync_page(b, 0, TOP, 100)
    assert contents(page) == ["a>b", "b>a", "ab1", "note to self", "after-join"]
    ids = [m.id for m in page]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_sync_page_bounds_and_limit(store: AnyStore) -> None:
    a, b = await users(store, 2)
    gid = await store.create_group("g", a)
    await store.join_group(gid, b)
    msgs = [pm(a, b, f"m{i}") if i % 2 else gm(a, gid, f"m{i}") for i in range(10)]
    await store.append(msgs)
    ids = [m.id for m in msgs]
    first = await store.sync_page(b, 0, TOP, 3)
    assert [m.id for m in first] == ids[:3]
    after = await store.sync_page(b, ids[2], TOP, 3)
    assert [m.id for m in after] == ids[3:6]
    bounded = await store.sync_page(b, ids[2], ids[5], 100)
    assert [m.id for m in bounded] == ids[3:5]
    assert await store.sync_page(b, ids[-1], TOP, 100) == []


async def test_private_history(store: AnyStore) -> None:
    a, b, c = await users(store, 3)
    msgs = [pm(a, b, "1"), pm(b, a, "2"), pm(a, c, "other"), pm(a, b, "3"), pm(b, a, "4")]
    await store.append(msgs)
    assert contents(await store.private_history(a, b, 0, TOP, 10, False)) == ["1", "2", "3", "4"]
    assert contents(await store.private_history(b, a, 0, TOP, 2, False)) == ["1", "2"]
    assert contents(await store.private_history(a, b, 0, TOP, 2, True)) == ["3", "4"]
    assert contents(await store.private_history(a, b, msgs[0].id, msgs[4].id, 10, True)) == [
        "2",
        "3",
    ]
    await store.append([pm(a, a, "self")])
    assert contents(await store.private_history(a, a, 0, TOP, 10, False)) == ["self"]


async def test_group_history(store: AnyStore) -> None:
    a, b = await users(store, 2)
    g1 = await store.create_group("g1", a)
    g2 = await store.create_group("g2", b)
    msgs = [gm(a, g1, "1"), gm(b, g2, "x"), gm(a, g1, "2"), gm(a, g1, "3")]
    await store.append(msgs)
    assert contents(await store.group_history(g1, 0, TOP, 10, False)) == ["1", "2", "3"]
    assert contents(await store.group_history(g1, 0, TOP, 2, True)) == ["2", "3"]
    assert contents(await store.group_history(g1, 0, TOP, 2, False)) == ["1", "2"]
    assert contents(await store.group_history(g1, msgs[0].id, msgs[3].id, 10, False)) == ["2"]
    assert await store.group_history(9999, 0, TOP, 10, False) == []
