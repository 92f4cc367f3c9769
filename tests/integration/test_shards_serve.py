"""``chatd serve --shards N`` under traffic while shards and the log are
killed, added and drained: every acked message reaches its receiver exactly
once and in id order, across reconnects (``last=``) and catch-ups."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import psutil
import pytest
from conftest import UNIT, ServerProcess, run_cli
from traffic import Receiver, Sender

from chatd import auth

N = 3000
#: paced, so that the faults land in the middle of the traffic
RATE_PER_S = 1000.0


def _users(data: Path, n: int) -> list[int]:
    return [int(run_cli("user", "add", "--mobile", f"7{i}", "--password", "pw1234",
                        data_dir=data).stdout) for i in range(n)]


async def _start(server_procs: list[ServerProcess], data: Path, shards: int) -> ServerProcess:
    server = ServerProcess(data, "--shards", str(shards), env={"CHATD_RATE_LIMIT": "false"})
    server_procs.append(server)
    await server.started()
    return server


def _url(server: ServerProcess, data: Path, uid: int) -> str:
    token = auth.issue_token(auth.load_or_create_secret(data), uid, 0, 3600)
    return f"ws://127.0.0.1:{server.port}/chat?id={uid}&token={token}"


def _check(sender: Sender, receiver: Receiver) -> None:
    assert len(sender.acked) == N
    ids = receiver.ids
    assert len(ids) == len(set(ids)), "a message arrived twice"
    assert ids == sorted(ids), "ids out of order"
    assert set(ids) == set(sender.acked.values()), "acked messages missing"


async def _traffic(server: ServerProcess, data: Path) -> tuple[Sender, Receiver,
                                                               asyncio.Event, asyncio.Task[None]]:
    alice, bob = _users(data, 2)
    receiver = Receiver(lambda: _url(server, data, bob))
    stop = asyncio.Event()
    receiving = asyncio.ensure_future(receiver.run(stop))
    await server.shard_of(bob)
    sender = Sender(lambda: _url(server, data, alice), bob, N, rate_per_s=RATE_PER_S)
    return sender, receiver, stop, receiving


async def _finish(sender_task: asyncio.Task[None], sender: Sender, receiver: Receiver,
                  stop: asyncio.Event, receiving: asyncio.Task[None]) -> None:
    await asyncio.wait_for(sender_task, 60 * UNIT)
    await receiver.settle(N)
    stop.set()
    await asyncio.wait_for(receiving, 10 * UNIT)
    _check(sender, receiver)


@pytest.mark.slow
async def test_kill_9_of_a_shard_under_traffic_loses_nothing(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    data = tmp_path / "data"
    server = await _start(server_procs, data, 2)
    sender, receiver, stop, receiving = await _traffic(server, data)
    row = await server.shard_of(receiver_uid(receiver))
    sending = asyncio.ensure_future(sender.run())
    await sender.until_acked(N // 4)
    psutil.Process(row["pid"]).kill()
    await _finish(sending, sender, receiver, stop, receiving)
    assert receiver.connections >= 2  # it was cut off and came back
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0
    assert re.search(rf"shard-{row['index']} exited with status -9", "".join(server.lines))


def receiver_uid(receiver: Receiver) -> int:
    return int(re.search(r"id=(\d+)", receiver.url()).group(1))  # type: ignore[union-attr]


@pytest.mark.slow
async def test_kill_9_of_the_log_under_traffic_loses_nothing(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    data = tmp_path / "data"
    server = await _start(server_procs, data, 2)
    [log_pid] = re.findall(r"started log-0 \(pid (\d+)\)", "".join(server.lines))
    sender, receiver, stop, receiving = await _traffic(server, data)
    sending = asyncio.ensure_future(sender.run())
    await sender.until_acked(N // 4)
    psutil.Process(int(log_pid)).kill()
    await _finish(sending, sender, receiver, stop, receiving)
    # the shards kept their clients: the receiver caught up on its connection,
    # the sender was answered 503 on its own
    assert receiver.connections == 1 and sender.connections == 1
    assert sender.refused > 0  # "retry" while the log was away
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0
    assert "log-0 exited with status -9" in "".join(server.lines)


@pytest.mark.slow
async def test_scale_up_drain_and_scale_down_under_traffic_loses_nothing(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    data = tmp_path / "data"
    server = await _start(server_procs, data, 2)
    sender, receiver, stop, receiving = await _traffic(server, data)
    sending = asyncio.ensure_future(sender.run())
    loop = asyncio.get_running_loop()
    await sender.until_acked(N // 5)
    grown = await loop.run_in_executor(None, server.admin, "shards", "scale", "3")
    assert len(grown["shards"]) == 3
    row = await server.shard_of(receiver_uid(receiver))
    await sender.until_acked(2 * N // 5)
    drained = await loop.run_in_executor(None, server.admin, "shards", "drain",
                                         str(row["index"]))
    assert row["index"] not in drained["shards"] and len(drained["shards"]) == 2
    await sender.until_acked(3 * N // 5)
    shrunk = await loop.run_in_executor(None, server.admin, "shards", "scale", "1")
    assert len(shrunk["shards"]) == 1
    await _finish(sending, sender, receiver, stop, receiving)
    assert 1012 in receiver.close_codes  # moved off the drained shard, resumed
    listed = await loop.run_in_executor(None, server.admin, "shards", "list")
    assert [s["index"] for s in listed] == shrunk["shards"]
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0


@pytest.mark.slow
async def test_one_shard_running_the_log_scales_out_and_back_under_traffic(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    """With one shard the log runs inside it (no hop between processes); more
    shards added at run time reach it over its socket; it is never retired."""
    data = tmp_path / "data"
    server = await _start(server_procs, data, 1)
    assert "log-0" not in "".join(server.lines)
    assert "with the node's log" in "".join(server.lines)
    sender, receiver, stop, receiving = await _traffic(server, data)
    sending = asyncio.ensure_future(sender.run())
    loop = asyncio.get_running_loop()
    await sender.until_acked(N // 4)
    grown = await loop.run_in_executor(None, server.admin, "shards", "scale", "2")
    assert grown["shards"] == [0, 1]
    refused = run_cli("admin", "shards", "drain", "0", data_dir=data, check=False)
    assert refused.returncode == 1 and "runs the log" in refused.stderr
    await sender.until_acked(N // 2)
    shrunk = await loop.run_in_executor(None, server.admin, "shards", "scale", "1")
    assert shrunk["shards"] == [0]
    await _finish(sending, sender, receiver, stop, receiving)
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0
