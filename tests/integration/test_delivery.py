"""Private and group delivery across devices, acks, dedupe, encodings."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from conftest import UNIT, Client, Node, connect, connect_typed, send_acked, sync_all
from websockets.asyncio.client import connect as ws_connect

# every test here on one shard and on two (users on different shards)
pytestmark = pytest.mark.layouts("1", "2")


async def online(node: Node, uid: int) -> Client:
    """A connected client that the server has registered (a sync round trip)."""
    client = await connect(node.url(uid))
    await sync_all(client)
    return client


async def test_private_message_between_websockets_clients(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    async with ws_connect(node.url(alice)) as a, ws_connect(node.url(bob)) as b:
        for ws in (a, b):  # registered before the message is sent
            await ws.send(json.dumps({"cmd": 4}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5 * UNIT))["cmd"] == 4
        await a.send(json.dumps({"cmd": 10, "dstid": bob, "media": 1, "content": "hi bob",
                                 "cid": "w1"}))
        ack = json.loads(await asyncio.wait_for(a.recv(), 5 * UNIT))
        got = json.loads(await asyncio.wait_for(b.recv(), 5 * UNIT))
    assert ack["cmd"] == 1 and ack["cid"] == "w1" and ack["id"] > 0 and ack["ts"] > 0
    assert got == {"id": ack["id"], "userid": alice, "cmd": 10, "dstid": bob, "media": 1,
                   "content": "hi bob", "cid": "w1", "ts": ack["ts"]}


async def test_picows_sender_websockets_receiver(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    async with ws_connect(node.url(bob)) as b:
        await b.send(msgspec.msgpack.encode({"cmd": 4}))
        assert msgspec.msgpack.decode(await asyncio.wait_for(b.recv(), 5 * UNIT)) == {"cmd": 4}
        a = await online(node, alice)
        (ack,) = await send_acked(a, bob, 1)
        got = msgspec.msgpack.decode(await asyncio.wait_for(b.recv(), 5 * UNIT))
    assert got["id"] == ack["id"] and got["userid"] == alice and got["content"] == "m body 0"


async def test_every_device_gets_a_copy_including_the_senders_other_devices(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a1, a2 = await online(node, alice), await online(node, alice)
    b1, b2, b3 = [await online(node, bob) for _ in range(3)]
    a1.send(cmd=10, dstid=bob, media=1, content="to all of bob", cid="x1")
    ack = await a1.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "x1"
    for device in (b1, b2, b3, a2):
        got = await device.recv()
        assert got["id"] == ack["id"] and got["content"] == "to all of bob"
        assert got["userid"] == alice and got["dstid"] == bob
    # and back: bob's reply reaches both of alice's devices and bob's others
    b2.send(cmd=10, dstid=alice, media=1, content="reply", cid="r1")
    ack = await b2.recv()
    for device in (a1, a2, b1, b3):
        got = await device.recv()
        assert got["id"] == ack["id"] and got["content"] == "reply"
    for device in (a1, a2, b1, b2, b3):
        await device.assert_quiet()


async def test_message_to_self_reaches_other_devices_only(node: Node) -> None:
    alice = await node.user()
    a1, a2 = await online(node, alice), await online(node, alice)
    (ack,) = await send_acked(a1, alice, 1)
    got = await a2.recv()
    assert got["id"] == ack["id"] and got["dstid"] == alice
    await a1.assert_quiet()


async def test_group_message_reaches_every_member_device(node: Node) -> None:
    alice, bob, carol, dave = [await node.user() for _ in range(4)]
    gid = await node.group(alice, bob, carol)
    a1, a2 = await online(node, alice), await online(node, alice)
    b1, b2 = await online(node, bob), await online(node, bob)
    c = await online(node, carol)
    d = await online(node, dave)
    a1.send(cmd=11, dstid=gid, media=1, content="hello group", cid="g1")
    ack = await a1.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "g1"
    for device in (a2, b1, b2, c):
        got = await device.recv()
        assert got["cmd"] == 11 and got["dstid"] == gid and got["userid"] == alice
        assert got["id"] == ack["id"] and got["content"] == "hello group"
    # the outsider learns nothing (a later private message is the next frame)
    (marker,) = await send_acked(b1, dave, 1, prefix="marker")
    assert (await d.recv())["id"] == marker["id"]
    await a1.assert_quiet()


async def test_group_message_from_a_non_member_is_403(node: Node) -> None:
    alice, bob, eve = await node.user(), await node.user(), await node.user()
    gid = await node.group(alice, bob)
    b = await online(node, bob)
    e = await online(node, eve)
    e.send(cmd=11, dstid=gid, media=1, content="let me in", cid="e1")
    err = await e.recv()
    assert err["cmd"] == 5 and err["amount"] == 403 and err["cid"] == "e1" and err["memo"]
    e.send(cmd=2, dstid=gid, cid="e2")  # nor may it enter the live stream
    err = await e.recv()
    assert err["cmd"] == 5 and err["amount"] == 403 and err["cid"] == "e2"
    # nothing reached the group, and eve's connection still works
    (ack,) = await send_acked(e, bob, 1)
    got = await b.recv()
    assert got["id"] == ack["id"] and got["cmd"] == 10


async def test_private_message_to_a_nonexistent_user_is_404(node: Node) -> None:
    alice = await node.user()
    a = await online(node, alice)
    a.send(cmd=10, dstid=alice + 1000, media=1, content="anyone?", cid="n1")
    err = await a.recv()
    assert err["cmd"] == 5 and err["amount"] == 404 and err["cid"] == "n1"
    await send_acked(a, alice, 1)  # still open


async def test_spoofed_userid_id_and_ts_are_overwritten(node: Node) -> None:
    alice, bob, mallory = await node.user(), await node.user(), await node.user()
    b = await online(node, bob)
    m = await online(node, mallory)
    m.send(cmd=10, dstid=bob, media=1, content="I am alice", cid="s1", userid=alice,
           id=999_999, ts=1)
    ack = await m.recv()
    got = await b.recv()
    assert got["userid"] == mallory
    assert got["id"] == ack["id"] != 999_999 and got["ts"] == ack["ts"] != 1
    frames, _ = await sync_all(b)  # and what is stored says mallory too
    assert frames == []
    stored = await node.store.get_messages([ack["id"]])
    assert stored[0].userid == mallory


async def test_retry_with_the_same_cid_is_acked_again_and_delivered_once(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    b = await online(node, bob)
    a.send(cmd=10, dstid=bob, media=1, content="once", cid="dup")
    first = await a.recv()
    a.send(cmd=10, dstid=bob, media=1, content="once", cid="dup")  # after the ack
    second = await a.recv()
    a.send(cmd=10, dstid=bob, media=1, content="once", cid="dup2")
    a.send(cmd=10, dstid=bob, media=1, content="once", cid="dup2")  # back to back
    third, fourth = await a.recv(), await a.recv()
    assert first["cmd"] == second["cmd"] == third["cmd"] == fourth["cmd"] == 1
    assert (first["id"], first["ts"]) == (second["id"], second["ts"])
    assert third["id"] == fourth["id"] != first["id"]
    got = [await b.recv(), await b.recv()]
    assert [g["id"] for g in got] == [first["id"], third["id"]]
    (marker,) = await send_acked(a, bob, 1, prefix="end")
    assert (await b.recv())["id"] == marker["id"]  # no third copy in between
    frames, _ = await sync_all(await online(node, bob))
    assert [f["id"] for f in frames] == [first["id"], third["id"], marker["id"]]


async def test_msgpack_round_trip_and_the_answer_follows_the_last_encoding(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a = await connect_typed(node.url(alice))
    b = await connect_typed(node.url(bob))
    b.send_binary(cmd=4)
    assert await b.recv_typed() == ("binary", {"cmd": 4})
    a.send_binary(cmd=10, dstid=bob, media=4, url="/f/x.png", pic="/f/x.p.png", cid="mp1",
                  content="ünï")
    kind, ack = await a.recv_typed()
    assert kind == "binary" and ack["cmd"] == 1 and ack["cid"] == "mp1"
    kind, got = await b.recv_typed()
    assert kind == "binary"  # bob last spoke MessagePack
    assert got == {"id": ack["id"], "userid": alice, "cmd": 10, "dstid": bob, "media": 4,
                   "content": "ünï", "pic": "/f/x.p.png", "url": "/f/x.png", "cid": "mp1",
                   "ts": ack["ts"]}
    # alice switches to JSON: her ack is JSON; bob switches to JSON: his copy is JSON
    b.send(cmd=0)
    a.send(cmd=10, dstid=bob, media=1, content="now json", cid="j1")
    kind, ack = await a.recv_typed()
    assert kind == "text" and ack["cid"] == "j1"
    kind, got = await b.recv_typed()
    assert kind == "text" and got["content"] == "now json"
    # errors come back in the encoding of the bad frame
    a.send_binary(cmd=77, cid="bad")
    kind, err = await a.recv_typed()
    assert kind == "binary" and err["cmd"] == 5 and err["amount"] == 422 and err["cid"] == "bad"


async def test_leave_and_enter_the_live_stream_of_a_group(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    gid = await node.group(alice, bob)
    a = await online(node, alice)
    b = await online(node, bob)
    b.send(cmd=3, dstid=gid)
    (g1,) = await send_acked(a, gid, 1, cmd=11, prefix="while-away")
    (p1,) = await send_acked(a, bob, 1, prefix="private")
    assert (await b.recv())["id"] == p1["id"]  # the group message was skipped
    b.send(cmd=2, dstid=gid)
    (p2,) = await send_acked(a, bob, 1, prefix="sync-point")  # orders enter before g2
    assert (await b.recv())["id"] == p2["id"]
    (g2,) = await send_acked(a, gid, 1, cmd=11, prefix="back")
    assert (await b.recv())["id"] == g2["id"]
    # what was skipped live is there through sync
    frames, end = await sync_all(b)
    assert g1["id"] in [f["id"] for f in frames]


HOSTILE_TEXTS = [
    "'); DROP TABLE messages; --",
    "\" OR 1=1 --",
    "%s %d ? :uid $1 {0}",
    "null \u0000 byte",
    "<script>alert(1)</script>",
    "\u202eRTL override \U0001f600",
]


async def test_sql_and_markup_looking_text_is_stored_and_delivered_verbatim(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a = await online(node, alice)
    b = await online(node, bob)
    for i, text in enumerate(HOSTILE_TEXTS):
        a.send(cmd=10, dstid=bob, media=1, content=text, memo=text, cid=f"h{i}")
    copies = [await b.recv() for _ in HOSTILE_TEXTS]
    assert [(c["content"], c["memo"]) for c in copies] == [(t, t) for t in HOSTILE_TEXTS]
    replay = await node.store.sync_page(bob, 0, 1 << 62, 100)
    assert [m.content for m in replay] == HOSTILE_TEXTS
    assert await node.store.max_message_id() == len(HOSTILE_TEXTS)  # the table is intact
