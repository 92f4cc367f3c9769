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
