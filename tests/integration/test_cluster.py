"""Three chatd nodes on one PostgreSQL store and a 3-server NATS cluster:
messages between users on different nodes, devices of one user on several
nodes, routing changes through one node ordered with messages through
another, and the faults — a node, a NATS server, PostgreSQL — with every
acked message present once and every client's view equal to the store's.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from cluster_helpers import Cluster, clean, cluster, run_devices, settle, stop  # noqa: F401
from conftest import UNIT
from fault_helpers import check_devices

pytestmark = pytest.mark.slow

#: messages each device sends in the traffic tests
PER_DEVICE = 60


async def test_private_and_group_messages_between_nodes_once_and_in_order(
    cluster: Cluster,
) -> None:
    a, b, c, d = await cluster.users(4)
    assert cluster.store is not None
    gid = await cluster.store.create_group("all", a)
    for uid in (b, c, d):
        await cluster.store.join_group(gid, uid)
    n0, n1, n2 = (cluster.start(f"n{i}", "--shards", "1") for i in range(3))
    await cluster.started(n0, n1, n2)
    # d has two devices, on two nodes; each of the others is on a node of its own
    devices = [
        cluster.device("a", a, n0), cluster.device("b", b, n1), cluster.device("c", c, n2),
        cluster.device("d0", d, n0), cluster.device("d2", d, n2),
    ]
    await run_devices(devices)
    rng = random.Random(7)
    users = [a, b, c, d]

    def targets(me: int):  # type: ignore[no-untyped-def]
        def pick() -> tuple[int, int]:
            if rng.random() < 0.3:
                return 11, gid
            return 10, rng.choice([u for u in users if u != me])
        return pick

    await asyncio.gather(*(dev.pump(targets(dev.uid), PER_DEVICE) for dev in devices))
    await settle(devices)
    counts = check_devices(devices, await cluster.snapshot())
    clean(counts)
    assert counts["sent"] == PER_DEVICE * len(devices)
    # the copies really crossed nodes: each node released units of the others
    for node in (n0, n1, n2):
        assert (await cluster.log_figures(node))["remote_units"] > 0
    # d's two devices each hold everything of d's, including what the other sent
    d0, d2 = devices[3], devices[4]
    assert d0.view == d2.view
    await stop(devices)
