"""Network faults without netem: a fault-injecting TCP proxy (``FaultProxy``)
between a client and the chat port delays, cuts or freezes the path."""

from __future__ import annotations

import asyncio

from conftest import UNIT
from fault_helpers import Device, FaultProxy


async def test_a_cut_mid_stream_resumes_with_last_and_misses_nothing(node_factory) -> None:
    node = await node_factory(rate_limit=False)
    alice, bob = await node.user(), await node.user()
    proxy = FaultProxy(node.port)
    await proxy.start()
    tok = node.token(bob)
    a = Device("a", alice, lambda: node.url(alice))
    b = Device("b", bob, lambda: f"ws://127.0.0.1:{proxy.port}/chat?id={bob}&token={tok}")
    try:
        proxy.delay_s = 0.005  # a slower path than loopback: copies are on the way
        for d in (a, b):
            d.start()
            await d.synced()
        pump = asyncio.ensure_future(a.pump(lambda: (10, bob), 400, window=8))
        await b.until(lambda: len(b.copies) >= 100)
        proxy.cut()  # both ways, mid-stream: no close frame, a reset
        b_top, a_top = b.top, max(a.acked.values())
        assert a_top > b_top, "nothing was on the way to b when the path broke"
        await asyncio.wait_for(pump, 30 * UNIT)
        await a.all_acked()
        acked = sorted(a.acked.values())
        # b reconnects by itself (through the proxy) with last= its highest id
        await b.until(lambda: acked[-1] in b.copies)
        assert b.connects == 2 and b.closes == [None], (b.connects, b.closes)
        assert sorted(b.copies) == acked, "a message was lost or one came that was not sent"
        # what was acked but still on the way when the path broke came by the resume
        assert all(i in b.copies for i in acked if b_top < i <= a_top)
        assert not b.dups and not b.disorder and not b.errors
    finally:
        await a.stop()
        await b.stop()
        await proxy.close()


async def test_a_half_open_connection_is_closed_by_the_idle_sweep(node_factory) -> None:
    idle_s = 0.5 * UNIT
    node = await node_factory(idle_timeout_s=idle_s)
    bob = await node.user()
    proxy = FaultProxy(node.port)
    await proxy.start()
    tok = node.token(bob)
    b = Device("b", bob, lambda: f"ws://127.0.0.1:{proxy.port}/chat?id={bob}&token={tok}")
    try:
        b.start()
        await b.synced()
        [sess] = node.shard.registry.get(bob)
        # the path stops forwarding both ways and closes nothing: the client
        # still believes it is connected, the server hears nothing more
        proxy.frozen = True
        b.keep = False
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        await asyncio.wait_for(proxy.pairs[0].server_closed.wait(), 10 * idle_s)
        await asyncio.wait_for(sess.conn.tr.wait_disconnected(), 10 * idle_s)
        took = loop.time() - frozen_at
        assert node.shard.closes.get(4000) == 1, node.shard.closes  # idle timeout
        assert node.shard.registry.get(bob) is None
        assert b.conn is not None and not b.conn.closed.is_set(), "the client saw the close"
        # pinged at 60%, closed at 100%, aborted 2 ticks after the close frame
        assert took < 3 * idle_s, took
    finally:
        await b.stop()
        await proxy.close()
