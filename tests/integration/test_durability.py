"""Durability with a real ``chatd serve`` process: SIGTERM drains (1001, exit
0, nothing acked lost) and kill -9 right after acks loses nothing acked."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import psutil
import pytest
import websockets
from conftest import (
    TEST_PASSWORD_HASH,
    UNIT,
    ServerProcess,
    close_clients,
    connect,
    send_acked,
    sync_all,
)
from websockets.asyncio.client import connect as ws_connect

from chatd import auth
from chatd.store import open_store


async def make_users(data_dir: Path, n: int) -> list[int]:
    store = await open_store(data_dir / "chatd.db")
    try:
        return [await store.create_user(f"1370000{i:04d}", TEST_PASSWORD_HASH) for i in range(n)]
    finally:
        await store.close()


def url(port: int, data_dir: Path, uid: int) -> str:
    token = auth.issue_token(auth.load_or_create_secret(data_dir), uid, 0, 3600)
    return f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}"


async def start(server_procs: list, data_dir: Path) -> ServerProcess:
    proc = ServerProcess(data_dir)
    server_procs.append(proc)
    await proc.started()
    return proc


@pytest.mark.slow
async def test_kill_9_right_after_acks_loses_nothing_acked(tmp_path: Path, server_procs) -> None:
    alice, bob = await make_users(tmp_path, 2)
    server = await start(server_procs, tmp_path)
    a = await connect(url(server.port, tmp_path, alice))
    await sync_all(a)
    acks = await send_acked(a, bob, 200, prefix="k")
    server.signal(signal.SIGKILL)
    assert await server.wait() == -signal.SIGKILL
    await a.wait_closed()

    again = await start(server_procs, tmp_path)
    b = await connect(url(again.port, tmp_path, bob))
    frames, end = await sync_all(b)
    stored = {f["id"]: f for f in frames}
    for i, ack in enumerate(acks):
        got = stored.get(ack["id"])
        assert got is not None, f"acked message {ack} lost"
        assert got["content"] == f"k body {i}" and got["cid"] == ack["cid"]
        assert got["userid"] == alice and got["ts"] == ack["ts"]
    assert end["id"] >= acks[-1]["id"]
    # the restarted server keeps deduplicating by cid across the crash
    a2 = await connect(url(again.port, tmp_path, alice))
    (retry,) = await send_acked(a2, bob, 1, prefix="k")
    assert retry["id"] == acks[0]["id"]
    await close_clients(b, a2)


@pytest.mark.slow
async def test_sigterm_drains_with_1001_and_exit_0(tmp_path: Path, server_procs) -> None:
    alice, bob = await make_users(tmp_path, 2)
    server = await start(server_procs, tmp_path)
    a = await connect(url(server.port, tmp_path, alice))
    await sync_all(a)
    acks = await send_acked(a, bob, 50, prefix="t")
    async with ws_connect(url(server.port, tmp_path, bob)) as ws:
        await ws.send('{"cmd": 4}')  # a round trip: bob is registered
        while json.loads(await asyncio.wait_for(ws.recv(), 5 * UNIT))["cmd"] != 4:
            pass
        server.signal(signal.SIGTERM)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            while True:
                await ws.recv()  # bob's copies may still be in flight
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert await a.wait_closed(timeout=20) == 1001
    assert await server.wait() == 0

    again = await start(server_procs, tmp_path)
    b = await connect(url(again.port, tmp_path, bob))
    frames, end = await sync_all(b)
    assert [f["id"] for f in frames] == [ack["id"] for ack in acks]
    assert end["id"] == acks[-1]["id"]
    await close_clients(b)


@pytest.mark.slow
async def test_sigterm_commits_and_acks_what_was_queued(tmp_path: Path, server_procs) -> None:
    """Frames the server read before SIGTERM are committed; any ack that made
    it out before the close is on disk after a restart."""
    alice, bob = await make_users(tmp_path, 2)
    server = await start(server_procs, tmp_path)
    a = await connect(url(server.port, tmp_path, alice))
    await sync_all(a)
    for i in range(300):
        a.send(cmd=10, dstid=bob, media=1, content=f"q{i}", cid=f"q{i}")
    first = await a.recv()  # the server is committing
    server.signal(signal.SIGTERM)
    acks = [first]
    while True:
        try:
            frame = await a.recv(timeout=20)
        except TimeoutError:
            break
        if frame["cmd"] == 1:
            acks.append(frame)
        if a.closed.is_set() and a.frames.empty():
            break
    assert await a.wait_closed(timeout=20) == 1001
    assert await server.wait() == 0
    again = await start(server_procs, tmp_path)
    b = await connect(url(again.port, tmp_path, bob))
    frames, _ = await sync_all(b)
    await close_clients(b)
    stored = {f["cid"]: f["id"] for f in frames}
    for ack in acks:
        assert stored.get(ack["cid"]) == ack["id"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
async def test_a_signal_to_the_whole_group_still_drains_in_order(
        tmp_path: Path, server_procs, sig: int) -> None:
    """A terminal's Ctrl-C, ``timeout`` and ``kill -TERM -PGID`` signal every
    process of the node at the same instant. The log must still outlive the
    shards' drain: every ack that went out is on disk, the clients get 1001,
    and nothing is logged as an error (the log used to stop first, and the
    shards lost their link in the middle of their drain)."""
    alice, bob = await make_users(tmp_path, 2)
    server = ServerProcess(tmp_path, "--shards", "2", env={"CHATD_RATE_LIMIT": "false"})
    server_procs.append(server)
    await server.started()
    a = await connect(url(server.port, tmp_path, alice))
    await sync_all(a)
    for i in range(300):
        a.send(cmd=10, dstid=bob, media=1, content=f"g{i}", cid=f"g{i}")
    acks = [await a.recv()]  # the node is committing
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]
    assert len(procs) >= 4  # supervisor, log, 2 shards, api
    for p in procs:
        p.send_signal(sig)
    while True:
        try:
            frame = await a.recv(timeout=20)
        except TimeoutError:
            break
        if frame["cmd"] == 1:
            acks.append(frame)
        if a.closed.is_set() and a.frames.empty():
            break
    assert await a.wait_closed(timeout=20) == 1001
    assert await server.wait() == 0
    errors = [line for line in server.lines if " ERROR " in line or " WARNING " in line]
    assert errors == []
    again = await start(server_procs, tmp_path)
    b = await connect(url(again.port, tmp_path, bob))
    frames, _ = await sync_all(b)
    await close_clients(b)
    stored = {f["cid"]: f["id"] for f in frames}
    assert all(stored.get(ack["cid"]) == ack["id"] for ack in acks)
