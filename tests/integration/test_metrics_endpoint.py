"""GET /metrics on a running node reflects what the shard does, exactly."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from conftest import UNIT, ServerProcess, close_clients, connect, run_cli, send_acked
from prometheus_client.parser import text_string_to_metric_families

#: (sample name, labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    types: dict[str, str] = {}
    values: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return types, values


def node_total(values: Samples, name: str) -> float:
    """The node's figure: the sum over its processes (as ``sum without (process)``)."""
    return sum(v for (n, _), v in values.items() if n == name)


@pytest.mark.slow
async def test_metrics_count_connections_messages_and_deliveries(tmp_path: Path) -> None:
    data = tmp_path / "data"
    alice, bob = (
        int(run_cli("user", "add", "--mobile", m, "--password", "pw", data_dir=data).stdout)
        for m in ("1", "2")
    )
    tokens = {u: run_cli("token", str(u), data_dir=data).stdout.strip() for u in (alice, bob)}
    server = ServerProcess(data, "--shards", "1")
    n = 5
    try:
        port = await server.started()
        url = f"ws://127.0.0.1:{port}/chat?id={{}}&token={{}}"
        b = await connect(url.format(bob, tokens[bob]))
        # a frame is handled only once its connection is registered, so this ack
        # says bob is live: every later message to him is a live copy
        await send_acked(b, alice, 1, prefix="hello")
        a = await connect(url.format(alice, tokens[alice]))
        await send_acked(a, bob, n)
        copies = [await b.recv_until(lambda f: f.get("cmd") == 10) for _ in range(n)]
        assert [c["content"] for c in copies] == [f"m body {i}" for i in range(n)]

        metrics_url = f"http://127.0.0.1:{server.api_port}/metrics"
        async with aiohttp.ClientSession() as session:

            async def scrape() -> tuple[dict[str, str], Samples]:
                async with session.get(metrics_url) as resp:
                    assert resp.status == 200
                    ctype = resp.headers["Content-Type"]
                    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
                    return parse(await resp.text())

            async def pushed() -> tuple[dict[str, str], Samples]:
                # children report every 2 s and the supervisor forwards every 2 s:
                # poll until the report made after the traffic has arrived
                while True:
                    types, values = await scrape()
                    if (node_total(values, "chatd_messages_stored_total") >= n + 1
                            and node_total(values, "chatd_deliveries_total") >= n):
                        return types, values
                    await asyncio.sleep(0.1)

            types, values = await asyncio.wait_for(pushed(), 15 * UNIT)
        # exact: nothing counted twice, nothing counted that did not happen
        assert node_total(values, "chatd_messages_stored_total") == n + 1
        assert node_total(values, "chatd_deliveries_total") == n  # bob's copies only
        assert node_total(values, "chatd_frames_received_total") == n + 1
        # bob: the ack of "hello" and n copies; alice: n acks
        assert node_total(values, "chatd_frames_sent_total") == 2 * n + 1
        assert node_total(values, "chatd_received_bytes_total") > 0
        assert node_total(values, "chatd_sent_bytes_total") > 0
        assert node_total(values, "chatd_connections") == 2
        assert node_total(values, "chatd_online_users") == 2
        assert node_total(values, "chatd_store_queue") == 0
        assert 1 <= node_total(values, "chatd_store_batches_total") <= n + 1
        assert values[("chatd_up", frozenset())] == 1
        shard = frozenset({("process", "shard-0")})
        api = frozenset({("process", "api-0")})
        assert values[("chatd_connections", shard)] == 2
        assert values[("chatd_process_resident_bytes", api)] > 0
        assert values[("chatd_process_open_fds", shard)] > 0
        assert values[("chatd_child_restarts_total", shard)] == 0
        assert types["chatd_messages_stored"] == "counter"
        assert types["chatd_connections"] == "gauge"
        await close_clients(a, b)
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        server.kill()
