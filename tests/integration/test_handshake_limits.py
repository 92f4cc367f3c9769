"""The limits of the handshake on the chat port, with real clients on
loopback: a deadline per handshake (slowloris), malformed requests (4xx, never
upgraded), and the connections one address may hold (429)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
import websockets
from conftest import UNIT, Client, Node, connect, http_request, sync_all
from websockets.asyncio.client import connect as ws_connect
from ws_raw import upgrade_request

# --- the deadline -------------------------------------------------------------------

DEADLINE_S = 0.5 * UNIT


async def _dropped_after(reader: asyncio.StreamReader, started: float) -> float:
    """Seconds from ``started`` until the server drops the connection (EOF or reset)."""
    try:
        rest = await asyncio.wait_for(reader.read(), DEADLINE_S + 5 * UNIT)
    except ConnectionResetError:
        rest = b""
    assert rest == b"", rest  # dropped without an answer
    return time.monotonic() - started


async def test_a_connection_that_sends_nothing_is_dropped_at_the_deadline(
        node_factory: Any) -> None:
    node: Node = await node_factory(handshake_timeout_s=DEADLINE_S)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    took = await _dropped_after(reader, started)
    writer.close()
    assert DEADLINE_S * 0.9 <= took < DEADLINE_S + 3 * UNIT


async def test_a_handshake_sent_byte_by_byte_is_dropped_at_the_deadline(
        node_factory: Any) -> None:
    """Slowloris: every byte comes before any idle timer would fire, but the
    whole head never does; the deadline counts from the accept."""
    node: Node = await node_factory(handshake_timeout_s=DEADLINE_S)
    uid = await node.user()
    early = await connect(node.url(uid))  # upgraded before: the deadline is not its
    await sync_all(early)
    request = upgrade_request(f"/chat?id={uid}&token={node.token(uid)}")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)

    async def trickle() -> None:
        for byte in request[:-2]:  # never the final CRLF
            writer.write(bytes([byte]))
            await asyncio.sleep(DEADLINE_S / 20)

    sender = asyncio.get_running_loop().create_task(trickle())
    took = await _dropped_after(reader, started)
    still_sending = not sender.done()
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await sender
    writer.close()
    assert still_sending  # the head was still coming in when it was dropped
    assert DEADLINE_S * 0.9 <= took < DEADLINE_S + 3 * UNIT
    # the connection upgraded before the slow one (so older than the deadline) lives on
    await early.assert_quiet()


async def test_an_upgraded_connection_is_not_cut_by_the_deadline(node_factory: Any) -> None:
    node: Node = await node_factory(handshake_timeout_s=DEADLINE_S)
    uid = await node.user()
    a = await connect(node.url(uid))
    # an idle connection opened after it is dropped at the deadline: by then
    # the upgraded one is older than the deadline too
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    await _dropped_after(reader, time.monotonic())
    writer.close()
    await a.assert_quiet()
    assert not a.closed.is_set()


async def test_a_live_connection_keeps_neither_the_upgrade_headers_nor_the_token(
        node: Node) -> None:
    """picows keeps the upgrade's request and response on the transport for the
    connection's life: the shard empties them (memory, and no token in it)."""
    uid = await node.user()
    token = node.token(uid)
    a = await connect(node.url(uid, token))
    (sess,) = node.shard_for(uid).registry.get(uid) or ()
    tr = sess.conn.tr
    assert token.encode() not in tr.request.path and not tr.request.headers
    assert not tr.response.headers
    a.send(cmd=10, dstid=uid, media=1, content="still works", cid="c1")
    assert (await a.recv_until(lambda f: f.get("cmd") == 1))["cid"] == "c1"


# --- malformed requests ------------------------------------------------------------


def _raw(path: str, *lines: str, request_line: str | None = None) -> bytes:
    start = request_line if request_line is not None else f"GET {path} HTTP/1.1"
    return (start + "\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode()


@pytest.fixture
async def echo_node(node_factory: Any) -> Node:
    node: Node = await node_factory(echo_path="/echo", max_handshake_bytes=4096)
    return node


async def _chat_path(node: Node) -> str:
    uid = await node.user()
    return f"/chat?id={uid}&token={node.token(uid)}"


UPGRADE = ["Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade"]
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize("endpoint", ["chat", "echo"])
@pytest.mark.parametrize("lines,status", [
    pytest.param([*UPGRADE, "Sec-WebSocket-Version: 13"], 400, id="no-key"),
    pytest.param([*UPGRADE, "Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Version: 13"],
                 400, id="short-key"),
    pytest.param(["Host: 127.0.0.1", "Connection: Upgrade", KEY, "Sec-WebSocket-Version: 13"],
                 400, id="no-upgrade-header"),
    pytest.param(["Host: 127.0.0.1", "Upgrade: websocket", KEY, "Sec-WebSocket-Version: 13"],
                 400, id="no-connection-header"),
    pytest.param([*UPGRADE, KEY], 426, id="no-version"),
    pytest.param([*UPGRADE, KEY, "Sec-WebSocket-Version: 8"], 426, id="old-version"),
])
async def test_a_malformed_upgrade_gets_4xx_and_no_upgrade(
        echo_node: Node, endpoint: str, lines: list[str], status: int) -> None:
    path = "/echo" if endpoint == "echo" else await _chat_path(echo_node)
    got, headers, body = await http_request(echo_node.port, _raw(path, *lines))
    assert got == status
    assert "sec-websocket-accept" not in headers and "upgrade" not in headers
    assert json.loads(body)["error"]
    if status == 426:
        assert headers["sec-websocket-version"] == "13"


@pytest.mark.parametrize("request_line", [
    "HELLO", "GET /chat", "GET /chat HTTP/1.0", "POST /chat HTTP/1.1", "\x16\x03\x01\x02\x00",
])
async def test_a_garbage_request_line_gets_400(echo_node: Node, request_line: str) -> None:
    got, headers, _ = await http_request(
        echo_node.port, _raw("", *UPGRADE, KEY, "Sec-WebSocket-Version: 13",
                             request_line=request_line))
    assert got == 400 and "sec-websocket-accept" not in headers


async def test_a_request_head_past_the_limit_gets_431(echo_node: Node) -> None:
    path = await _chat_path(echo_node)
    big = "X-Filler: " + "y" * 5000  # the limit is 4096 bytes for the whole head
    got, headers, body = await http_request(
        echo_node.port, _raw(path, *UPGRADE, KEY, "Sec-WebSocket-Version: 13", big))
    assert got == 431 and "sec-websocket-accept" not in headers
    assert json.loads(body)["error"]


async def test_a_head_that_never_ends_gets_431_once_past_the_limit(echo_node: Node) -> None:
    """Headers keep coming (no blank line): the answer comes once the limit is
    passed, not at the deadline; the connection is then closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_node.port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    head = b""
    try:
        for i in range(100):  # 100 * 100 bytes: well past 4096
            writer.write(f"X-H{i:02d}: {'z' * 92}\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        rest = await asyncio.wait_for(reader.read(), 5 * UNIT)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 431"), head
    assert b"request header fields too large" in rest


async def test_a_head_just_within_the_limit_is_upgraded(echo_node: Node) -> None:
    request = upgrade_request("/echo", extra="X-Filler: {}\r\n")
    filler = 4096 - len(request) + 2  # the whole head: exactly 4096 bytes
    request = upgrade_request("/echo", extra=f"X-Filler: {'f' * filler}\r\n")
    assert len(request) == 4096
    got, headers, _ = await http_request(echo_node.port, request)
    assert got == 101 and "sec-websocket-accept" in headers


# --- connections per address -----------------------------------------------------


PER_IP = 3


async def _until_released(node: Node, open_now: int) -> None:
    """Wait until the shard counts ``open_now`` connections from 127.0.0.1
    (a close reaches the server a moment after the client saw it)."""
    async def go() -> None:
        while node.shard.addresses.count("127.0.0.1") != open_now:
            await asyncio.sleep(0.001)
    await asyncio.wait_for(go(), 5 * UNIT)


async def test_one_address_gets_max_conns_per_ip_then_429_until_one_closes(
        node_factory: Any) -> None:
    node: Node = await node_factory(max_conns_per_ip=PER_IP)
    uids = [await node.user() for _ in range(PER_IP + 1)]
    clients: list[Client] = [await connect(node.url(uid)) for uid in uids[:PER_IP]]
    # the next one, whoever it is, is refused at the handshake
    status, headers, body = await http_request(
        node.port, upgrade_request(f"/chat?id={uids[-1]}&token={node.token(uids[-1])}"))
    assert status == 429 and "sec-websocket-accept" not in headers
    assert int(headers["retry-after"]) > 0
    assert json.loads(body) == {"error": "too many connections from this address"}
    # a real client sees it so too
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with ws_connect(node.url(uids[-1]), open_timeout=5 * UNIT):
            pass
    assert info.value.response.status_code == 429
    # one closes: once the server has seen it, the next one gets in
    closing = clients.pop(0)
    closing.tr.send_close()
    await closing.wait_closed()
    await _until_released(node, PER_IP - 1)
    clients.append(await connect(node.url(uids[-1])))
    _, end = await sync_all(clients[-1])
    assert end["cmd"] == 4
    # and the address is full again
    status, _, _ = await http_request(
        node.port, upgrade_request(f"/chat?id={uids[0]}&token={node.token(uids[0])}"))
    assert status == 429
    for c in clients:
        c.tr.send_close()
        await c.wait_closed()
    await _until_released(node, 0)
    assert len(node.shard.addresses) == 0


async def test_refused_handshakes_and_server_closes_give_their_slot_back(
        node_factory: Any) -> None:
    node: Node = await node_factory(max_conns_per_ip=1, rate_per_s=1, rate_burst=2)
    uid = await node.user()
    # refused handshakes (401, 404, /healthz) hold no slot
    for path in (f"/chat?id={uid}&token=nope", "/nope", "/healthz"):
        status, _, _ = await http_request(node.port, upgrade_request(path))
        assert status in (200, 401, 404)
    a = await connect(node.url(uid))
    # a connection that the server closes (4008, flood) frees its slot too
    for _ in range(5):
        a.send(cmd=0)
    assert await a.wait_closed() == 4008
    await _until_released(node, 0)
    b = await connect(node.url(uid))
    _, end = await sync_all(b)
    assert end["cmd"] == 4


async def test_max_conns_per_ip_zero_is_no_limit(node_factory: Any) -> None:
    node: Node = await node_factory(max_conns_per_ip=0)
    uid = await node.user()
    clients = [await connect(node.url(uid)) for _ in range(5)]
    for c in clients:
        _, end = await sync_all(c)
        assert end["cmd"] == 4
    assert len(node.shard.addresses) == 0  # nothing counted


async def test_the_echo_endpoint_counts_per_address_too(node_factory: Any) -> None:
    node: Node = await node_factory(max_conns_per_ip=1, echo_path="/echo")
    async with ws_connect(f"ws://127.0.0.1:{node.port}/echo", open_timeout=5 * UNIT) as ws:
        await ws.send("ping?")
        assert await asyncio.wait_for(ws.recv(), 5 * UNIT) == "ping?"
        status, headers, _ = await http_request(node.port, upgrade_request("/echo"))
        assert status == 429 and "retry-after" in headers
