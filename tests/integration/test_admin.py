"""``chatd admin …`` and ``chatd db …`` against a running ``chatd serve``:
kick, broadcast, ban/unban/revoke/show, group members, stats, online backups;
every error one line and exit status 1."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, close_clients, connect, http_request, run_cli, send_acked
from picows import WSInvalidStatusError

from chatd import auth

pytestmark = pytest.mark.slow


class Admin:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.data = server.data_dir

    async def ok(self, *args: str) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.server.admin, *args)

    async def fails(self, *args: str) -> str:
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(
            None, lambda: run_cli("admin", *args, data_dir=self.data, check=False))
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1, done.stderr  # one clear line
        return done.stderr

    def url(self, uid: int, version: int = 0) -> str:
        token = auth.issue_token(auth.load_or_create_secret(self.data), uid, version, 3600)
        return f"ws://127.0.0.1:{self.server.port}/chat?id={uid}&token={token}"


@pytest.fixture
async def admin(tmp_path: Path, server_procs: list[ServerProcess]) -> Admin:
    data = tmp_path / "data"
    for i in range(4):
        run_cli("user", "add", "--mobile", f"80{i}", "--password", "pw1234", data_dir=data)
    server = ServerProcess(data, "--shards", "2")
    server_procs.append(server)
    await server.started()
    return Admin(server)


async def test_kick_closes_a_users_connections_with_the_code(admin: Admin) -> None:
    a1, a2 = await connect(admin.url(1)), await connect(admin.url(1))
    for c in (a1, a2):
        await send_acked(c, 1, 1, prefix=f"warm{id(c)}")  # placed on their shards
    got = await admin.ok("kick", "1")
    assert got == {"uid": 1, "closed": 2, "code": 4001}
    assert [await a1.wait_closed(), await a2.wait_closed()] == [4001, 4001]
    b = await connect(admin.url(2))
    await send_acked(b, 2, 1)  # registered
    assert (await admin.ok("kick", "2", "--code", "4502"))["closed"] == 1
    assert await b.wait_closed() == 4502
    assert "4000-4999" in await admin.fails("kick", "2", "--code", "1000")


async def test_broadcast_reaches_everyone_online_and_offline_and_a_group(admin: Admin) -> None:
    online = await connect(admin.url(1))
    await send_acked(online, 1, 1, prefix="warm")  # placed: live from here
    got = await admin.ok("broadcast", "maintenance at noon")
    copy = await online.recv_until(lambda f: f.get("content") == "maintenance at noon")
    assert copy["id"] == got["id"] and copy["cmd"] == 10 and "userid" not in copy
    # the offline user gets it when it syncs
    late = await connect(admin.url(3) + "&last=0")
    replayed = await late.recv_until(lambda f: f.get("content") == "maintenance at noon")
    assert replayed["id"] == got["id"]
    # to one group: members only
    gid = int(run_cli("group", "add", "g", "--owner", "1", data_dir=admin.data).stdout)
    only = await admin.ok("broadcast", "team news", "--group", str(gid))
    member = await online.recv_until(lambda f: f.get("content") == "team news")
    assert (member["id"], member["cmd"], member["dstid"]) == (only["id"], 11, gid)
    [marker] = await send_acked(online, 3, 1, prefix="marker")
    assert (await late.recv_until(lambda f: f.get("cmd") == 10))["id"] == marker["id"]
    assert "no group 999" in await admin.fails("broadcast", "x", "--group", "999")
    await close_clients(online, late)


async def test_ban_unban_revoke_and_show(admin: Admin) -> None:
    client = await connect(admin.url(2))
    await send_acked(client, 2, 1)
    assert (await admin.ok("user", "ban", "2"))["changed"] is True
    assert await client.wait_closed() == 4502
    with pytest.raises(WSInvalidStatusError) as refused:
        await connect(admin.url(2))
    assert refused.value.response.status == 403
    shown = await admin.ok("user", "show", "2")
    assert shown["banned"] is True and shown["id"] == 2 and "passwd" not in shown
    assert (await admin.ok("user", "unban", "2"))["changed"] is True
    again = await connect(admin.url(2))
    await send_acked(again, 2, 1, prefix="back")
    shown = await admin.ok("user", "show", "2")
    assert shown["banned"] is False and [row["state"] for row in shown["online"]] == ["live"]
    assert (await admin.ok("user", "revoke", "2"))["token_version"] == 1
    assert await again.wait_closed() == 4501
    status, _, _ = await http_request(admin.server.port, _upgrade(admin.url(2)))
    assert status == 401
    fresh = await connect(admin.url(2, version=1))
    await close_clients(fresh)
    assert "no user 77" in await admin.fails("user", "show", "77")
    assert "no user 77" in await admin.fails("user", "ban", "77")


def _upgrade(url: str) -> bytes:
    path = url.split(":", 2)[2].split("/", 1)[1]
    return (f"GET /{path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "\r\n").encode()


async def test_group_members_and_stats(admin: Admin) -> None:
    gid = int(run_cli("group", "add", "g", "--owner", "1", data_dir=admin.data).stdout)
    run_cli("group", "join", str(gid), "3", data_dir=admin.data)
    members = await admin.ok("group", "members", str(gid))
    assert [m["id"] for m in members] == [1, 3] and all("passwd" not in m for m in members)
    assert "no group 999" in await admin.fails("group", "members", "999")
    client = await connect(admin.url(1))
    await send_acked(client, 3, 5)

    async def traffic() -> None:  # messages flowing while stats looks twice
        for i in range(60):
            await send_acked(client, 3, 5, prefix=f"t{i}-")
            await asyncio.sleep(0.05)

    flowing = asyncio.ensure_future(traffic())
    stats = await admin.ok("stats", "--interval", "2.5")
    await flowing
    names = sorted(p["process"] for p in stats["processes"])
    assert names == ["api-0", "log-0", "shard-0", "shard-1"]
    assert stats["node"]["rss_mb"] > 0
    [log_row] = [p for p in stats["processes"] if p["process"] == "log-0"]
    assert log_row["committed/s"] > 0 and log_row["queue"] == 0
    assert stats["node"]["frames_in/s"] > 0
    assert stats["node"]["frames_out/s"] >= stats["node"]["frames_in/s"] / 2  # acks at least
    loop = asyncio.get_running_loop()
    text = await loop.run_in_executor(None, lambda: run_cli(
        "admin", "stats", "--interval", "0.2", data_dir=admin.data).stdout)
    assert text.splitlines()[0].split()[:3] == ["process", "connections", "users"]
    assert "node: connections" in text
    await close_clients(client)


async def test_db_backup_while_traffic_runs_then_check_and_vacuum(admin: Admin,
                                                                  tmp_path: Path) -> None:
    client = await connect(admin.url(1))
    await send_acked(client, 2, 1, prefix="warm")  # placed: no frame waits for it now
    acks = await send_acked(client, 2, 300, prefix="before")
    writing = asyncio.ensure_future(send_acked(client, 2, 300, prefix="during"))
    loop = asyncio.get_running_loop()
    copy = tmp_path / "backup.db"
    done = await loop.run_in_executor(None, lambda: run_cli(
        "db", "backup", str(copy), data_dir=admin.data))
    assert "integrity ok" in done.stdout
    await writing
    db = sqlite3.connect(copy)
    try:
        stored = {r[0] for r in db.execute("SELECT cid FROM messages WHERE userid = 1")}
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    assert {a["cid"] for a in acks} <= stored  # everything acked before the copy began
    refused = run_cli("db", "backup", str(copy), data_dir=admin.data, check=False)
    assert refused.returncode == 1 and "exists" in refused.stderr
    assert run_cli("db", "check", data_dir=admin.data).stdout.strip() == "ok"
    assert "vacuumed" in run_cli("db", "vacuum", data_dir=admin.data).stdout
    # the node works on after the vacuum
    [after] = await send_acked(client, 2, 1, prefix="after")
    assert after["id"] > 601
    await close_clients(client)


def test_admin_without_a_running_node_is_one_clear_error(tmp_path: Path) -> None:
    done = run_cli("admin", "shards", "list", data_dir=tmp_path / "nothing", check=False)
    assert done.returncode == 1 and "no node is running here" in done.stderr
    assert done.stderr.count("\n") == 1
