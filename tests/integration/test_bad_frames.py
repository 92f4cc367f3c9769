"""Bad frames get an error frame (cmd 5) and the connection stays open;
abuse (oversized frames, floods) and frames that break the websocket
protocol (invalid UTF-8 in a text message: 1007) close it with the
documented code."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
import websockets
from conftest import UNIT, Client, Node, connect, send_acked, sync_all
from picows import WSMsgType
from websockets.asyncio.client import connect as ws_connect

TEXT, BINARY, CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
mp = msgspec.msgpack.encode


def js(obj: object) -> bytes:
    return json.dumps(obj).encode()


BAD_FRAMES = [
    # id, websocket type, payload, error code, cid echoed
    ("bad-json", TEXT, b'{"cmd": 10, "dstid": 2,', 400, ""),
    ("json-not-object", TEXT, b"[1, 2, 3]", 400, ""),
    ("json-empty", TEXT, b"", 400, ""),
    ("bad-msgpack", BINARY, b"\xc1\xc1\xc1", 400, ""),
    ("msgpack-truncated", BINARY, mp({"cmd": 10, "content": "abc"})[:-2], 400, ""),
    ("wrong-type-json", TEXT, js({"cmd": "ten", "dstid": 2, "cid": "t1"}), 400, "t1"),
    ("wrong-type-msgpack", BINARY, mp({"cmd": 10, "dstid": [2], "cid": "t2"}), 400, "t2"),
    ("float-cmd", TEXT, js({"cmd": 10.5, "cid": "t3"}), 400, "t3"),
    ("unknown-cmd", TEXT, js({"cmd": 42, "cid": "u1"}), 422, "u1"),
    ("server-only-cmd", TEXT, js({"cmd": 1, "id": 5, "cid": "u2"}), 422, "u2"),
    ("unknown-cmd-msgpack", BINARY, mp({"cmd": 6, "cid": "u3"}), 422, "u3"),
    ("unknown-media", TEXT, js({"cmd": 10, "dstid": 2, "media": 55, "content": "x",
                                "cid": "m1"}), 422, "m1"),
    ("missing-media", TEXT, js({"cmd": 10, "dstid": 2, "content": "x", "cid": "m2"}), 422, "m2"),
    ("missing-dstid", TEXT, js({"cmd": 10, "media": 1, "content": "x", "cid": "d1"}), 422, "d1"),
    ("missing-dstid-group", TEXT, js({"cmd": 11, "media": 1, "content": "x", "cid": "d2"}),
     422, "d2"),
    ("text-without-content", TEXT, js({"cmd": 10, "dstid": 2, "media": 1, "cid": "c0"}),
     422, "c0"),
    ("content-over-limit", TEXT, js({"cmd": 10, "dstid": 2, "media": 1, "content": "x" * 8193,
                                     "cid": "big"}), 413, "big"),
    ("content-over-limit-msgpack", BINARY, mp({"cmd": 10, "dstid": 2, "media": 1,
                                               "content": "é" * 8193, "cid": "big2"}),
     413, "big2"),
    ("javascript-url", TEXT, js({"cmd": 10, "dstid": 2, "media": 7, "url": "javascript:x",
                                 "cid": "j1"}), 422, "j1"),
    ("negative-sync", TEXT, js({"cmd": 4, "id": -1, "cid": "s1"}), 422, "s1"),
    # a valid websocket frame (binary) whose Message has a bad string: an error
    # frame; invalid UTF-8 in a *text* frame fails the connection (below)
    ("invalid-utf8-msgpack", BINARY, b"\x85\xa3cmd\x0a\xa5dstid\x02\xa5media\x01"
     b"\xa3cid\xa28b\xa7content\xa2\xff\xfe", 400, None),
]


@pytest.mark.parametrize(
    "kind,payload,code,cid", [pytest.param(*case[1:], id=case[0]) for case in BAD_FRAMES]
)
async def test_bad_frame_gets_an_error_frame_and_the_connection_stays_open(
    node: Node, kind: WSMsgType, payload: bytes, code: int, cid: str | None
) -> None:
    alice, bob = await node.user(), await node.user()
    payload = payload.replace(b'"dstid": 2', f'"dstid": {bob}'.encode())
    a = await connect(node.url(alice))
    await sync_all(a)
    a.tr.send(kind, payload)
    err = await a.recv()
    assert err["cmd"] == 5, err
    assert err["amount"] == code, err
    assert err["memo"]
    if cid is not None:
        assert err.get("cid", "") == cid
    await a.assert_quiet()
    # the connection still works: a good frame is acked (in the latest encoding)
    good = {"cmd": 10, "dstid": bob, "media": 1, "content": "after", "cid": "good"}
    a.tr.send(kind, mp(good) if kind is BINARY else js(good))
    ack = await a.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "good"
    assert not a.closed.is_set()


@pytest.mark.parametrize("field", ["dstid", "amount"])
async def test_integer_beyond_int64_is_refused_and_the_server_keeps_working(
    node: Node, field: str
) -> None:
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    b = await connect(node.url(bob))
    await sync_all(a)
    await sync_all(b)
    frame = {"cmd": 10, "dstid": bob, "media": 1, "content": "x", "cid": "huge", field: 2**63}
    a.tr.send(TEXT, js(frame))
    err = await a.recv()
    assert err["cmd"] == 5 and err["cid"] == "huge" and err["amount"] in (400, 404, 413, 422)
    # the store must still commit messages, for this connection and others
    (ack,) = await send_acked(a, bob, 1, timeout=5)
    assert (await b.recv())["id"] == ack["id"]
    await send_acked(b, alice, 1, timeout=5)


async def test_sync_from_an_id_beyond_int64_is_refused(node: Node) -> None:
    alice = await node.user()
    a = await connect(node.url(alice))
    a.tr.send(TEXT, js({"cmd": 4, "id": 2**63, "cid": "s"}))
    err = await a.recv()
    assert err["cmd"] == 5 and err["cid"] == "s"
    _, end = await sync_all(a)  # and a proper sync is not blocked by it
    assert end["cmd"] == 4


async def test_frame_over_max_frame_bytes_closes_1009(node_factory) -> None:
    node = await node_factory(max_frame_bytes=1024)
    alice = await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    a.tr.send(TEXT, js({"cmd": 0, "memo": "x" * 1100}))
    assert await a.wait_closed() == 1009


async def test_fragmented_message_is_reassembled(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    b = await connect(node.url(bob))
    await sync_all(a)
    await sync_all(b)
    whole = js({"cmd": 10, "dstid": bob, "media": 1, "content": "in pieces", "cid": "f1"})
    pieces = [whole[:5], whole[5:20], whole[20:]]
    a.tr.send(TEXT, pieces[0], fin=False)
    a.tr.send(CONT, pieces[1], fin=False)
    a.tr.send(CONT, pieces[2], fin=True)
    ack = await a.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "f1"
    got = await b.recv()
    assert got["content"] == "in pieces" and got["id"] == ack["id"]
    # a binary message in fragments works too, and is answered in MessagePack
    whole = mp({"cmd": 10, "dstid": bob, "media": 1, "content": "bin pieces", "cid": "f2"})
    a.tr.send(BINARY, whole[:3], fin=False)
    a.tr.send(CONT, whole[3:], fin=True)
    ack = await a.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "f2"
    assert (await b.recv())["content"] == "bin pieces"


async def test_fragmented_message_growing_past_the_limit_closes_1009(node_factory) -> None:
    node = await node_factory(max_frame_bytes=1024)
    alice = await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    a.tr.send(TEXT, b'{"cmd": 0, "memo": "' + b"x" * 600, fin=False)
    a.tr.send(CONT, b"x" * 600, fin=False)  # each frame is small; the message is not
    assert await a.wait_closed() == 1009


async def test_continuation_without_a_start_is_a_protocol_error(node: Node) -> None:
    alice = await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    a.tr.send(CONT, b"{}", fin=True)
    assert await a.wait_closed() == 1002


async def test_flood_past_the_token_bucket_closes_4008(node_factory) -> None:
    node = await node_factory(rate_per_s=1, rate_burst=5)
    alice = await node.user()
    a = await connect(node.url(alice))
    for _ in range(30):
        a.send(cmd=0)
    assert await a.wait_closed() == 4008


async def test_flood_closes_4008_seen_by_websockets(node_factory) -> None:
    node = await node_factory(rate_per_s=1, rate_burst=5)
    alice = await node.user()
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        async with ws_connect(node.url(alice)) as ws:
            for _ in range(30):
                await ws.send(json.dumps({"cmd": 0}))
            await asyncio.wait_for(ws.recv(), 5 * UNIT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4008


async def test_within_the_burst_nothing_is_closed(node_factory) -> None:
    node = await node_factory(rate_per_s=1, rate_burst=10)
    alice = await node.user()
    a: Client = await connect(node.url(alice))
    for _ in range(8):
        a.send(cmd=0)
    _, end = await sync_all(a)  # the 9th frame
    assert end["cmd"] == 4 and not a.closed.is_set()


INVALID_UTF8_TEXT = [
    ("in-a-string", b'{"cmd":10,"dstid":2,"media":1,"content":"\xff\xfe","cid":"8a"}'),
    # the JSON decoder skips unknown fields: the foundation let this one through
    ("in-an-unknown-field", b'{"cmd":0,"zz":"\xff"}'),
    ("overlong", b'{"cmd":0,"memo":"\xc0\xaf"}'),
    ("surrogate", b'{"cmd":0,"memo":"\xed\xa0\x80"}'),
    ("beyond-unicode", b'{"cmd":0,"memo":"\xf4\x90\x80\x80"}'),
    ("not-json-either", b"\xff"),
]


@pytest.mark.parametrize("payload", [pytest.param(p, id=i) for i, p in INVALID_UTF8_TEXT])
async def test_invalid_utf8_in_a_text_frame_closes_1007(node: Node, payload: bytes) -> None:
    alice = await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    a.tr.send(TEXT, payload)
    assert await a.wait_closed() == 1007
    assert a.frames.empty()  # no error frame: the connection failed


async def test_invalid_utf8_across_fragments_closes_1007_before_the_message_ends(
        node: Node) -> None:
    alice = await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    # "κ" then the first byte of a 2-byte sequence; the next fragment breaks it
    a.tr.send(TEXT, b'{"cmd":0,"memo":"\xce\xba\xce', fin=False)
    a.tr.send(CONT, b'\xff', fin=False)
    # the last fragment is never sent: the close comes on the bad one
    assert await a.wait_closed() == 1007


async def test_a_character_split_across_fragments_is_accepted(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    whole = json.dumps({"cmd": 10, "dstid": bob, "media": 1, "content": "é世", "cid": "u8"},
                       ensure_ascii=False).encode()
    cut = whole.index("世".encode()) + 1  # inside the 3-byte sequence
    a.tr.send(TEXT, whole[:cut], fin=False)
    a.tr.send(CONT, whole[cut:], fin=True)
    ack = await a.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "u8"
    [stored] = await node.store.private_history(alice, bob, 0, 1 << 62, 10, False)
    assert stored.content == "é世"


async def test_invalid_utf8_closes_1007_seen_by_websockets(node: Node) -> None:
    alice = await node.user()
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        async with ws_connect(node.url(alice)) as ws:
            await ws.send(b'{"cmd": 0, "memo": "\xff"}', text=True)
            await asyncio.wait_for(ws.recv(), 5 * UNIT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007
