"""Liveness: idle connections are closed (4000), heartbeats and pongs keep a
connection open, and a slow consumer is dropped (4009) and catches up by sync."""

from __future__ import annotations

import asyncio

from conftest import UNIT, Client, Node, connect, send_acked, sync_all

from chatd.protocol import CLOSING

IDLE_S = 0.5


async def test_silent_client_is_closed_4000(node_factory) -> None:
    node = await node_factory(idle_timeout_s=IDLE_S)
    alice = await node.user()
    # no auto pong: the client ignores the server's pings, as a dead peer would
    a = await connect(node.url(alice), enable_auto_pong=False)
    await sync_all(a)
    assert await a.wait_closed(timeout=10 * IDLE_S + 5) == 4000


async def test_client_sending_heartbeats_stays_open(node_factory) -> None:
    node = await node_factory(idle_timeout_s=IDLE_S)
    alice = await node.user()
    a = await connect(node.url(alice), enable_auto_pong=False)
    await sync_all(a)
    # beat at a fifth of the timeout for three timeouts (paced, not a sync point)
    for _ in range(15):
        a.send(cmd=0)
        await asyncio.sleep(IDLE_S / 5)
        assert not a.closed.is_set(), f"closed with {a.close_code}"
    await send_acked(a, alice, 1)
    assert not a.closed.is_set()


async def test_client_answering_pings_stays_open(node_factory) -> None:
    node = await node_factory(idle_timeout_s=IDLE_S)
    alice, bob = await node.user(), await node.user()
    b = await connect(node.url(bob))  # picows answers pings by default
    await sync_all(b)
    start = node.shard.tick

    async def ticks(n: int) -> None:
        while node.shard.tick < start + n:
            await asyncio.sleep(IDLE_S / 10)

    # three idle timeouts measured on the server's own clock
    await asyncio.wait_for(ticks(15), 30 * UNIT)
    assert not b.closed.is_set(), f"closed with {b.close_code}"
    a = await connect(node.url(alice))
    (ack,) = await send_acked(a, bob, 1)
    assert (await b.recv())["id"] == ack["id"]


async def test_heartbeat_is_not_answered(node: Node) -> None:
    alice = await node.user()
    a = await connect(node.url(alice))
    a.send(cmd=0)
    _, end = await sync_all(a)  # the next frame back is the sync's answer
    assert end["cmd"] == 4


async def wait_closing(node: Node, uid: int, flood) -> None:
    """Run ``flood`` rounds until the server marks every connection of ``uid`` closing."""
    for _ in range(200):
        conns = node.shard.registry.get(uid) or []
        if all(c.state == CLOSING for c in conns):
            return
        await flood()
    raise AssertionError("the slow consumer was never dropped")


async def test_slow_consumer_is_dropped_4009_and_loses_nothing(node_factory) -> None:
    node = await node_factory(slow_consumer_bytes=16_384, rate_limit=False)
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    await sync_all(a)
    b: Client = await connect(node.url(bob))
    await sync_all(b)
    b.tr.underlying_transport.pause_reading()  # bob stops reading
    acks: list[dict] = []
    rounds = 0

    async def flood() -> None:
        nonlocal rounds
        rounds += 1
        batch = await send_acked(a, bob, 20, prefix=f"r{rounds}-")
        acks.extend(batch)

    # socket buffers absorb some megabytes first; bigger frames fill them sooner
    big = "x" * 7000

    async def flood_big() -> None:
        nonlocal rounds
        rounds += 1
        for i in range(20):
            a.send(cmd=10, dstid=bob, media=1, content=big, cid=f"big{rounds}-{i}")
        wanted = {f"big{rounds}-{i}" for i in range(20)}
        while wanted:
            frame = await a.recv(timeout=10)
            assert frame["cmd"] == 1, frame
            wanted.discard(frame["cid"])
            acks.append(frame)

    await flood()
    await wait_closing(node, bob, flood_big)
    await flood()  # acked while bob is gone: must come through sync
    b.tr.underlying_transport.resume_reading()
    assert await b.wait_closed(timeout=30) == 4009
    # bob reconnects and gets every acked message, once, in order
    b2 = await connect(node.url(bob))
    frames, end = await sync_all(b2, timeout=30)
    got = [f["id"] for f in frames]
    assert got == sorted(ack["id"] for ack in acks)
    assert end["id"] == max(got)
