"""The ``chatd`` command line: users, tokens and groups on a data folder, and
its error contract (message on stderr, exit 1; bad usage exits 2)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import UNIT, Node, connect, run_cli, send_acked, sync_all
from picows import WSInvalidStatusError


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, data_dir=data_dir, check=False)


async def acli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread, so an in-process node keeps serving meanwhile."""
    return await asyncio.to_thread(cli, *args, data_dir=data_dir)


def add_user(data_dir: Path, mobile: str) -> int:
    out = cli("user", "add", "--mobile", mobile, "--password", "pw", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"\d+\n", out.stdout), f"not an id alone: {out.stdout!r}"
    return int(out.stdout)


def test_user_add_prints_the_id_alone(tmp_path: Path) -> None:
    first = add_user(tmp_path, "13800000001")
    second = add_user(tmp_path, "13800000002")
    assert 0 < first < second


def test_duplicate_mobile_is_an_error(tmp_path: Path) -> None:
    add_user(tmp_path, "13800000001")
    out = cli("user", "add", "--mobile", "13800000001", "--password", "x", data_dir=tmp_path)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "13800000001" in out.stderr and "Traceback" not in out.stderr


def test_empty_mobile_or_password_is_an_error(tmp_path: Path) -> None:
    out = cli("user", "add", "--mobile", " ", "--password", "x", data_dir=tmp_path)
    assert out.returncode == 1 and out.stderr.strip() and "Traceback" not in out.stderr
    out = cli("user", "add", "--mobile", "1", "--password", "", data_dir=tmp_path)
    assert out.returncode == 1 and out.stderr.strip()


def test_token_for_a_nonexistent_user_is_an_error(tmp_path: Path) -> None:
    add_user(tmp_path, "13800000001")
    out = cli("token", "999", data_dir=tmp_path)
    assert out.returncode == 1
    assert out.stdout == ""
    assert "999" in out.stderr and "Traceback" not in out.stderr


def test_group_commands_on_missing_rows_are_errors(tmp_path: Path) -> None:
    uid = add_user(tmp_path, "13800000001")
    out = cli("group", "add", "g", "--owner", "999", data_dir=tmp_path)
    assert out.returncode == 1 and "999" in out.stderr
    out = cli("group", "join", "999", str(uid), data_dir=tmp_path)
    assert out.returncode == 1 and "999" in out.stderr and "Traceback" not in out.stderr


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    out = cli("token", "not-a-number", data_dir=tmp_path)
    assert out.returncode == 2 and out.stderr.strip()
    out = cli("user", "add", "--mobile", "1", data_dir=tmp_path)  # no --password
    assert out.returncode == 2


def test_bad_configuration_is_an_error(tmp_path: Path) -> None:
    env = {**os.environ, "CHATD_CHAT_PORT": "eighty"}
    out = subprocess.run(
        [sys.executable, "-m", "chatd", "check-config", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60 * UNIT, check=False)
    assert out.returncode == 1
    assert "chat_port" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "c.toml").write_text("no_such_key = 1\n")
    out = cli("check-config", "--config", str(tmp_path / "c.toml"), data_dir=tmp_path)
    assert out.returncode == 1 and "no_such_key" in out.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("chat_port = 9123\nsync_page = 10\n")
    out = cli("check-config", "--config", str(tmp_path / "c.toml"), data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "9123" in out.stdout


async def test_cli_users_tokens_and_groups_work_on_a_running_server(node: Node) -> None:
    data_dir = node.cfg.data_path
    outs = [await acli("user", "add", "--mobile", m, "--password", "pw", data_dir=data_dir)
            for m in ("15500000001", "15500000002", "15500000003")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    alice, bob, carol = (int(o.stdout) for o in outs)
    out = await acli("group", "add", "friends", "--owner", str(alice), data_dir=data_dir)
    assert out.returncode == 0 and re.fullmatch(r"\d+\n", out.stdout), out
    gid = int(out.stdout)
    out = await acli("group", "join", str(gid), str(bob), data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    tokens = {}
    for uid in (alice, bob, carol):
        out = await acli("token", str(uid), data_dir=data_dir)
        assert out.returncode == 0, out.stderr
        assert re.fullmatch(r"[A-Za-z0-9_.-]+\n", out.stdout), out.stdout
        tokens[uid] = out.stdout.strip()
    clients = {uid: await connect(node.url(uid, tokens[uid])) for uid in tokens}
    for c in clients.values():
        await sync_all(c)
    (ack,) = await send_acked(clients[alice], gid, 1, cmd=11)
    got = await clients[bob].recv()
    assert got["id"] == ack["id"] and got["dstid"] == gid
    # carol is not in the group: her next frame is a private message, not the group's
    (pm,) = await send_acked(clients[alice], carol, 1, prefix="pm")
    assert (await clients[carol].recv())["id"] == pm["id"]


async def test_cli_token_with_ttl_expires(node: Node) -> None:
    uid = await node.user()
    out = await acli("token", str(uid), "--ttl", "-10", data_dir=node.cfg.data_path)
    if out.returncode != 0:  # refusing a negative lifetime is fine too
        assert out.stderr.strip()
        return
    with pytest.raises(WSInvalidStatusError) as info:
        await connect(node.url(uid, out.stdout.strip()))
    assert info.value.response.status == 401
