"""The server speaks systemd's notify protocol as a Type=notify unit expects."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

from conftest import UNIT, ServerProcess


async def test_ready_status_and_stopping_reach_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    server = ServerProcess(tmp_path / "data", env={"NOTIFY_SOCKET": str(path),
                                                   "WATCHDOG_USEC": "2000000"})
    try:
        await server.started()
        seen: list[str] = []

        async def until(word: str) -> None:
            while not any(word in s for s in seen):
                seen.append((await loop.sock_recv(sock, 4096)).decode())

        await asyncio.wait_for(until("READY=1"), 10 * UNIT)
        await asyncio.wait_for(until("WATCHDOG=1"), 10 * UNIT)
        assert any("STATUS=0 connections" in s for s in seen)
        server.signal(signal.SIGTERM)
        await asyncio.wait_for(until("STOPPING=1"), 10 * UNIT)
        assert await server.wait() == 0
    finally:
        server.kill()
        sock.close()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as shipped (its paths pointed at this checkout's venv, which is
    what verify checks exist) is a valid unit with the settings the operator
    relies on."""
    import shutil
    import subprocess
    import sys

    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian's systemd package)"
    unit = Path(__file__).parents[2] / "systemd" / "chatd.service"
    text = unit.read_text()
    for setting in ("Type=notify", "RuntimeDirectory=chatd", "RuntimeDirectoryMode=0700",
                    "Environment=CHATD_RUN_DIR=/run/chatd", "WatchdogSec=", "LimitNOFILE=",
                    "ExecReload=", "StateDirectory=chatd"):
        assert setting in text, setting
    stop = int(text.split("TimeoutStopSec=")[1].split()[0])
    assert stop > 10 + 5  # longer than the drain bound (drain_timeout_s + 5 s)
    venv = Path(sys.executable).parent.parent
    copy = tmp_path / "chatd.service"
    copy.write_text(text.replace("/opt/chatd/.venv", str(venv)))
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "chatd.service" not in done.stderr, done.stderr  # no warning about it


async def test_a_child_whose_loop_is_stuck_is_killed_and_restarted(tmp_path: Path) -> None:
    """SIGSTOP stands for a loop that stopped turning: the supervisor notices the
    missing reports after stuck_after_s, kills the child and starts it again."""
    import psutil

    server = ServerProcess(tmp_path / "data", "--shards", "2",
                           env={"CHATD_STUCK_AFTER_S": "3"})
    try:
        await server.started()
        [row, _] = server.admin("shards", "list")
        stuck = psutil.Process(row["pid"])
        stuck.suspend()
        loop = asyncio.get_running_loop()

        def restarted() -> None:
            assert server.proc.stdout is not None
            for line in server.proc.stdout:
                server.lines.append(line)
                if f"started shard-{row['index']}" in line:
                    return
            raise AssertionError("never restarted:\n" + "".join(server.lines))

        await asyncio.wait_for(loop.run_in_executor(None, restarted), 30 * UNIT)
        log = "".join(server.lines)
        assert f"shard-{row['index']} has not reported for" in log
        assert not stuck.is_running() or stuck.status() == psutil.STATUS_ZOMBIE
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        server.kill()
