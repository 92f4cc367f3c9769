"""``chatd admin …`` and ``chatd db …`` against a running ``chatd serve``:
kick, broadcast, ban/unban/revoke/show, online, group members, stats, online
backups; the admin socket (its mode, how the CLI finds it); every error one
line and exit status 1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    UNIT,
    ServerProcess,
    close_clients,
    connect,
    http_request,
    run_cli,
    send_acked,
)
from net_helpers import free_port_range
from picows import WSInvalidStatusError

from chatd import auth

pytestmark = pytest.mark.slow


class Admin:
    def __init__(self, server: ServerProcess, shard_base_port: int) -> None:
        self.server = server
        self.data = server.data_dir
        #: shard i also listens alone on this port + i
        self.shard_base_port = shard_base_port

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

    async def text(self, *args: str) -> str:
        """The human (not ``--json``) output of ``chatd admin ARGS``."""
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(
            None, lambda: run_cli("admin", *args, data_dir=self.data))
        return done.stdout

    def url(self, uid: int, version: int = 0, shard: int | None = None) -> str:
        """A chat url for ``uid``: the node's port, or shard ``shard``'s own."""
        token = auth.issue_token(auth.load_or_create_secret(self.data), uid, version, 3600)
        port = self.server.port if shard is None else self.shard_base_port + shard
        return f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}"


@pytest.fixture
async def admin(tmp_path: Path, server_procs: list[ServerProcess]) -> Admin:
    data = tmp_path / "data"
    for i in range(4):
        run_cli("user", "add", "--mobile", f"80{i}", "--password", "pw1234", data_dir=data)
    base = free_port_range(2)
    server = ServerProcess(data, "--shards", "2", env={"CHATD_SHARD_BASE_PORT": str(base)})
    server_procs.append(server)
    await server.started()
    return Admin(server, base)


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


async def test_an_unknown_user_is_an_error_an_offline_one_is_not(admin: Admin) -> None:
    for args in (("kick", "77"), ("online", "77"), ("user", "revoke", "77"),
                 ("user", "unban", "77")):
        assert "no user 77" in await admin.fails(*args), args
    # user 4 exists and has no connection: an answer, not an error
    assert await admin.ok("online", "4") == []
    assert await admin.text("online", "4") == "user 4 is offline\n"
    assert await admin.ok("kick", "4") == {"uid": 4, "closed": 0, "code": 4001}


async def test_online_lists_each_device_with_its_shard_state_and_since(admin: Admin) -> None:
    before = int(time.time())
    devices = [await connect(admin.url(1, shard=i)) for i in (0, 1)]
    for i, device in enumerate(devices):
        await send_acked(device, 2, 1, prefix=f"warm{i}-")  # registered on its shard
    after = time.time()
    rows = await admin.ok("online", "1")
    assert sorted(row["shard"] for row in rows) == [0, 1]
    for row in rows:
        assert (row["state"], row["encoding"]) == ("live", "json")
        assert before <= row["since"] <= after
    lines = (await admin.text("online", "1")).splitlines()
    assert lines[0].split() == ["shard", "state", "since", "encoding"] and len(lines) == 3
    shown = {int(line.split()[0]): line.split()[1:] for line in lines[1:]}
    for row in rows:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["since"]))
        assert shown[row["shard"]] == ["live", *since.split(), "json"]
    await close_clients(*devices)


async def test_stats_shows_flood_closes_restarts_and_the_stores_figures(admin: Admin) -> None:
    flooder = await connect(admin.url(3, shard=0))
    await send_acked(flooder, 2, 1, prefix="warm")  # registered: the flood control applies
    for _ in range(2000):  # past rate_burst (600) at once
        flooder.send(cmd=0)
    assert await flooder.wait_closed() == 4008
    [one] = [s for s in await admin.ok("shards", "list") if s["index"] == 1]
    psutil.Process(one["pid"]).kill()

    async def reported() -> dict[str, dict[str, Any]]:
        # shard-0 has reported its close, shard-1 is back and has reported since
        while True:
            stats = await admin.ok("stats", "--interval", "0")
            rows = {row["process"]: row for row in stats["processes"]}
            if (rows["shard-0"]["flood_closes"] >= 1 and rows["shard-1"]["restarts"] >= 1
                    and rows["shard-1"]["connections"] != ""):
                return rows
            await asyncio.sleep(0.1)

    rows = await asyncio.wait_for(reported(), 30 * UNIT)
    assert sorted(rows) == ["api-0", "log-0", "shard-0", "shard-1"]
    shard0, shard1, log_row = rows["shard-0"], rows["shard-1"], rows["log-0"]
    assert (shard0["flood_closes"], shard0["slow_closes"], shard0["restarts"]) == (1, 0, 0)
    # a restarted process counts from 0 again; the supervisor counts the restart
    assert (shard1["flood_closes"], shard1["slow_closes"], shard1["restarts"]) == (0, 0, 1)
    assert log_row["restarts"] == 0 and log_row["queue"] == 0
    assert log_row["batch_p50"] == 1.0  # one message, one transaction
    assert 0 < log_row["commit_ms_p50"] <= log_row["commit_ms_p99"]
    for row in rows.values():
        assert row["rss_mb"] > 0 and row["cpu_s"] >= 0
    assert sum(row["cpu_s"] for row in rows.values()) > 0
    header = (await admin.text("stats", "--interval", "0.1")).splitlines()[0].split()
    for column in ("slow_closes", "flood_closes", "batch_p50", "commit_ms_p50",
                   "commit_ms_p99", "cpu_s", "restarts"):
        assert column in header


def _cli(*args: str, env: dict[str, str] | None = None,
         as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """``chatd ARGS`` with only the given ``CHATD_*`` environment (none of this
    shell's); ``as_nobody``: as uid 65534 (see the permission test)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    prefix: list[str] = []
    if as_nobody:
        # coverage's subprocess measurement would write its data file as nobody
        # into the checkout (not allowed): that child is not measured
        clean = {k: v for k, v in clean.items() if not k.startswith("COVERAGE")}
        setpriv = shutil.which("setpriv")
        assert setpriv is not None
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                  "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return subprocess.run([*prefix, sys.executable, "-m", "chatd", *args],
                          capture_output=True, text=True, timeout=60 * UNIT,
                          env={**clean, **(env or {})}, check=False)


def _shard_indexes(done: subprocess.CompletedProcess[str]) -> list[int]:
    assert done.returncode == 0, done.stderr
    return [row["index"] for row in json.loads(done.stdout)]


async def test_the_admin_socket_is_mode_0600_in_a_0700_folder(admin: Admin) -> None:
    run = admin.data / "run"
    mode = os.stat(run / "admin.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700


async def test_another_user_is_refused_by_the_sockets_mode(admin: Admin) -> None:
    """The CLI as uid 65534, given CAP_DAC_READ_SEARCH so that it can reach the
    interpreter and enter the 0700 folders (and nothing else: connecting to a
    socket needs write permission, which that capability does not grant): only
    the socket's mode 0600 stands between it and the node. Needs root and
    setpriv (util-linux), as the fault tests need root: it fails, never skips."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("this test runs the CLI as another user: it needs root and setpriv")
    sock = (admin.data / "run" / "admin.sock").resolve()
    args = ("admin", "shards", "list", "--data-dir", str(admin.data))
    refused = _cli(*args, as_nobody=True)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"chatd: no permission to use {sock} ")
    assert refused.stderr.count("\n") == 1
    assert _shard_indexes(_cli(*args, "--json")) == [0, 1]  # the owner is let in


def test_a_socket_left_by_a_dead_node_is_one_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True, mode=0o700)
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(run / "admin.sock"))  # the file stays; nothing listens on it
    done = run_cli("admin", "shards", "list", data_dir=tmp_path / "data", check=False)
    assert done.returncode == 1
    assert done.stderr == f"chatd: the node at {(run / 'admin.sock').resolve()} is not running\n"


async def test_the_cli_finds_the_node_from_its_config_file_and_environment(
        admin: Admin, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()

    async def cli(*args: str, env: dict[str, str] | None = None) -> list[int]:
        return _shard_indexes(await loop.run_in_executor(
            None, lambda: _cli("admin", "shards", "list", "--json", *args, env=env)))

    assert await cli(env={"CHATD_DATA_DIR": str(admin.data)}) == [0, 1]
    conf = tmp_path / "chatd.toml"
    conf.write_text(f"data_dir = {json.dumps(str(admin.data))}\n")
    assert await cli("--config", str(conf)) == [0, 1]
    assert await cli(env={"CHATD_CONFIG": str(conf)}) == [0, 1]


async def test_a_node_with_its_own_run_dir_is_found_from_it(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    data, run = tmp_path / "data", tmp_path / "sockets"
    server = ServerProcess(data, "--shards", "1", env={"CHATD_RUN_DIR": str(run)})
    server_procs.append(server)
    await server.started()
    assert stat.S_IMODE(os.stat(run / "admin.sock").st_mode) == 0o600
    loop = asyncio.get_running_loop()

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _cli("admin", "shards", "list", "--json", *args, env=env)

    # the data folder alone points at DATA_DIR/run, where this node is not
    missed = await loop.run_in_executor(None, lambda: cli("--data-dir", str(data)))
    assert missed.returncode == 1 and "no node is running here" in missed.stderr
    env = {"CHATD_DATA_DIR": str(data), "CHATD_RUN_DIR": str(run)}
    assert _shard_indexes(await loop.run_in_executor(None, lambda: cli(env=env))) == [0]
    conf = tmp_path / "chatd.toml"
    conf.write_text(f"data_dir = {json.dumps(str(data))}\nrun_dir = {json.dumps(str(run))}\n")
    found = await loop.run_in_executor(None, lambda: cli("--config", str(conf)))
    assert _shard_indexes(found) == [0]
