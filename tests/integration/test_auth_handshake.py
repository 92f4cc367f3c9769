"""The /chat handshake: tokens accepted and refused (HTTP 401, never upgraded),
revocation, and the connection cap (503 + Retry-After)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import pytest
import websockets
from conftest import UNIT, Node, connect, http_request, make_config, sync_all
from picows import WSInvalidStatusError
from websockets.asyncio.client import connect as ws_connect

from chatd import auth
from chatd.server import open_node


def upgrade_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def refused_status(url: str) -> tuple[int, Any]:
    """Status and headers of a refused handshake, through the websockets client."""
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with ws_connect(url, open_timeout=5 * UNIT):
            pass
    response = info.value.response
    return response.status_code, response.headers  # case-insensitive


async def test_valid_token_is_accepted_by_both_clients(node: Node) -> None:
    uid = await node.user()
    client = await connect(node.url(uid))
    _, end = await sync_all(client)
    assert end == {"cmd": 4}  # nothing to sync: id 0 is omitted
    async with ws_connect(node.url(uid), open_timeout=5 * UNIT) as ws:
        await ws.send(json.dumps({"cmd": 4, "id": 0}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5 * UNIT)) == {"cmd": 4}


async def test_expired_token_is_401(node: Node) -> None:
    uid = await node.user()
    expired = auth.issue_token(node.secret, uid, 0, ttl_s=60, now=time.time() - 3600)
    status, _ = await refused_status(node.url(uid, expired))
    assert status == 401


async def test_token_of_another_user_is_401(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    status, _ = await refused_status(node.url(alice, node.token(bob)))
    assert status == 401


@pytest.mark.parametrize("token", ["garbage", "1.2.3", "", "%00%ff", "a.b.c.d"])
async def test_malformed_token_is_401(node: Node, token: str) -> None:
    uid = await node.user()
    status, _ = await refused_status(node.url(uid, token))
    assert status == 401


async def test_badly_signed_token_is_401(node: Node) -> None:
    uid = await node.user()
    forged = auth.issue_token(b"x" * 32, uid, 0)
    status, _ = await refused_status(node.url(uid, forged))
    assert status == 401
    # tampering with the expiry of a real token breaks the signature too
    u, exp, ver, sig = node.token(uid).split(".")
    status, _ = await refused_status(node.url(uid, f"{u}.{int(exp) + 1}.{ver}.{sig}"))
    assert status == 401


@pytest.mark.parametrize(
    "query", ["", "?id={uid}", "?token={token}", "?id=abc&token={token}", "?id=&token="]
)
async def test_missing_id_or_token_is_401_and_not_upgraded(node: Node, query: str) -> None:
    uid = await node.user()
    path = "/chat" + query.format(uid=uid, token=node.token(uid))
    status, headers, body = await http_request(node.port, upgrade_request(path))
    assert status == 401
    assert "sec-websocket-accept" not in headers
    assert json.loads(body)["error"]


async def test_refusal_with_picows_client_is_401(node: Node) -> None:
    uid = await node.user()
    with pytest.raises(WSInvalidStatusError) as info:
        await connect(node.url(uid, "nope"))
    assert info.value.response is not None and info.value.response.status == 401


async def test_raw_401_carries_a_json_reason_and_no_upgrade(node: Node) -> None:
    uid = await node.user()
    path = f"/chat?id={uid}&token={node.token(uid + 1)}"
    status, headers, body = await http_request(node.port, upgrade_request(path))
    assert status == 401
    assert "upgrade" not in headers and "sec-websocket-accept" not in headers
    assert "another user" in json.loads(body)["error"]


async def test_revoked_token_is_401_and_a_newer_one_works(node: Node) -> None:
    uid = await node.user()
    old = node.token(uid, version=0)
    client = await connect(node.url(uid, old))  # valid before the revocation
    await sync_all(client)
    assert await node.log.revoke_tokens(uid) == 1
    assert await client.wait_closed() == 4501
    status, _ = await refused_status(node.url(uid, old))
    assert status == 401
    fresh = await connect(node.url(uid, node.token(uid, version=1)))
    await sync_all(fresh)


async def test_token_version_bump_in_the_database_is_loaded_at_start(node: Node) -> None:
    uid = await node.user()
    old, new = node.token(uid, version=0), node.token(uid, version=2)
    db = sqlite3.connect(node.cfg.db_path)
    db.execute("UPDATE users SET token_version = 2 WHERE id = ?", (uid,))
    db.commit()
    db.close()
    # a second node on the same data (as after a restart) loads the versions
    embedded = await open_node(make_config(node.cfg.data_path))
    try:
        again = Node(node.cfg, embedded)
        status, _ = await refused_status(again.url(uid, old))
        assert status == 401
        client = await connect(again.url(uid, new))
        await sync_all(client)
    finally:
        await embedded.close(2 * UNIT)


async def test_connection_cap_answers_503_with_retry_after(node_factory) -> None:
    node = await node_factory(max_conns=2)
    uid = await node.user()
    first, second = await connect(node.url(uid)), await connect(node.url(uid))
    for c in (first, second):  # a round trip: both are registered now
        await sync_all(c)
    status, headers = await refused_status(node.url(uid))
    assert status == 503
    assert int(headers["Retry-After"]) >= 0
    # the refusal is not an upgrade, also for the picows client
    with pytest.raises(WSInvalidStatusError) as info:
        await connect(node.url(uid))
    assert info.value.response.status == 503
    # a freed slot is usable again
    first.tr.send_close()
    await first.wait_closed()
    async def reconnect() -> None:
        while True:
            try:
                c = await connect(node.url(uid))
            except WSInvalidStatusError:
                await asyncio.sleep(0.01)  # the server forgets the closed one right after
                continue
            await sync_all(c)
            return
    await asyncio.wait_for(reconnect(), 5 * UNIT)


async def test_connection_cap_holds_under_concurrent_handshakes(node_factory) -> None:
    node = await node_factory(max_conns=2)
    uid = await node.user()

    async def attempt() -> bool:
        try:
            c = await connect(node.url(uid))
        except WSInvalidStatusError as exc:
            assert exc.response.status == 503
            return False
        await sync_all(c)
        return True

    results = await asyncio.gather(*(attempt() for _ in range(6)))
    # exactly the cap: none past it, and the refusals are not spurious
    assert sum(results) == 2
    assert node.shard.registry.count == 2


def _upgrade(port: int, uid: int, token: str, origin: str | None, host: str) -> bytes:
    origin_line = f"Origin: {origin}\r\n" if origin is not None else ""
    return (f"GET /chat?id={uid}&token={token} HTTP/1.1\r\nHost: {host}\r\n{origin_line}"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()


@pytest.mark.parametrize(("origin", "status"), [
    (None, 101),  # not a browser
    ("http://127.0.0.1:{api}", 101),  # chatd's web client
    ("http://127.0.0.1:{chat}", 101),  # the websocket's own origin
    ("http://evil.example", 403),
    ("http://127.0.0.1:1", 403),
    ("null", 403),
])
async def test_a_foreign_origin_is_refused_with_403(node: Node, origin: str | None,
                                                    status: int) -> None:
    uid = await node.user()
    if origin is not None:
        origin = origin.format(api=node.cfg.api_port, chat=node.port)
    got, headers, body = await http_request(
        node.port, _upgrade(node.port, uid, node.token(uid), origin, f"127.0.0.1:{node.port}"))
    assert got == status
    if status == 403:
        assert json.loads(body) == {"error": "origin not allowed"}
        assert "upgrade" not in headers


async def test_a_foreign_origin_is_refused_before_the_token_is_looked_at(node: Node) -> None:
    got, _, body = await http_request(
        node.port, _upgrade(node.port, 1, "forged", "http://evil.example", "127.0.0.1"))
    assert (got, json.loads(body)) == (403, {"error": "origin not allowed"})


@pytest.mark.parametrize(("allowed", "origin", "status"), [
    (("*",), "http://evil.example", 101),
    (("https://app.example.com",), "https://app.example.com", 101),
    (("https://app.example.com",), "https://APP.example.com:443", 101),
    (("https://app.example.com",), "http://app.example.com", 403),
    (("https://app.example.com",), "http://127.0.0.1:{api}", 403),
])
async def test_allowed_origins_from_the_config(node_factory: Any, allowed: tuple[str, ...],
                                               origin: str, status: int) -> None:
    node = await node_factory(allowed_origins=allowed)
    uid = await node.user()
    origin = origin.format(api=node.cfg.api_port)
    got, _, _ = await http_request(
        node.port, _upgrade(node.port, uid, node.token(uid), origin, f"127.0.0.1:{node.port}"))
    assert got == status
