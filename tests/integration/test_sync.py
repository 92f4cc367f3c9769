"""Sync (cmd 4): what a user missed, only theirs, in id order, in pages, ending
with the high-water mark, and no duplicates around live traffic."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from conftest import UNIT, Client, Node, connect, send_acked, sync_all
from picows import WSHandshakeError

# every test here on one shard and on two (users on different shards)
pytestmark = pytest.mark.layouts("1", "2")


async def online(node: Node, uid: int) -> Client:
    client = await connect(node.url(uid))
    await sync_all(client)
    return client


def ids(frames: Iterable[dict]) -> list[int]:
    return [f["id"] for f in frames]


async def test_offline_user_gets_what_it_missed_in_pages(node_factory) -> None:
    node = await node_factory(sync_page=3)
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    acks = await send_acked(a, bob, 10)
    b = await connect(node.url(bob))
    frames, end = await sync_all(b)
    assert ids(frames) == [ack["id"] for ack in acks]
    assert [f["content"] for f in frames] == [f"m body {i}" for i in range(10)]
    assert all(f["cmd"] == 10 and f["userid"] == alice and f["dstid"] == bob for f in frames)
    assert [f["cid"] for f in frames] == [ack["cid"] for ack in acks]
    assert [f["ts"] for f in frames] == [ack["ts"] for ack in acks]
    assert end == {"cmd": 4, "id": acks[-1]["id"]}
    await b.assert_quiet()


async def test_sync_from_a_known_id_sends_only_newer(node_factory) -> None:
    node = await node_factory(sync_page=3)
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    acks = await send_acked(a, bob, 10)
    b = await connect(node.url(bob))
    frames, end = await sync_all(b, after=acks[6]["id"])
    assert ids(frames) == [ack["id"] for ack in acks[7:]]
    assert end["id"] == acks[-1]["id"]
    frames, end = await sync_all(b, after=acks[-1]["id"])  # up to date
    assert frames == [] and end["id"] == acks[-1]["id"]


async def test_sync_returns_only_the_users_own_conversations(node_factory) -> None:
    node = await node_factory(sync_page=3)
    alice, bob, carol, dave = [await node.user() for _ in range(4)]
    g_ab = await node.group(alice, bob)
    g_cd = await node.group(carol, dave)
    g_late = await node.group(carol)
    a, c, d = await online(node, alice), await online(node, carol), await online(node, dave)
    mine = []
    mine += await send_acked(a, bob, 2, prefix="a-to-b")
    await send_acked(c, dave, 2, prefix="c-to-d")  # someone else's private chat
    await send_acked(d, carol, 1, prefix="d-to-c")
    mine += await send_acked(a, g_ab, 2, cmd=11, prefix="in-ab")
    await send_acked(c, g_cd, 2, cmd=11, prefix="in-cd")  # a group bob is not in
    await send_acked(c, g_late, 2, cmd=11, prefix="before-join")
    await node.store.join_group(g_late, bob)
    b = await connect(node.url(bob))  # first connection: its groups come from the store
    frames, _ = await sync_all(b)  # (the first sync, before bob sends anything)
    mine += await send_acked(b, alice, 1, prefix="b-to-a")  # bob's own sent messages
    mine += await send_acked(c, g_late, 1, cmd=11, prefix="after-join")
    frames, end = await sync_all(await connect(node.url(bob)))
    assert ids(frames) == sorted(ack["id"] for ack in mine)
    contents = [f["content"] for f in frames]
    assert not any(x.startswith(("c-to-d", "d-to-c", "in-cd", "before-join")) for x in contents)
    assert end["id"] == max(ack["id"] for ack in mine)


async def test_no_duplicates_when_live_messages_arrive_during_a_sync(node_factory) -> None:
    node = await node_factory(sync_page=3)
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    before = await send_acked(a, bob, 10, prefix="old")
    b = await connect(node.url(bob))
    b.send(cmd=4, id=0)
    # alice keeps talking while bob's replay runs
    during = await send_acked(a, bob, 10, prefix="new")
    (marker,) = await send_acked(a, bob, 1, prefix="marker")
    got: list[dict] = []
    while marker["id"] not in ids(f for f in got if f["cmd"] == 10) or not any(
        f["cmd"] == 4 for f in got
    ):
        got.append(await b.recv())
    messages = [f for f in got if f["cmd"] == 10]
    expected = [ack["id"] for ack in before + during + [marker]]
    assert len(set(ids(messages))) == len(messages), "a message came twice"
    assert sorted(ids(messages)) == expected
    # all of it arrived in id order, since live copies wait for the replay
    assert ids(messages) == expected
    (end,) = [f for f in got if f["cmd"] == 4]
    # the high-water mark covers every message delivered before it
    seen = ids(f for f in got[: got.index(end)] if f["cmd"] == 10)
    assert end["id"] == max(seen)
    await b.assert_quiet()


async def test_no_duplicates_around_a_sync_after_live_messages(node_factory) -> None:
    node = await node_factory(sync_page=3)
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    before = await send_acked(a, bob, 7, prefix="old")
    b = await connect(node.url(bob))
    # bob is online but has not synced yet: new messages come to him live
    _, end0 = await sync_all(b, after=before[-1]["id"])  # registered, nothing new
    live = await send_acked(a, bob, 2, prefix="live")
    assert ids([await b.recv(), await b.recv()]) == ids(live)
    frames, end = await sync_all(b, after=0)  # now he asks for his past
    assert ids(frames) == ids(before)  # what came live is not replayed
    (after,) = await send_acked(a, bob, 1, prefix="after")
    assert (await b.recv())["id"] == after["id"]
    await b.assert_quiet()


async def test_high_water_mark_covers_what_came_live_before_the_sync(node_factory) -> None:
    """The cmd-4 answer is the id the client can sync from next time without
    getting anything twice: the highest id it now has."""
    node = await node_factory(sync_page=3)
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    before = await send_acked(a, bob, 5, prefix="old")
    b = await connect(node.url(bob))
    await sync_all(b, after=before[-1]["id"])
    live = await send_acked(a, bob, 2, prefix="live")
    assert ids([await b.recv(), await b.recv()]) == ids(live)
    frames, end = await sync_all(b, after=0)
    assert ids(frames) == ids(before)
    assert end["id"] == live[-1]["id"]
    # syncing from that mark on a new device gives nothing already seen
    frames, _ = await sync_all(await connect(node.url(bob)), after=end["id"])
    assert frames == []


async def test_a_second_sync_while_one_runs_is_409(node_factory) -> None:
    node = await node_factory(sync_page=1)
    alice, bob = await node.user(), await node.user()
    await send_acked(await online(node, alice), bob, 20)
    b = await connect(node.url(bob))
    b.send(cmd=4, id=0, cid="first")
    b.send(cmd=4, id=0, cid="second")
    got = []
    while True:
        frame = await b.recv()
        got.append(frame)
        if frame["cmd"] == 4:
            break
    errors = [f for f in got if f["cmd"] == 5]
    # the second request was either refused with 409 or served after the first
    if errors:
        assert errors == [{"cmd": 5, "amount": 409, "memo": errors[0]["memo"], "cid": "second"}]
    assert len([f for f in got if f["cmd"] == 10]) == 20


async def test_group_messages_are_synced_with_the_senders_own_devices(node_factory) -> None:
    node = await node_factory(sync_page=2)
    alice, bob = await node.user(), await node.user()
    gid = await node.group(alice, bob)
    a = await online(node, alice)
    acks = await send_acked(a, gid, 5, cmd=11)
    for uid in (alice, bob):  # a new device of the sender sees its own messages too
        frames, end = await sync_all(await connect(node.url(uid)))
        assert ids(frames) == ids(acks) and end["id"] == acks[-1]["id"]
        assert all(f["cmd"] == 11 and f["dstid"] == gid for f in frames)


async def _frames_until_sync_answer(client: Client) -> tuple[list[dict[str, Any]], int]:
    """Every frame up to the cmd 4 answer of a resume, and its high-water id."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = await client.recv()
        if frame.get("cmd") == 4:
            return frames, int(frame["id"])
        frames.append(frame)


async def test_resume_with_last_replays_before_anything_live(node_factory) -> None:
    node = await node_factory(sync_page=3)
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    missed = await send_acked(a, bob, 7, prefix="missed")
    # bob comes back with the last id it had: the replay comes first, in order,
    # and a message sent while it runs comes after it, once
    b = await connect(node.url(bob) + f"&last={missed[1]['id']}")
    a.send(cmd=10, dstid=bob, media=1, content="live", cid="live")
    frames, high = await _frames_until_sync_answer(b)
    live = await b.recv_until(lambda f: f.get("cid") == "live") if not any(
        f.get("cid") == "live" for f in frames) else None
    got = [f for f in frames if f.get("cmd") == 10] + ([live] if live else [])
    ids = [f["id"] for f in got]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert [f["cid"] for f in got] == [f"missed{i}" for i in range(2, 7)] + ["live"]
    assert high >= missed[-1]["id"]


async def test_an_ack_during_a_resume_comes_after_the_replay(node_factory) -> None:
    node = await node_factory(sync_page=2)
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    await send_acked(a, bob, 6, prefix="old")
    b = await connect(node.url(bob) + "&last=0")
    b.send(cmd=10, dstid=alice, media=1, content="mine", cid="mine")
    frames, _ = await _frames_until_sync_answer(b)
    rest = [] if any(f.get("cid") == "mine" and f.get("cmd") == 1 for f in frames) else [
        await b.recv_until(lambda f: f.get("cid") == "mine")]
    ordered = [f["id"] for f in frames + rest if f.get("cmd") in (1, 10)]
    # every frame on the connection in id order, the ack included: the highest
    # id a client has seen is a safe place to resume from
    assert ordered == sorted(ordered)
    assert (frames + rest)[-1]["cmd"] == 1 or any(f.get("cmd") == 1 for f in frames)


async def test_a_bad_last_is_refused_at_the_handshake(node_factory) -> None:
    node = await node_factory()
    alice = await node.user()
    for bad in ("-1", "x", str(1 << 63)):
        with pytest.raises(WSHandshakeError) as info:
            await connect(node.url(alice) + f"&last={bad}")
        assert info.value.response is not None and info.value.response.status == 400


@pytest.mark.slow
async def test_reconnecting_with_last_under_load_loses_and_repeats_nothing(node_factory) -> None:
    """A receiver that keeps reconnecting with the last id it saw, while a
    sender floods it: each message exactly once, in order (the replay must not
    run ahead of the router, or a row committed but not yet routed comes twice)."""
    node = await node_factory(sync_page=50, rate_limit=False)
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    total = 3000
    for i in range(total):
        a.send(cmd=10, dstid=bob, media=1, content=str(i), cid=f"f{i}")
    seen: list[int] = []
    last = 0
    while len(seen) < total:
        b = await connect(node.url(bob) + f"&last={last}")
        for _ in range(200):
            try:
                frame = await b.recv(timeout=5)
            except TimeoutError:
                break
            if frame.get("cmd") == 10:
                seen.append(int(frame["content"]))
                last = max(last, int(frame["id"]))
        b.tr.disconnect()
        await b.wait_closed()
    assert seen == list(range(total))


async def test_a_replay_never_runs_ahead_of_the_stream(node_factory) -> None:
    """A replay reads the store only up to the id where the shard's stream from
    the log takes over (the log's high-water when the user was placed): a row
    above it is the stream's to deliver, or it would arrive twice. Such a row
    is made here the way a commit the log has not routed yet looks: straight
    into the database file."""
    import sqlite3

    node = await node_factory()
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    routed = await send_acked(a, bob, 3, prefix="r")
    with sqlite3.connect(node.cfg.db_path) as db:
        cur = db.execute(
            "INSERT INTO messages (id, p, userid, cmd, dstid, media, content, ts) "
            "SELECT max(id) + 1, (max(id) + 1) >> 12, ?, 10, ?, 1, 'not routed yet', 0 "
            "FROM messages", (alice, bob))
        unrouted = cur.lastrowid
    assert unrouted is not None and node.log.hw < unrouted
    b = await connect(node.url(bob) + "&last=0")
    frames, high = await _frames_until_sync_answer(b)
    assert [f["cid"] for f in frames if f.get("cmd") == 10] == ["r0", "r1", "r2"]
    assert high == routed[-1]["id"]
    # once the log has routed past it, a replay includes it
    [later] = await send_acked(a, bob, 1, prefix="later")
    assert later["id"] > unrouted
    assert (await b.recv())["id"] == later["id"]
    c = await connect(node.url(bob) + f"&last={high}")
    frames, high = await _frames_until_sync_answer(c)
    assert [f["content"] for f in frames if f.get("cmd") == 10] == [
        "not routed yet", "later body 0"]
    assert high == later["id"]


async def test_a_replay_that_stalls_while_live_traffic_piles_up_is_closed_4009(
        node_factory) -> None:
    """A client that resumes but stops reading, while still beating, cannot make
    the server hold live copies without bound: it is a slow consumer."""
    node = await node_factory(slow_consumer_bytes=8192, sync_page=50, rate_limit=False)
    alice, bob = await node.user(), await node.user()
    gid = await node.group(alice, bob)
    a = await connect(node.url(alice))
    # a backlog bigger than the socket buffers on both sides: the replay stalls
    big = "x" * 8000
    for i in range(1000):
        a.send(cmd=10, dstid=bob, media=1, content=big, cid=f"backlog{i}")
    await a.recv_until(lambda f: f.get("cid") == "backlog999", timeout=30)
    b = await connect(node.url(bob) + "&last=0")
    b.tr.underlying_transport.pause_reading()
    for i in range(node.shard.limits.held_max + 200):
        a.send(cmd=11, dstid=gid, media=1, content="g", cid=f"g{i}")
        if i % 500 == 0:
            b.send(cmd=0)  # still alive: the idle sweep is not what closes it
    b.tr.underlying_transport.resume_reading()
    assert await b.wait_closed(20) == 4009


async def test_a_join_and_messages_right_after_it_reach_the_member_in_order(
        node_factory) -> None:
    """A join through the log followed at once by a group message and a private
    message: the member gets both live, in id order, and a resume from its
    highest id misses nothing (the window the foundation had: a group message
    committed between the join and its event was never sent, and the client's
    highest id then skipped it for good)."""
    node = await node_factory()
    alice, bob = await node.user(), await node.user()
    gid = await node.group(alice)
    a = await connect(node.url(alice))
    b = await connect(node.url(bob))
    assert await node.log.join_group(gid, bob)
    a.send(cmd=11, dstid=gid, media=1, content="right after", cid="g")
    a.send(cmd=10, dstid=bob, media=1, content="and a dm", cid="p")
    first, second = await b.recv(), await b.recv()
    assert (first["cmd"], first["cid"], second["cmd"], second["cid"]) == (11, "g", 10, "p")
    assert first["id"] < second["id"]
    c = await connect(node.url(bob) + f"&last={second['id']}")
    frames, high = await _frames_until_sync_answer(c)
    assert frames == [] and high == second["id"]


async def test_a_join_racing_group_messages_cuts_them_at_its_place_in_the_order(
        node_factory) -> None:
    """Group messages sent while the join is in flight: the member gets exactly
    those committed after the join (live, in order), none before it, and a sync
    from 0 agrees."""
    node = await node_factory(rate_limit=False)
    alice, bob = await node.user(), await node.user()
    gid = await node.group(alice)
    a = await connect(node.url(alice))
    b = await connect(node.url(bob))
    join = asyncio.ensure_future(node.log.join_group(gid, bob))
    acks = await send_acked(a, gid, 200, cmd=11, prefix="race")
    assert await join
    joined_id = await node.store.joined_id(gid, bob)
    assert joined_id is not None
    after = [ack["id"] for ack in acks if ack["id"] > joined_id]
    live = [(await b.recv())["id"] for _ in after]
    assert live == after
    # and nothing more: a marker sent after everything arrives next
    [marker] = await send_acked(a, bob, 1, prefix="marker")
    assert (await b.recv())["id"] == marker["id"]
    c = await connect(node.url(bob) + "&last=0")
    frames, _ = await _frames_until_sync_answer(c)
    assert [f["id"] for f in frames] == [*after, marker["id"]]


async def test_a_revocation_reaches_a_connection_not_placed_yet(
        node_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is still reading the groups of a new connection when a
    revocation comes: it is placed first, then the revocation closes it."""
    node = await node_factory()
    alice = await node.user()
    release = asyncio.Event()
    load = node.store.group_ids_of

    async def held_back(uids: Any) -> Any:  # the real query, made to wait
        await release.wait()
        return await load(uids)

    monkeypatch.setattr(node.store, "group_ids_of", held_back)
    a = await connect(node.url(alice), settle=False)
    await _until(lambda: alice in node.shard_for(alice).pending and node.log.busy)
    revoke = asyncio.ensure_future(node.log.revoke_tokens(alice))
    release.set()
    assert await revoke == 1
    assert await a.wait_closed() == 4501


async def test_a_join_while_the_groups_are_read_is_not_lost(
        node_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log reads a new connection's groups, and a join commits before that
    read is answered: the join is placed after the answer, so the connection
    gets the group's messages live."""
    node = await node_factory()
    alice, bob = await node.user(), await node.user()
    gid = await node.group(bob)
    release = asyncio.Event()
    load = node.store.group_ids_of

    async def read_then_wait(uids: Any) -> Any:  # the real query, answered late
        result = await load(uids)
        await release.wait()
        return result

    monkeypatch.setattr(node.store, "group_ids_of", read_then_wait)
    a = await connect(node.url(alice), settle=False)
    await _until(lambda: alice in node.shard_for(alice).pending and node.log.busy)
    join = asyncio.ensure_future(node.log.join_group(gid, alice))
    release.set()
    assert await join
    b = await connect(node.url(bob))
    [ack] = await send_acked(b, gid, 1, cmd=11, prefix="after-join")
    got = await a.recv()
    assert (got["id"], got["dstid"], got["userid"]) == (ack["id"], gid, bob)


async def _until(pred: Any, timeout: float = 5.0) -> None:
    """Wait (with a deadline) for a state of the node that has no event of its own."""
    async def go() -> None:
        while not pred():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(go(), timeout * UNIT)
