"""A node killed with -9 (the whole process group, as a crash or the OOM
killer leaves it) starts again at once on the same ports, while a port that
another live chatd listens on is still refused."""

from __future__ import annotations

import contextlib
import signal
import socket
from pathlib import Path

import psutil
import pytest
from conftest import ServerProcess, close_clients, connect, run_cli, send_acked, sync_all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_group(server: ServerProcess) -> None:
    """SIGKILL the supervisor and every process under it at the same instant."""
    procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    server.proc.wait()


def _server_side_sockets(port: int) -> list[str]:
    return [c.status for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.raddr]


@pytest.mark.slow
async def test_a_node_killed_with_9_starts_again_at_once_on_the_same_port(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    data = tmp_path / "data"
    uid = int(run_cli("user", "add", "--mobile", "1", "--password", "pw1234",
                      data_dir=data).stdout)
    token = run_cli("token", str(uid), data_dir=data).stdout.strip()
    chat, api = _free_port(), _free_port()
    ports = ("--chat-port", str(chat), "--api-port", str(api))
    first = ServerProcess(data, *ports)
    server_procs.append(first)
    assert await first.started() == chat
    clients = [await connect(f"ws://127.0.0.1:{chat}/chat?id={uid}&token={token}")
               for _ in range(3)]
    [ack] = await send_acked(clients[0], uid, 1, prefix="before")
    _kill_group(first)
    for c in clients:
        await c.wait_closed()
    # the killed server's side of each connection lingers (TIME_WAIT / FIN_WAIT)
    assert _server_side_sockets(chat), "the crash left no lingering sockets to test with"

    second = ServerProcess(data, *ports)
    server_procs.append(second)
    assert await second.started() == chat
    again = await connect(f"ws://127.0.0.1:{chat}/chat?id={uid}&token={token}")
    frames, _ = await sync_all(again)
    assert ack["id"] in [f["id"] for f in frames if f.get("cmd") == 10]

    # a third chatd on the same port is refused while the second one listens
    third = ServerProcess(data, *ports)
    server_procs.append(third)
    assert await third.wait() == 1
    assert f"cannot listen on 127.0.0.1:{chat}" in "".join(third.lines)
    await close_clients(again)
    second.signal(signal.SIGTERM)
    assert await second.wait() == 0
