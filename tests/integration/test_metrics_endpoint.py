"""GET /metrics on a running node reflects what its shards and its log do, exactly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import UNIT, ServerProcess, close_clients, connect, run_cli, send_acked
from net_helpers import free_port_range
from picows import WSInvalidStatusError
from prometheus_client.parser import text_string_to_metric_families

from chatd import auth

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


def one(values: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (KeyError if it is not there)."""
    return values[(name, frozenset(labels.items()))]


def of(values: Samples, name: str, process: str) -> float:
    """One process's sample of a metric without other labels; 0 if it gives none."""
    return values.get((name, frozenset({("process", process)})), 0.0)


@pytest.mark.slow
async def test_two_shards_add_up_to_the_traffic_closes_and_auth_failures(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    """``serve --shards 2`` (the log in a process of its own), each client on a
    shard chosen through ``shard_base_port``: every figure of each process and
    their sum is what the traffic made, through prometheus_client's parser."""
    data = tmp_path / "data"
    alice, bob, carol, dave = (
        int(run_cli("user", "add", "--mobile", m, "--password", "pw1234", data_dir=data).stdout)
        for m in ("1", "2", "3", "4")
    )
    base = free_port_range(2)
    server = ServerProcess(data, "--shards", "2", env={"CHATD_SHARD_BASE_PORT": str(base)})
    server_procs.append(server)
    await server.started()
    secret = auth.load_or_create_secret(data)

    def url(uid: int, shard: int, token: str | None = None) -> str:
        token = token if token is not None else auth.issue_token(secret, uid, 0, 3600)
        return f"ws://127.0.0.1:{base + shard}/chat?id={uid}&token={token}"

    n, k, m = 7, 4, 9
    # bob on shard 1; his ack says he is registered (a frame is handled only
    # then), so every later message to him is a live copy
    b = await connect(url(bob, 1))
    await send_acked(b, dave, 1, prefix="hello")  # dave is offline: stored, not delivered
    a = await connect(url(alice, 0))
    await send_acked(a, carol, 1, prefix="hi")  # alice registered on shard 0
    # (send_acked drops what else arrives: each side reads its copies first)
    await send_acked(a, bob, n)
    got_b = [await b.recv_until(lambda f: f.get("cmd") == 10) for _ in range(n)]
    await send_acked(b, alice, k, prefix="back")
    got_a = [await a.recv_until(lambda f: f.get("cmd") == 10) for _ in range(k)]
    assert [f["content"] for f in got_b] == [f"m body {i}" for i in range(n)]
    assert [f["content"] for f in got_a] == [f"back body {i}" for i in range(k)]
    stored = 2 + n + k

    metrics_url = f"http://127.0.0.1:{server.api_port}/metrics"
    async with aiohttp.ClientSession() as session:

        async def scrape() -> Samples:
            async with session.get(metrics_url) as resp:
                assert resp.status == 200
                return parse(await resp.text())[1]

        async def until(ready: Callable[[Samples], bool]) -> Samples:
            # children report every 2 s and the supervisor forwards every 2 s:
            # wait (bounded) for the reports made after the traffic; counters
            # only grow, so the exact checks below still catch any excess
            last: list[Samples] = [{}]

            async def go() -> Samples:
                while not ready(values := await scrape()):
                    last[0] = values
                    await asyncio.sleep(0.1)
                return values

            try:
                return await asyncio.wait_for(go(), 15 * UNIT)
            except TimeoutError:
                shown = sorted((n, sorted(ls), v) for (n, ls), v in last[0].items()
                               if "_process_" not in n and "_bucket" not in n)
                raise AssertionError(f"figures never got there: {shown}") from None

        values = await until(lambda v: (
            node_total(v, "chatd_messages_stored_total") >= stored
            and of(v, "chatd_deliveries_total", "shard-0") >= k
            and of(v, "chatd_deliveries_total", "shard-1") >= n
            and of(v, "chatd_frames_sent_total", "shard-0") >= 1 + n + k
            and of(v, "chatd_frames_sent_total", "shard-1") >= 1 + k + n
            and of(v, "chatd_connections", "shard-0") == of(v, "chatd_connections", "shard-1")
            == 1))
        # each shard: its own client's frames, acks and copies
        assert of(values, "chatd_frames_received_total", "shard-0") == 1 + n
        assert of(values, "chatd_frames_received_total", "shard-1") == 1 + k
        assert of(values, "chatd_frames_sent_total", "shard-0") == (1 + n) + k  # acks, copies
        assert of(values, "chatd_frames_sent_total", "shard-1") == (1 + k) + n
        assert of(values, "chatd_deliveries_total", "shard-0") == k
        assert of(values, "chatd_deliveries_total", "shard-1") == n
        assert of(values, "chatd_online_users", "shard-0") == 1
        assert of(values, "chatd_online_users", "shard-1") == 1
        # the node: sums over the processes; the log alone stores
        assert node_total(values, "chatd_messages_stored_total") == stored
        assert of(values, "chatd_messages_stored_total", "log-0") == stored
        assert node_total(values, "chatd_deliveries_total") == n + k
        assert node_total(values, "chatd_frames_received_total") == stored
        assert node_total(values, "chatd_connections") == 2
        assert node_total(values, "chatd_auth_failures_total") == 0
        assert node_total(values, "chatd_closes_total") == 0
        batches = store_histograms(values, stored)

        # closes and refusals, each on a chosen shard
        with pytest.raises(WSInvalidStatusError) as bad:
            await connect(url(carol, 0, token="1.2.3.forged"))
        assert bad.value.response.status == 401
        with pytest.raises(WSInvalidStatusError) as missing:
            await connect(f"ws://127.0.0.1:{base + 1}/chat?id={carol}")
        assert missing.value.response.status == 401
        flooder = await connect(url(carol, 1))
        await send_acked(flooder, dave, 1, prefix="warm")  # registered: flood control applies
        for _ in range(2000):  # past rate_burst (600) at once
            flooder.send(cmd=0)
        assert await flooder.wait_closed() == 4008
        loop = asyncio.get_running_loop()
        kicked = await loop.run_in_executor(None, server.admin, "kick", str(alice))
        assert kicked["closed"] == 1 and await a.wait_closed() == 4001
        await send_acked(b, dave, m, prefix="more")
        stored += 1 + m

        def closes(v: Samples, shard: str, code: int) -> float:
            return v.get(("chatd_closes_total",
                          frozenset({("process", shard), ("code", str(code))})), 0.0)

        values = await until(lambda v: (
            node_total(v, "chatd_messages_stored_total") >= stored
            and closes(v, "shard-0", 4001) >= 1 and closes(v, "shard-1", 4008) >= 1
            and node_total(v, "chatd_auth_failures_total") >= 2
            and node_total(v, "chatd_connections") == 1))
        assert closes(values, "shard-0", 4001) == 1
        assert closes(values, "shard-1", 4008) == 1
        assert node_total(values, "chatd_closes_total") == 2
        assert of(values, "chatd_auth_failures_total", "shard-0") == 1
        assert of(values, "chatd_auth_failures_total", "shard-1") == 1
        assert of(values, "chatd_connections", "shard-1") == 1  # bob
        assert node_total(values, "chatd_messages_stored_total") == stored
        later = store_histograms(values, stored)
        assert 1 <= later - batches <= 1 + m  # m + 1 more messages, in that many batches at most
        assert one(values, "chatd_child_restarts_total", process="shard-1") == 0
    await close_clients(b)
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0


def store_histograms(values: Samples, stored: int) -> float:
    """Check the log's batch-size and commit-time histograms against ``stored``
    messages and its batch counter; the number of batches."""
    log_ = {("process", "log-0")}
    batches = one(values, "chatd_store_batches_total", process="log-0")
    assert one(values, "chatd_store_batch_size_count", process="log-0") == batches
    assert one(values, "chatd_store_batch_size_sum", process="log-0") == stored
    assert one(values, "chatd_store_commit_seconds_count", process="log-0") == batches
    assert one(values, "chatd_store_commit_seconds_sum", process="log-0") > 0
    for name in ("chatd_store_batch_size", "chatd_store_commit_seconds"):
        buckets = sorted(
            (float(dict(labels)["le"]), value) for (sample, labels), value in values.items()
            if sample == f"{name}_bucket" and set(labels) - {("le", dict(labels)["le"])} == log_)
        counts = [count for _, count in buckets]
        assert buckets[-1][0] == float("inf") and counts[-1] == batches
        assert counts == sorted(counts)  # cumulative
    assert 1 <= batches <= stored
    return batches
