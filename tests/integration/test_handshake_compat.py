"""The HTTP side of the chat port, spoken over a raw socket: a browser-style
(Firefox) upgrade, /healthz and unknown paths."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct

import pytest
from conftest import UNIT, Node, connect, http_request, sync_all

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    assert not b1 & 0x80, "server frames are not masked"
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def raw_upgrade(node: Node, uid: int, connection: str, upgrade: str):
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /chat?id={uid}&token={node.token(uid)} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{node.port}\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
        "Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{node.cfg.api_port}\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"Connection: {connection}\r\nSec-Fetch-Dest: empty\r\nSec-Fetch-Mode: websocket\r\n"
        f"Pragma: no-cache\r\nCache-Control: no-cache\r\nUpgrade: {upgrade}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
    return key, head.decode("latin-1"), reader, writer


@pytest.mark.parametrize(
    "connection,upgrade",
    [
        ("keep-alive, Upgrade", "websocket"),  # Firefox
        ("keep-alive, Upgrade", "WebSocket"),
        ("Upgrade", "WebSocket"),
        ("upgrade,keep-alive", "websocket"),
    ],
)
async def test_browser_style_upgrade_is_accepted(node: Node, connection: str,
                                                 upgrade: str) -> None:
    alice = await node.user()
    key, head, reader, writer = await raw_upgrade(node, alice, connection, upgrade)
    try:
        status_line, *header_lines = head.split("\r\n")
        assert status_line.startswith("HTTP/1.1 101"), head
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in header_lines if ":" in line)}
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == accept
        assert headers["upgrade"].lower() == "websocket"
        # permessage-deflate was offered but not negotiated: frames are plain
        assert "sec-websocket-extensions" not in headers
        # and frames flow: a message to self is acked
        frame = {"cmd": 10, "dstid": alice, "media": 1, "content": "from firefox", "cid": "ff"}
        writer.write(client_frame(0x1, json.dumps(frame).encode()))
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5 * UNIT)
        assert opcode == 0x1
        ack = json.loads(payload)
        assert ack["cmd"] == 1 and ack["cid"] == "ff" and ack["id"] > 0
        # a ping is answered with a pong carrying the same payload
        writer.write(client_frame(0x9, b"are you there"))
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5 * UNIT)
        assert (opcode, payload) == (0xA, b"are you there")
        # a client close is answered with a close
        writer.write(client_frame(0x8, struct.pack("!H", 1000)))
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5 * UNIT)
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1000
    finally:
        writer.close()


async def test_healthz_is_200_json(node: Node) -> None:
    status, headers, body = await http_request(
        node.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok" and health["connections"] == 0


async def test_healthz_counts_connections(node: Node) -> None:
    uid = await node.user()
    client = await connect(node.url(uid))
    await sync_all(client)
    _, _, body = await http_request(node.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json.loads(body)["connections"] == 1


@pytest.mark.parametrize("path", ["/", "/nope", "/chat/extra", "/healthz/x", "/CHAT"])
async def test_unknown_path_is_404(node: Node, path: str) -> None:
    status, headers, body = await http_request(
        node.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 404
    assert "sec-websocket-accept" not in headers


async def test_unknown_path_with_upgrade_headers_is_404_not_upgraded(node: Node) -> None:
    request = (b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n\r\n")
    status, headers, _ = await http_request(node.port, request)
    assert status == 404 and "sec-websocket-accept" not in headers
