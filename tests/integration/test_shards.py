"""Several shards behind one log, in one event loop over the real Unix-socket
bus (each shard on a port of its own, so placement is the test's choice):
targeted routing, every device on every shard, resume on another shard, and
a restart of the log that loses nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import UNIT, Node, connect, send_acked, sync_all

from chatd.bus.unix import LogServer
from chatd.log import Log
from chatd.server import log_socket

pytestmark = pytest.mark.layouts("3")


async def users_on(node: Node, *shards: int) -> list[int]:
    """One new user per entry, each of which ``url(uid)`` puts on that shard."""
    out = []
    for want in shards:
        while True:
            uid = await node.user()
            if uid % len(node.shards) == want:
                out.append(uid)
                break
    return out


def items(node: Node) -> list[int]:
    return [s.items_in for s in node.shards]


async def test_a_private_message_reaches_only_the_shards_of_its_users(node: Node) -> None:
    alice, bob, carol = await users_on(node, 0, 1, 2)
    a, b, c = [await connect(node.url(u)) for u in (alice, bob, carol)]
    before = items(node)
    acks = await send_acked(a, bob, 10)
    got = [await b.recv() for _ in acks]
    assert [g["id"] for g in got] == [ack["id"] for ack in acks]
    # a marker to carol: the log's stream to her shard is ordered, so a copy
    # of anything above would have come before it
    [marker] = await send_acked(a, carol, 1, prefix="marker")
    assert (await c.recv())["id"] == marker["id"]
    after = items(node)
    # shard 0: 11 acks; shard 1: 10 copies; shard 2: the marker alone
    assert [x - y for x, y in zip(after, before, strict=True)] == [11, 10, 1]
    await c.assert_quiet()


async def test_a_group_message_reaches_each_shard_with_members_once(node: Node) -> None:
    alice, bob, dave, carol = await users_on(node, 0, 1, 1, 2)
    gid = await node.group(alice, bob, dave)
    a, b, d, c = [await connect(node.url(u)) for u in (alice, bob, dave, carol)]
    before = items(node)
    [ack] = await send_acked(a, gid, 1, cmd=11, prefix="g")
    for member in (b, d):
        got = await member.recv()
        assert (got["id"], got["cmd"], got["dstid"]) == (ack["id"], 11, gid)
    [marker] = await send_acked(a, carol, 1, prefix="marker")
    assert (await c.recv())["id"] == marker["id"]
    # one Deliver for shard 1's two members; nothing for carol's shard but the marker
    assert [x - y for x, y in zip(items(node), before, strict=True)] == [2, 1, 1]


async def test_every_device_on_every_shard_gets_every_copy_once(node: Node) -> None:
    alice, bob = await users_on(node, 0, 1)
    bobs = [await connect(node.url(bob, shard=i)) for i in range(3)]
    alices = [await connect(node.url(alice, shard=i)) for i in (0, 2)]
    acks = await send_acked(alices[0], bob, 5, prefix="to-bob")
    for device in [*bobs, alices[1]]:
        got = [await device.recv() for _ in acks]
        assert [g["id"] for g in got] == [ack["id"] for ack in acks]
        await device.assert_quiet()
    await alices[0].assert_quiet()


async def test_a_reconnect_on_another_shard_resumes_without_loss_or_duplicates(
        node: Node) -> None:
    alice, bob = await users_on(node, 0, 1)
    a = await connect(node.url(alice))
    b = await connect(node.url(bob, shard=1))
    first = await send_acked(a, bob, 3, prefix="first")
    seen = [(await b.recv())["id"] for _ in first]
    b.tr.send_close()
    await b.wait_closed()
    missed = await send_acked(a, bob, 4, prefix="missed")
    again = await connect(node.url(bob, shard=2) + f"&last={seen[-1]}")
    frames, _ = await sync_all_answer(again)
    assert [f["id"] for f in frames] == [m["id"] for m in missed]
    [live] = await send_acked(a, bob, 1, prefix="live")
    assert (await again.recv())["id"] == live["id"]


async def sync_all_answer(client: Any) -> tuple[list[dict[str, Any]], int]:
    """Frames of the handshake's replay, up to its cmd 4 answer."""
    frames = []
    while True:
        frame = await client.recv()
        if frame.get("cmd") == 4:
            return frames, frame["id"]
        frames.append(frame)


async def _until(pred: Any, timeout: float = 10.0) -> None:
    """Wait (with a deadline) for a state that has no event of its own."""
    async def go() -> None:
        while not pred():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(go(), timeout * UNIT)


async def test_a_log_restart_loses_nothing_and_the_streams_catch_up(node: Node) -> None:
    """The log dies with batches it committed but never got to a shard: the
    shards keep their clients, answer 503 while it is gone, and once a new log
    is up every connection catches up from the store, in order, once."""
    alice, bob = await users_on(node, 0, 1)
    a = await connect(node.url(alice))
    b = await connect(node.url(bob))
    [before] = await send_acked(a, bob, 1, prefix="before")
    assert (await b.recv())["id"] == before["id"]
    server = node.embedded.server
    assert server is not None
    # the socket to bob's shard loses what the log writes from now on
    [to_bob] = [conn for conn in server.conns if conn.shard == 1]
    to_bob.send = lambda items, hw: None  # type: ignore[method-assign]
    lost = await send_acked(a, bob, 3, prefix="lost")  # acked: stored
    # the log process dies
    await node.log.close()
    await server.close()
    await _until(lambda: not any(s.link is not None and s.link.up for s in node.shards))
    a.send(cmd=10, dstid=bob, media=1, content="while down", cid="down")
    err = await a.recv()
    assert (err["cmd"], err["amount"], err["cid"]) == (5, 503, "down")
    # a new log on the same store and socket; the shards reconnect by themselves
    new_log = Log(node.store, batch_max=node.cfg.batch_max, queue_max=node.cfg.queue_max)
    await new_log.start()
    new_server = LogServer(new_log, log_socket(node.cfg))
    await new_server.start()
    node.embedded.log, node.embedded.server, node.log = new_log, new_server, new_log
    got = [await b.recv(timeout=10) for _ in lost]
    assert [g["id"] for g in got] == [m["id"] for m in lost]
    # the refused message is sent again (same cid): stored, and the stream is live
    a.send(cmd=10, dstid=bob, media=1, content="while down", cid="down")
    retry = await a.recv()
    assert (retry["cmd"], retry["cid"]) == (1, "down")
    assert (await b.recv())["id"] == retry["id"] > lost[-1]["id"]
    await b.assert_quiet()
    # bob's highest id is a safe resume point: nothing missing, nothing twice
    c = await connect(node.url(bob) + f"&last={before['id']}")
    frames, high = await sync_all_answer(c)
    assert [f["id"] for f in frames] == [*(m["id"] for m in lost), retry["id"]]
    assert high == retry["id"]
    frames, end = await sync_all(b, after=retry["id"])
    assert frames == [] and end["id"] == retry["id"]
