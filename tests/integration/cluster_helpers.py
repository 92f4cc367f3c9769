"""A chatd cluster on loopback for the tests: a real 3-server NATS cluster, a
throwaway PostgreSQL database, one shared token secret, and ``chatd serve``
nodes (``fault_helpers.NodeProcess``: their own process groups, their output
pumped all along) started with ``--store``, ``--bus`` and ``--node-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from conftest import UNIT
from fault_helpers import Device, NodeProcess, Snapshot
from nats_helpers import NatsCluster

from chatd import auth
from chatd.admin import AdminClient
from chatd.store.postgres import PostgresStore


class Cluster:
    """The engines and the nodes of one test."""

    def __init__(self, folder: Path, dsn: str, nats: NatsCluster) -> None:
        self.folder = folder
        self.dsn = dsn
        self.nats = nats
        self.secret_file = folder / "secret"
        self.secret = secrets.token_bytes(32)
        self.secret_file.write_bytes(self.secret)
        os.chmod(self.secret_file, 0o600)
        self.nodes: list[NodeProcess] = []
        self.store: PostgresStore | None = None
        #: the PostgreSQL server (tests/pg_helpers.py), for the fault tests
        self.pg: Any = None
        self.http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # the test's own connection: users and groups made before the nodes
        # start, and the API's view; it migrates the empty database first
        self.store = await PostgresStore.open(self.dsn)
        self.http = aiohttp.ClientSession()

    async def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self.http is not None:
            await self.http.close()
        if self.store is not None:
            await self.store.close()
        self.nats.stop()

    def start(self, name: str, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
        """Start node ``name`` (its data folder is its own; the engines are shared)."""
        node = NodeProcess(
            self.folder / name,
            "--store", self.dsn,
            "--bus", ",".join(self.nats.urls),
            "--node-id", name,
            *extra,
            env={
                "CHATD_SECRET_FILE": str(self.secret_file),
                "CHATD_RATE_LIMIT": "false",
                "CHATD_MAX_CONNS_PER_IP": "0",
                **(env or {}),
            },
        )
        self.nodes.append(node)
        return node

    async def started(self, *nodes: NodeProcess) -> None:
        await asyncio.gather(*(n.started(timeout=60) for n in nodes))

    async def users(self, n: int) -> list[int]:
        assert self.store is not None
        return [await self.store.create_user(f"1500000{i:04d}", "x", f"u{i}") for i in range(n)]

    def token(self, uid: int) -> str:
        return auth.issue_token(self.secret, uid, 0, 3600)

    def url_of(self, uid: int, *prefer: NodeProcess) -> Callable[[], str]:
        """A device's url: the first node of ``prefer`` still running (any node
        serves any user: after a node dies its clients go to the next)."""
        tok = self.token(uid)

        def url() -> str:
            for node in prefer:
                if node.proc.poll() is None and node.port:
                    return f"ws://127.0.0.1:{node.port}/chat?id={uid}&token={tok}"
            return f"ws://127.0.0.1:{prefer[0].port}/chat?id={uid}&token={tok}"

        return url

    def device(self, name: str, uid: int, *prefer: NodeProcess) -> Device:
        return Device(name, uid, self.url_of(uid, *prefer))

    async def call(self, node: NodeProcess, path: str, uid: int, **fields: Any) -> Any:
        """The ``data`` of an API call on ``node`` that must succeed."""
        assert self.http is not None
        url = f"http://127.0.0.1:{node.api_port}{path}"
        headers = {"Authorization": f"Bearer {self.token(uid)}"}
        async with self.http.post(url, data=fields, headers=headers) as resp:
            body = await resp.json()
            assert (resp.status, body["code"]) == (200, 0), (path, body)
            return body["data"]

    async def snapshot(self) -> Snapshot:
        return await Snapshot.of_postgres(self.dsn)

    async def log_figures(self, node: NodeProcess) -> dict[str, Any]:
        """The node's log's own report, the first one made after this call
        (children report every 2 s, stamped with CLOCK_MONOTONIC)."""
        client = AdminClient(node.data_dir.resolve() / "run" / "admin.sock")
        asked = time.monotonic()
        deadline = asked + 10 * UNIT
        while time.monotonic() < deadline:
            snapshot = await client.request(cmd="stats")
            for child in snapshot["children"]:
                status = child.get("status", {})
                if "chain_w" in status and status.get("at", 0) > asked:
                    return dict(status)
            await asyncio.sleep(0.25)
        raise AssertionError(f"no fresh report of the log in 10 s: {snapshot}")


@contextlib.asynccontextmanager
async def open_cluster(folder: Path, pg_server: Any, dsn: str) -> AsyncIterator[Cluster]:
    """The engines of a test (NATS started here, PostgreSQL given); nodes are
    started by the test and all killed at the end, their output shown."""
    nats = NatsCluster(folder / "nats")
    await nats.start()
    c = Cluster(folder, dsn, nats)
    c.pg = pg_server
    try:
        await c.open()
        yield c
    finally:
        await c.close()
        for node in c.nodes:
            print(f"--- output of node {node.data_dir.name}, last lines ---")
            print("".join(node.lines[-60:]))


async def run_devices(devices: list[Device]) -> None:
    """Start every device and wait until each has caught up."""
    for d in devices:
        d.start()
    await asyncio.gather(*(d.synced(30) for d in devices))


async def settle(devices: list[Device]) -> None:
    """Every message acked, then one more resume each (what a client does
    after a fault: its view is then what sync returns)."""
    await asyncio.gather(*(d.all_acked(60) for d in devices))
    await asyncio.gather(*(d.final_sync(30) for d in devices))


async def stop(devices: list[Device]) -> None:
    await asyncio.gather(*(d.stop() for d in devices))


def clean(counts: dict[str, int]) -> None:
    """Assert a run lost nothing, doubled nothing, reordered nothing."""
    assert counts["lost"] == 0, counts
    assert counts["duplicates"] == 0, counts
    assert counts["disorder"] == 0, counts
    assert counts["foreign"] == 0, counts
    assert counts["errors"] == 0, counts
    assert counts["unacked"] == 0, counts
    assert counts["acked"] == counts["sent"] == counts["stored"], counts


__all__ = ["UNIT", "Cluster", "clean", "open_cluster", "run_devices", "settle", "stop"]
