"""The bench's set-up through chatd's own API, its users file and its limits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from chatd_bench.cli import parse_cpus
from chatd_bench.run import BenchError, Options, Target, build_specs, check_fd_limits
from chatd_bench.setup import (
    MANIFEST,
    SetupError,
    Users,
    load_users_file,
    peer_users,
    prepare_chatd,
)

from chatd import auth
from chatd.store import open_store


def _quiet(_: str) -> None:
    pass


def test_prepare_makes_users_groups_and_valid_tokens(tmp_path: Path) -> None:
    users = prepare_chatd(tmp_path, 6, [(2, 6)], log=_quiet)
    assert len(users.uids) == 6 == len(set(users.uids))
    checker = auth.TokenChecker(auth.load_or_create_secret(tmp_path))
    for uid, token in zip(users.uids, users.tokens, strict=True):
        assert checker.check(token, uid) == uid
    gids = users.groups["2x6"]

    async def members() -> list[frozenset[int]]:
        store = await open_store(tmp_path / "chatd.db")
        try:
            return [await store.user_groups(uid) for uid in users.uids]
        finally:
            await store.close()

    groups = asyncio.run(members())
    for i, g in enumerate(groups):
        assert g == {gids[i % 2]}


def test_prepare_reuses_and_extends_what_it_made(tmp_path: Path) -> None:
    first = prepare_chatd(tmp_path, 3, [], log=_quiet)
    again = prepare_chatd(tmp_path, 5, [(1, 2)], log=_quiet)
    assert again.uids[:3] == first.uids and len(again.uids) == 5
    assert "1x2" in again.groups
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["uids"] == again.uids and "tokens" not in manifest


def test_users_file_round_trip_and_requirements(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text(json.dumps(Users([7, 8], ["a", "b"], {"1x2": [3]}).to_json()))
    users = load_users_file(path)
    users.require(2, [(1, 2)])
    with pytest.raises(SetupError, match="3 users needed"):
        users.require(3, [])
    with pytest.raises(SetupError, match="2x2"):
        users.require(2, [(2, 2)])


def test_peer_users_follow_the_relays_group_rule() -> None:
    users = peer_users(6, 3)
    assert [u % 3 for u in users.uids] == [i % 3 for i in range(6)]
    assert min(users.uids) > 0


def _specs(opts: Options, n: int, peer: bool = True) -> list[dict[str, object]]:
    users = peer_users(n, opts.groups)
    if not peer:  # chatd: groups come from the set-up
        users.groups[f"{opts.groups}x{n}"] = list(range(900, 900 + opts.groups))
    return build_specs(opts, users, Target("x", "ws://127.0.0.1:1/chat", peer))[1]


def test_specs_spread_users_and_keep_groups_whole() -> None:
    specs = _specs(Options("group", procs=2, groups=4, members=3, senders=2), 12)
    assert sorted(i for s in specs for i in s["mine"]) == list(range(12))  # type: ignore[union-attr]
    for s in specs:
        for g, senders in s["group_senders"].items():  # type: ignore[union-attr]
            assert set(senders) <= set(s["mine"])  # type: ignore[call-overload]
            assert all(i % 4 == g for i in senders)
    private = _specs(Options("private", procs=3, users=12), 12)
    for s in private:
        assert {u for p in s["pairs"] for u in p} == set(s["mine"])  # type: ignore[union-attr]
    mixed = _specs(Options("mixed", procs=2, users=40, groups=2), 40, peer=False)
    assert all(s["churners"] and not set(s["churners"]) & set(s["senders"])  # type: ignore[call-overload]
               for s in mixed)


def test_fd_limit_is_refused_with_advice() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    specs = [{"mine": list(range(hard))}]
    with pytest.raises(BenchError, match="--procs 2"):
        check_fd_limits(specs, None)
    check_fd_limits([{"mine": [1, 2, 3]}], None)


def test_parse_cpus() -> None:
    assert parse_cpus("1") == [1]
    assert parse_cpus("0,2-4") == [0, 2, 3, 4]
