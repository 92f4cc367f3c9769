"""The NATS link between nodes (``chatd.bus.nats``) on a real 3-server NATS
cluster: interest subjects, order, the header stream, failover."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import UNIT
from nats_helpers import NatsCluster

from chatd.bus.nats import Header, NodeBus, group_subject, user_subject
from chatd.errors import StoreUnavailable
from chatd.store import EVENT_JOIN, Event
from chatd.wire import Message


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats")
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Ear:
    """What one node hears, in order, with an event per arrival."""

    def __init__(self) -> None:
        self.heard: list[tuple[Any, ...]] = []
        self.changed = asyncio.Event()
        self.lost = 0
        self.back = asyncio.Event()

    def header(self, h: Header) -> None:
        self.heard.append(("h", h.prev, h.last))
        self.changed.set()

    def payload(self, prev: int, kind: str, key: int, msgs: list[Message]) -> None:
        self.heard.append(("p", prev, kind, key, [m.id for m in msgs]))
        self.changed.set()

    def on_lost(self) -> None:
        self.lost += 1

    def on_back(self) -> None:
        self.back.set()

    async def until(self, n: int, timeout: float = 5.0) -> None:
        async def go() -> None:
            while len(self.heard) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(go(), timeout * UNIT)


def make_bus(urls: list[str], name: str, ear: Ear) -> NodeBus:
    return NodeBus(urls, name, on_header=ear.header, on_payload=ear.payload,
                   on_lost=ear.on_lost, on_back=ear.on_back)


def pm(mid: int, src: int, dst: int) -> Message:
    return Message(id=mid, userid=src, cmd=10, dstid=dst, media=1, content=f"m{mid}")


async def subscribed(bus: NodeBus, n: int, timeout: float = 5.0) -> None:
    """Wait until the bus holds ``n`` interest subscriptions and its server has them."""

    async def go() -> None:
        while bus.subscriptions != n:
            await asyncio.sleep(0.01)
        await bus._nc.flush()

    await asyncio.wait_for(go(), timeout * UNIT)


async def test_payloads_reach_only_the_nodes_that_want_them_before_their_header(
    nats_cluster: NatsCluster,
) -> None:
    ears = [Ear() for _ in range(3)]
    # each node on a server of its own: routes carry everything between them
    buses = [make_bus([url], f"n{i}", ear)
             for i, (url, ear) in enumerate(zip(nats_cluster.urls, ears, strict=True))]
    for bus in buses:
        await bus.start()
    try:
        buses[1].want("u", 5, True)
        buses[2].want("g", 9, True)
        await subscribed(buses[1], 1)
        await subscribed(buses[2], 1)
        # the publisher's server has heard of both interests over the routes
        await nats_cluster.interest(0, user_subject(5))
        await nats_cluster.interest(0, group_subject(9))
        msgs = {user_subject(5): [pm(11, 6, 5)], user_subject(6): [pm(11, 6, 5)],
                group_subject(9): [Message(id=12, userid=6, cmd=11, dstid=9)]}
        buses[0].publish(Header("n0", 10, 12, [5, 6], [9]), msgs)
        await ears[1].until(2)
        await ears[2].until(2)
        assert ears[1].heard == [("p", 10, "u", 5, [11]), ("h", 10, 12)]
        assert ears[2].heard == [("p", 10, "g", 9, [12]), ("h", 10, 12)]
        # the publisher does not hear itself; nobody wanted u.6
        assert ears[0].heard == []
        # stop wanting: the next unit's payload does not come, its header does
        buses[1].want("u", 5, False)
        await subscribed(buses[1], 0)
        await nats_cluster.interest(0, user_subject(5), present=False)
        buses[0].publish(Header("n0", 12, 13, [5]), {user_subject(5): [pm(13, 6, 5)]})
        await ears[1].until(3)
        assert ears[1].heard[2:] == [("h", 12, 13)]
    finally:
        for bus in buses:
            await bus.close()


async def test_routing_changes_and_broadcasts_ride_in_the_header(
    nats_cluster: NatsCluster,
) -> None:
    ear = Ear()
    got: list[Header] = []
    bus_b = NodeBus(nats_cluster.urls[1:2], "b", on_header=got.append,
                    on_payload=ear.payload, on_lost=ear.on_lost, on_back=ear.on_back)
    bus_a = make_bus(nats_cluster.urls[:1], "a", Ear())
    await bus_a.start()
    await bus_b.start()
    try:
        # b's header subscription crossed the route (a, on server 0, wants
        # chatd.h too: its own subscription must not count)
        await nats_cluster.interest(0, "chatd.h", routed_only=True)
        everyone = Message(id=4, userid=0, cmd=10, dstid=0, content="hello all")
        bus_a.publish(Header("a", 2, 3, events=[Event(3, EVENT_JOIN, 7, 8)]), {})
        bus_a.publish(Header("a", 3, 4, everyone=[everyone]), {})

        async def two() -> None:
            while len(got) < 2:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(two(), 5 * UNIT)
        assert got[0].events == [Event(3, EVENT_JOIN, 7, 8)]
        assert got[1].everyone == [everyone]
    finally:
        await bus_a.close()
        await bus_b.close()


async def test_a_dead_server_fails_over_and_subscriptions_come_back(
    nats_cluster: NatsCluster,
) -> None:
    ear, pub_ear = Ear(), Ear()
    # the listener knows every server; the publisher is on another one than it
    listener = make_bus(nats_cluster.urls, "l", ear)
    await listener.start()
    ports = [s.client_port for s in nats_cluster.servers]
    index = ports.index(listener._nc.connected_url.port)
    other = (index + 1) % len(ports)
    publisher = make_bus([nats_cluster.urls[other]], "p", pub_ear)
    await publisher.start()
    try:
        listener.want("u", 1, True)
        await subscribed(listener, 1)
        nats_cluster.servers[index].kill()
        await asyncio.wait_for(ear.back.wait(), 15 * UNIT)
        assert ear.lost >= 1
        assert listener.up
        await nats_cluster.formed()
        await nats_cluster.interest(other, user_subject(1))
        publisher.publish(Header("p", 0, 1, [1]), {user_subject(1): [pm(1, 2, 1)]})
        await ear.until(2, 10)
        assert ear.heard == [("p", 0, "u", 1, [1]), ("h", 0, 1)]
    finally:
        await listener.close()
        await publisher.close()


async def test_a_publish_while_the_link_is_down_is_dropped_and_counted(
    nats_cluster: NatsCluster,
) -> None:
    bus = make_bus(nats_cluster.urls[:1], "x", Ear())
    await bus.start()
    try:
        # every server: a client learns the cluster's other servers from the first
        for server in nats_cluster.servers:
            server.kill()

        async def down() -> None:
            while bus.up:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(down(), 10 * UNIT)
        bus.publish(Header("x", 0, 1, [1]), {user_subject(1): [pm(1, 2, 1)]})
        assert bus.dropped == 1 and bus.published == 0
    finally:
        await bus.close()


async def test_no_server_is_unavailable_at_start(tmp_path: Path) -> None:
    from net_helpers import free_port

    bus = make_bus([f"nats://127.0.0.1:{free_port()}"], "x", Ear())
    with pytest.raises(StoreUnavailable, match="cannot reach NATS"):
        await bus.start(timeout_s=1.0)
