"""Every close that chatd starts is a websocket closing handshake (RFC 6455
§7.1.1): the answers to what was accepted, then the close frame, then a TCP
half-close; the socket is closed once the peer has seen it all (or after a
bound). A reset instead would discard what the client had not read yet."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

from conftest import UNIT, Client, Node, connect


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
