"""A wall-clock jump under a running node: the whole ``chatd serve`` runs
under libfaketime (Debian's ``faketime`` package), whose offset the test
moves while it runs. Only the wall clock moves (monotonic clocks stay true,
as with an NTP step): tokens are checked against the server's ``time.time()``,
and ids, not ``ts``, order messages."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from conftest import http_request
from fault_helpers import (
    NodeProcess,
    check_devices,
    devices_for,
    make_users,
    node_procs,
    token,
)

__all__ = ["node_procs"]


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        pytest.fail("libfaketime is not installed: apt-get install faketime (.ci/run does)")
    return found[0]


async def _handshake_status(port: int, uid: int, tok: str) -> tuple[int, bytes]:
    status, _, body = await http_request(port, (
        f"GET /chat?id={uid}&token={tok} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    return status, body


@pytest.mark.slow
async def test_a_wall_clock_jump_keeps_token_expiry_and_never_reorders_messages(
        tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    clock = tmp_path / "clock"
    clock.write_text("+0\n")
    env = {"LD_PRELOAD": _libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(clock),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    data = tmp_path / "data"
    (alice, bob), _ = await make_users(data, 2)
    node = NodeProcess(data, "--shards", "1", env=env)
    node_procs.append(node)
    await node.started()
    a, b = devices_for(node, data, [alice, bob])
    for d in (a, b):
        d.start()
        await d.synced()

    async def burst(n: int) -> list[tuple[int, int]]:
        cids = [a.send(bob) for _ in range(n)]
        await a.all_acked()
        return [(a.acked[c], a.ack_ts[c]) for c in cids]

    before = await burst(5)
    clock.write_text("-1d\n")  # the wall clock steps back a day
    back = await burst(5)
    clock.write_text("+2h\n")  # and then two hours ahead of the real time
    ahead = await burst(5)

    # ids keep the commit order; ts follows the wall clock, backwards and all
    ids = [i for i, _ in before + back + ahead]
    assert ids == sorted(ids) and len(set(ids)) == 15
    day_ms = 24 * 3600 * 1000
    assert max(t for _, t in back) < min(t for _, t in before) - day_ms + 60_000
    assert min(t for _, t in ahead) > max(t for _, t in before) + 2 * 3600 * 1000 - 60_000
    # bob got them live in id order, and a sync from 0 gives the same order
    await b.until(lambda: ids[-1] in b.copies)
    assert list(b.copies) == ids and not b.disorder and not b.dups
    # tokens are checked against the server's clock: one valid for 1 h by the
    # real clock is expired on a server 2 h ahead; one valid for 3 h is not
    status, body = await _handshake_status(node.port, bob, token(data, bob, ttl_s=3600))
    assert (status, json.loads(body)) == (401, {"error": "token expired"})
    status, _ = await _handshake_status(node.port, bob, token(data, bob, ttl_s=3 * 3600))
    assert status == 101
    # and back at the real time, the 1 h token is good again
    clock.write_text("+0\n")
    status, _ = await _handshake_status(node.port, bob, token(data, bob, ttl_s=3600))
    assert status == 101
    # (b's own token is one of those: it syncs again only now)
    b.copies.clear()
    b.top = 0
    await b.final_sync()
    assert list(b.copies) == ids, "the replay is not in id order"
    assert [b.copies[i]["ts"] for i in ids] != sorted(b.copies[i]["ts"] for i in ids)
    counts = check_devices([a, b], data / "chatd.db")
    assert counts["lost"] == counts["duplicates"] == 0, counts

    for d in (a, b):
        await d.stop()
