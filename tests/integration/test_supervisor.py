"""The supervisor restarts a dead shard and never leaves orphans behind."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import psutil
import pytest
from conftest import UNIT, Client, ServerProcess, connect, run_cli
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
