"""The supervisor restarts a dead shard and never leaves orphans behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import psutil
import pytest
from conftest import (
    UNIT,
    Client,
    ServerProcess,
    close_clients,
    connect,
    free_port_range,
    run_cli,
    send_acked,
)
from picows import WSError


def _children(server: ServerProcess) -> list[psutil.Process]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # a zombie not reaped yet, or already gone
            pass
    return found


async def _wait_for(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        while not pred():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(go(), timeout * UNIT)


def _new_user(data: Path, mobile: str) -> tuple[int, str]:
    uid = int(run_cli("user", "add", "--mobile", mobile, "--password", "pw",
                      data_dir=data).stdout)
    return uid, run_cli("token", str(uid), data_dir=data).stdout.strip()


@pytest.mark.slow
async def test_a_killed_shard_is_restarted_on_the_same_port(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uid, token = _new_user(data, "100")
    server = ServerProcess(data)
    try:
        port = await server.started()
        client = await connect(f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}")
        row = await server.shard_of(uid)
        shard = psutil.Process(int(row["pid"]))
        before = {c.pid for c in _children(server)}
        assert shard.pid in before
        shard.kill()
        await client.wait_closed()
        # a new shard process: none of the ones that ran before
        await _wait_for(lambda: any(c.pid not in before for c in _children(server)))

        async def reconnect() -> Client:
            while True:
                try:
                    return await connect(f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}")
                except (OSError, WSError):  # refused until the new shard listens
                    await asyncio.sleep(0.05)

        again = await asyncio.wait_for(reconnect(), 20 * UNIT)
        server.signal(signal.SIGTERM)
        # the restarted shard drains like the first one would have: close 1001
        assert await again.wait_closed(10) == 1001
        assert await server.wait() == 0
        log = "".join(server.lines)
        assert re.search(rf"shard-{row['index']} exited with status -9 .* restarting", log), log
        assert "did not drain" not in log, log
    finally:
        server.kill()


@pytest.mark.slow
async def test_children_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    try:
        await server.started()
        children = psutil.Process(server.proc.pid).children()  # the tracker too
        assert _children(server)
        server.kill()
        gone, alive = psutil.wait_procs(children, timeout=15 * UNIT)
        assert not alive, f"orphans left: {alive}"
    finally:
        server.kill()


async def _until_logged(server: ServerProcess, needle: str, timeout: float = 15.0) -> str:
    """Read the server's output until a line contains ``needle``."""
    loop = asyncio.get_running_loop()

    def read() -> str:
        assert server.proc.stdout is not None
        for line in server.proc.stdout:
            server.lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} never logged:\n" + "".join(server.lines))

    return await asyncio.wait_for(loop.run_in_executor(None, read), timeout * UNIT)


@pytest.mark.slow
async def test_sighup_rereads_the_config_and_keeps_serving(tmp_path: Path) -> None:
    conf = tmp_path / "chatd.toml"
    conf.write_text('log_level = "info"\nidle_timeout_s = 75\n')
    server = ServerProcess(tmp_path / "data", "--config", str(conf))
    try:
        port = await server.started()
        # a bad file is refused and the node runs on
        conf.write_text("idle_timeout_s = -1\n")
        server.signal(signal.SIGHUP)
        await _until_logged(server, "reload refused")
        # a change that needs a restart is named; log_level applies at once
        conf.write_text('log_level = "warning"\nidle_timeout_s = 90\n')
        server.signal(signal.SIGHUP)
        line = await _until_logged(server, "takes a restart")
        assert "idle_timeout_s" in line
        assert server.proc.poll() is None
        uid = int(run_cli("user", "add", "--mobile", "7", "--password", "pw",
                          data_dir=server.data_dir).stdout)
        token = run_cli("token", str(uid), data_dir=server.data_dir).stdout.strip()
        client = await connect(f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}")
        client.send(cmd=10, dstid=uid, media=1, content="still here", cid="c")
        assert (await client.recv_until(lambda f: f.get("cmd") == 1))["cid"] == "c"
        client.tr.disconnect()
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        server.kill()


async def _until_all_logged(server: ServerProcess, needles: list[str],
                            timeout: float = 30.0) -> list[str]:
    """Read the server's output until each of ``needles`` is in a line; those lines."""
    loop = asyncio.get_running_loop()

    def read() -> list[str]:
        assert server.proc.stdout is not None
        found: dict[str, str] = {}
        for line in server.proc.stdout:
            server.lines.append(line)
            found.update((n, line) for n in needles if n in line and n not in found)
            if len(found) == len(needles):
                return [found[n] for n in needles]
        raise AssertionError(f"{needles} not all logged:\n" + "".join(server.lines))

    return await asyncio.wait_for(loop.run_in_executor(None, read), timeout * UNIT)


async def _reach(url: str) -> Client:
    """A connection to ``url``, trying again while nothing listens there yet."""
    while True:
        try:
            return await connect(url)
        except (OSError, WSError):  # refused until the restarted shard listens
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_every_death_is_seen_with_more_children_than_executor_threads(
        tmp_path: Path) -> None:
    """Each child's watcher is the loop's reader on its sentinel, not a thread:
    with more children than the default executor has threads, a watcher that
    pinned a thread in ``proc.join`` would never start for the last children
    (the highest shard, the API worker). The highest shard is killed first, on
    its own (a death among the first children would free a thread for it), then
    another one; each is restarted and serves on its own port again."""
    threads = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
    shards = threads  # + the log + the API worker: two children more than threads
    base = free_port_range(shards)
    data = tmp_path / "data"
    uid, token = _new_user(data, "300")
    server = ServerProcess(data, "--shards", str(shards),
                           env={"CHATD_SHARD_BASE_PORT": str(base)})
    loop = asyncio.get_running_loop()
    try:
        await server.started(timeout=60)
        assert len(_children(server)) == shards + 2 > threads
        rows = await loop.run_in_executor(None, server.admin, "shards", "list")
        assert [r["index"] for r in rows] == list(range(shards))
        assert all(r["ready"] for r in rows)
        pids = {r["index"]: r["pid"] for r in rows}

        for victim in (shards - 1, 1):
            psutil.Process(pids[victim]).kill()
            _, started = await _until_all_logged(
                server, [f"shard-{victim} exited with status -9", f"started shard-{victim} (pid"])
            new_pid = int(re.search(r"\(pid (\d+)\)", started).group(1))  # type: ignore[union-attr]
            assert new_pid != pids[victim]
            # a round trip through the restarted shard and the log
            client = await asyncio.wait_for(
                _reach(f"ws://127.0.0.1:{base + victim}/chat?id={uid}&token={token}"), 20 * UNIT)
            await send_acked(client, uid, 1, prefix=f"s{victim}-")
            await close_clients(client)
            rows = await loop.run_in_executor(None, server.admin, "shards", "list")
            [row] = [r for r in rows if r["index"] == victim]
            assert (row["pid"], row["ready"], row["restarts"]) == (new_pid, True, 1), row
            assert {r["index"]: r["pid"] for r in rows} == {**pids, victim: new_pid}
            pids[victim] = new_pid

        server.signal(signal.SIGTERM)
        assert await server.wait(30) == 0
    finally:
        server.kill()


def _comm(pid: int, tid: int | None = None) -> str:
    """The kernel's name of a process (its main thread) or of one of its threads."""
    where = f"/proc/{pid}" + (f"/task/{tid}" if tid is not None else "")
    try:
        return Path(where, "comm").read_text().strip()
    except OSError:
        return ""


def _names(server: ServerProcess) -> dict[str, set[str]]:
    """Each worker process's name -> the names of its threads."""
    out: dict[str, set[str]] = {}
    for child in _children(server):
        try:
            tids = [t.id for t in child.threads()]
        except psutil.Error:
            continue
        out[_comm(child.pid)] = {_comm(child.pid, tid) for tid in tids}
    return out


async def test_each_child_and_thread_carries_its_role_in_its_name(tmp_path: Path) -> None:
    """top -H / ps -L tell the log, the shards, the API worker and the store's
    threads apart (the bench splits the CPU by these names)."""
    server = ServerProcess(tmp_path / "data", "--shards", "2")
    try:
        await server.started()
        expected = {"chatd-log", "chatd-shard-0", "chatd-shard-1", "chatd-api-0"}

        def named() -> bool:
            names = _names(server)
            return expected <= names.keys() and {
                "chatd-writer", "chatd-reader", "chatd-checkpt"} <= names["chatd-log"]

        await _wait_for(named)
        names = _names(server)
        # a shard reads the store (replays, look-ups) and writes nothing
        for shard in ("chatd-shard-0", "chatd-shard-1"):
            assert "chatd-reader" in names[shard], names
            assert "chatd-writer" not in names[shard], names
        # no worker is left with the interpreter's name
        assert not [n for n in names if n.startswith("python")], names
    finally:
        server.kill()
