"""Every close that chatd starts is a websocket closing handshake (RFC 6455
§7.1.1): the answers to what was accepted, then the close frame, then a TCP
half-close; the socket is closed once the peer has seen it all (or after a
bound). A reset instead would discard what the client had not read yet."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import struct
import weakref
from typing import Any

import pytest
from conftest import UNIT, Client, Node, connect
from ws_raw import OP_BINARY, OP_PING, OP_TEXT, RawWs, frame


async def _drain(client: Client, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every frame the client gets until the server's close completes."""
    await client.wait_closed(timeout)
    frames = []
    while not client.frames.empty():
        frames.append(client.frames.get_nowait())
    return frames


async def test_a_flood_gets_the_acks_of_what_was_stored_and_the_4008_close(
        node_factory: Any) -> None:
    node: Node = await node_factory()  # the default token bucket: 300/s, bursts of 600
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    for i in range(20_000):
        a.send(cmd=10, dstid=bob, media=1, content=f"flood {i}", cid=f"f{i}")
    frames = await _drain(a)
    assert a.close_code == 4008
    acked = [f["cid"] for f in frames if f.get("cmd") == 1]
    stored = await node.store.private_history(alice, bob, 0, 1 << 62, 50_000, False)
    # every stored message was acked, in order; nothing past the limit was stored
    assert acked == [m.cid for m in stored]
    assert 600 <= len(stored) < 20_000
    assert [f for f in frames if f.get("cmd") != 1] == []


async def test_closing_waits_for_the_peer_within_a_bound(node_factory: Any) -> None:
    """A peer that never answers the close frame is cut off by the sweep."""
    node: Node = await node_factory(idle_timeout_s=0.5, rate_per_s=1, rate_burst=2)
    alice = await node.user()
    a = await connect(node.url(alice))

    # the client stops reading: it will not answer the close frame
    a.tr.underlying_transport.pause_reading()
    for _ in range(5):
        a.send(cmd=0)

    async def server_side_gone() -> None:
        while node.shard.registry.count:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(server_side_gone(), 5 * UNIT)
    a.tr.underlying_transport.resume_reading()
    assert await a.wait_closed() == 4008


async def test_a_closed_connection_is_freed_without_the_cycle_collector(node: Node) -> None:
    """Nothing of a closed connection waits for a full collection of the cycle
    collector: it is freed once the shard has handled the disconnect."""
    uid = await node.user()
    a = await connect(node.url(uid))
    shard = node.shard_for(uid)
    (sess,) = shard.registry.get(uid) or ()
    glue = weakref.ref(sess.conn)
    del sess
    gc.collect()
    gc.disable()
    try:
        a.tr.send_close()
        await a.wait_closed()
        for _ in range(100):
            if shard.registry.get(uid) is None and glue() is None:
                break
            await asyncio.sleep(0.01 * UNIT)
        assert shard.registry.get(uid) is None
        assert glue() is None
    finally:
        gc.enable()


# --- frames that break the framing or the size cap ------------------------------------
#
# A frame header that says "too big" (1009) or breaks RFC 6455's framing (1002)
# is judged before anything of the frame is buffered, and the close is chatd's
# own: the acks of what came before it, the close frame, a half-close, and the
# rest of what the client sends read and dropped, so its end is an EOF, never a
# reset (which would discard the acks it has not read).

MAX_FRAME = 4096
#: messages before the bad frame, in the same write
BEFORE = 40


def _unmasked(opcode: int, payload: bytes) -> bytes:
    """A client frame without a mask (RFC 6455 §5.1: the server must fail it)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


BAD_FRAMES = [
    # id, the frame, the close code
    ("oversized", frame(OP_TEXT, b"x" * (10 * MAX_FRAME)), 1009),
    ("oversized-binary", frame(OP_BINARY, b"\x00" * (10 * MAX_FRAME)), 1009),
    ("unmasked", _unmasked(OP_TEXT, b"x" * (10 * MAX_FRAME)), 1002),
    ("reserved-opcode", frame(0x3, b"x" * (10 * MAX_FRAME)), 1002),
    ("fragmented-ping", frame(OP_PING, b"p", fin=False) + b"x" * (10 * MAX_FRAME), 1002),
    ("bad-16-bit-length", struct.pack("!BBH", 0x81, 0xFE, 5) + b"\0" * (10 * MAX_FRAME), 1002),
]


async def _live_raw(node: Node, uid: int, to: int) -> RawWs:
    """A raw connection for ``uid`` whose first message was acked (it is live)."""
    ws = await RawWs.open(node.port, f"/chat?id={uid}&token={node.token(uid)}")
    ws.send(frame(OP_TEXT, json.dumps({"cmd": 10, "dstid": to, "media": 1,
                                       "content": "first", "cid": "first"}).encode()))
    ack = json.loads((await ws.recv()).payload)
    assert ack["cmd"] == 1 and ack["cid"] == "first", ack
    return ws


@pytest.mark.parametrize("bad,code", [pytest.param(b, c, id=i) for i, b, c in BAD_FRAMES])
async def test_a_bad_frame_gets_the_acks_before_it_then_its_close_then_an_eof(
        node_factory: Any, bad: bytes, code: int) -> None:
    node: Node = await node_factory(max_frame_bytes=MAX_FRAME)
    alice, bob = await node.user(), await node.user()
    ws = await _live_raw(node, alice, bob)
    try:
        ws.send(b"".join(
            frame(OP_TEXT, json.dumps({"cmd": 10, "dstid": bob, "media": 1,
                                       "content": f"before {i}", "cid": f"b{i}"}).encode())
            for i in range(BEFORE)) + bad)  # one write
        before, close = await ws.until_close(10)
        assert close.close_code == code
        answers = [json.loads(f.payload) for f in before]
        stored = await node.store.private_history(alice, bob, 0, 1 << 62, 1000, False)
        # every message before the bad frame was stored and acked, in order,
        # before the close frame; nothing else was written
        assert [m.cid for m in stored] == ["first"] + [f"b{i}" for i in range(BEFORE)]
        assert [(a["cmd"], a["cid"]) for a in answers] == [(1, f"b{i}") for i in range(BEFORE)]
        # then the server's FIN: an orderly end of the stream, not a reset
        assert await asyncio.wait_for(ws.reader.read(), 5 * UNIT) == b""
    finally:
        ws.close()
    # and the server side is gone (the shard counts the close as its own)
    await _gone(node)
    assert node.shard.closes.get(code) == 1


async def _gone(node: Node) -> None:
    async def go() -> None:
        while node.shard.registry.count:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(go(), 5 * UNIT)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_the_rest_of_a_100_mb_frame_is_read_and_dropped(node_factory: Any) -> None:
    """A client that goes on sending a frame far over the cap after the server's
    1009: the server reads what it sends and keeps none of it (no reset, no
    buffer growing with the frame), and the client gets its close and EOF."""
    node: Node = await node_factory(max_frame_bytes=MAX_FRAME)
    alice, bob = await node.user(), await node.user()
    ws = await _live_raw(node, alice, bob)
    chunk = b"\0" * (1 << 20)
    sent = 64 << 20
    rss = _rss_bytes()
    try:
        ws.send(struct.pack("!BBQ", 0x82, 0xFF, 100 << 20) + b"mask")  # 100 MiB announced
        for _ in range(sent // len(chunk)):
            ws.send(chunk)
            await asyncio.wait_for(ws.writer.drain(), 5 * UNIT)
        grown = _rss_bytes() - rss
        before, close = await ws.until_close()
        assert (before, close.close_code) == ([], 1009)
        assert await asyncio.wait_for(ws.reader.read(), 5 * UNIT) == b""
    finally:
        ws.close()
    # the server process (this one) did not keep what it read: a bound far
    # below what was sent (a buffer of the frame would be 64 MiB)
    assert grown < sent // 4, grown
