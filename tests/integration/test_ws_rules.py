"""The rules of RFC 6455 that chatd keeps on top of picows, on a raw socket,
at /chat and at the echo endpoint (they share ``Conn``'s frame handling).
Each is a case of Autobahn's suite (test_autobahn.py) made by hand: the
Autobahn case number is in the test's name or its comment."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

import pytest
from conftest import Node
from ws_raw import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWs,
    close_frame,
    frame,
    upgrade_request,
)


@pytest.fixture(params=["chat", "echo"])
async def path(request: Any, node_factory: Any) -> tuple[Node, str]:
    node: Node = await node_factory(echo_path="/echo")
    if request.param == "echo":
        return node, "/echo"
    uid = await node.user()
    return node, f"/chat?id={uid}&token={node.token(uid)}"


async def _open(where: tuple[Node, str]) -> RawWs:
    node, path = where
    return await RawWs.open(node.port, path)


async def _fails_with(ws: RawWs, code: int) -> list[Any]:
    """The server's close has ``code``, and nothing follows it; the frames before it."""
    before, close = await ws.until_close()
    assert close.close_code == code, close
    assert await ws.closed_by_server() == b""
    return before


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])  # 3.1-3.7
async def test_reserved_bits_fail_the_connection_1002(path: tuple[Node, str], rsv: int) -> None:
    ws = await _open(path)
    ws.send(frame(OP_TEXT, b'{"cmd": 0}', rsv=rsv))
    await _fails_with(ws, 1002)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])  # 5.18
async def test_a_new_message_inside_a_fragmented_one_fails_1002(
        path: tuple[Node, str], opcode: int) -> None:
    ws = await _open(path)
    ws.send(frame(OP_TEXT, b'{"cmd":', fin=False))
    ws.send(frame(opcode, b'{"cmd": 0}'))
    await _fails_with(ws, 1002)


async def test_a_continuation_without_a_message_fails_1002(path: tuple[Node, str]) -> None:
    ws = await _open(path)  # 5.9
    ws.send(frame(OP_CONT, b"{}"))
    await _fails_with(ws, 1002)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])  # 7.9.*, 7.13.*
async def test_a_close_with_an_invalid_code_fails_1002(path: tuple[Node, str], code: int) -> None:
    ws = await _open(path)
    ws.send(close_frame(code))
    await _fails_with(ws, 1002)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])  # 7.7.*
async def test_a_close_with_a_valid_code_is_answered_with_it(
        path: tuple[Node, str], code: int) -> None:
    ws = await _open(path)
    ws.send(close_frame(code, b"bye"))
    _, close = await ws.until_close()
    assert close.close_code == code
    assert await ws.reader.read() == b""  # and the server drops the TCP connection
    ws.close()


async def test_a_close_without_a_code_is_answered_with_1000(path: tuple[Node, str]) -> None:
    ws = await _open(path)  # 7.3.1
    ws.send(close_frame())
    _, close = await ws.until_close()
    assert close.close_code == 1000
    assert await ws.reader.read() == b""
    ws.close()


@pytest.mark.parametrize("payload,code", [
    (b"\x03", 1002),  # 7.3.2: a code must be 2 bytes
    (struct.pack("!H", 1000) + b"\xce\xba\xff", 1007),  # 7.5.1: the reason is UTF-8
    (struct.pack("!H", 1000) + b"x" * 124, 1002),  # 7.3.6: 126 bytes, over the 125 allowed
])
async def test_a_bad_close_payload_fails_the_connection(
        path: tuple[Node, str], payload: bytes, code: int) -> None:
    ws = await _open(path)
    ws.send(frame(OP_CLOSE, payload))
    await _fails_with(ws, code)


@pytest.mark.parametrize("data", [
    frame(OP_PING, b"x" * 126),  # 2.5: control payloads are at most 125 bytes
    frame(OP_PING, b"x", fin=False),  # 5.1: control frames are not fragmented
    frame(0x3, b"x"),  # 4.1.1: reserved data opcode
    frame(0xB, b"x"),  # 4.2.1: reserved control opcode
])
async def test_picows_fails_frames_that_break_the_framing(path: tuple[Node, str],
                                                         data: bytes) -> None:
    ws = await _open(path)
    ws.send(data)
    await _fails_with(ws, 1002)


async def test_a_protocol_error_of_the_peer_is_not_logged_as_ours(
        path: tuple[Node, str], caplog: pytest.LogCaptureFixture) -> None:
    """picows logs the violations it finds as errors: the client's fault
    (which any client could repeat to fill the log) goes out as debug."""
    caplog.set_level(logging.DEBUG, logger="chatd.ws")
    ws = await _open(path)
    ws.send(frame(0x3, b"x"))
    await _fails_with(ws, 1002)
    faults = [r for r in caplog.records
              if r.name == "chatd.ws" and "WS parser error" in r.getMessage()]
    assert faults and all(r.levelno == logging.DEBUG for r in faults)


async def test_nothing_is_written_after_a_close_that_picows_sent(path: tuple[Node, str]) -> None:
    """4.1.3: a message, a frame with a reserved opcode and a ping in one write.
    picows parses the second frame before it hands over the first, finds the
    error and sends its close first; the first is then not answered (a data
    frame after a close frame would break RFC 6455 §5.5.1)."""
    ws = await _open(path)
    ws.send(frame(OP_TEXT, b'{"cmd": 42}') + frame(0x5, b"") + frame(OP_PING, b"p"))
    assert await _fails_with(ws, 1002) == []


async def test_a_ping_is_answered_with_its_payload(path: tuple[Node, str]) -> None:
    ws = await _open(path)  # 2.2, 2.3
    ws.send(frame(OP_PING, b"\x00\xff" * 62) + frame(OP_PONG, b"unasked"))
    got = await ws.recv()
    assert (got.opcode, got.payload) == (OP_PONG, b"\x00\xff" * 62)
    ws.send(close_frame(1000))
    _, close = await ws.until_close()
    assert close.close_code == 1000
    ws.close()


@pytest.mark.xfail(strict=True, reason=(
    "picows 2.3 reads one frame ahead: it fails the connection on the second close "
    "(1002) before it hands over the first; Autobahn 7.1.2"))
async def test_a_second_close_frame_is_ignored(path: tuple[Node, str]) -> None:
    ws = await _open(path)
    ws.send(close_frame(1000) + close_frame())
    _, close = await ws.until_close()
    ws.close()
    assert close.close_code == 1000


async def test_the_echo_endpoint_answers_each_message_with_itself(node_factory: Any) -> None:
    node: Node = await node_factory(echo_path="/echo")
    ws = await RawWs.open(node.port, "/echo")
    text = "héllo, 世界".encode()
    ws.send(frame(OP_TEXT, text))
    ws.send(frame(OP_BINARY, b"\x00\xff\x10"))
    # fragments (a control frame between them) make one message
    ws.send(frame(OP_TEXT, text[:2], fin=False) + frame(OP_PING, b"in between")
            + frame(OP_CONT, text[2:], fin=False) + frame(OP_CONT, b"!"))
    got = [await ws.recv() for _ in range(4)]
    assert [(g.fin, g.opcode, g.payload) for g in got] == [
        (True, OP_TEXT, text), (True, OP_BINARY, b"\x00\xff\x10"),
        (True, OP_PONG, b"in between"), (True, OP_TEXT, text + b"!")]
    ws.send(close_frame(1000))
    _, close = await ws.until_close()
    ws.close()
    assert close.close_code == 1000


async def test_the_echo_endpoint_keeps_the_size_cap(node_factory: Any) -> None:
    node: Node = await node_factory(echo_path="/echo", max_frame_bytes=1024)
    ws = await RawWs.open(node.port, "/echo")
    ws.send(frame(OP_BINARY, b"x" * 600, fin=False) + frame(OP_CONT, b"x" * 600))
    await _fails_with(ws, 1009)


async def test_the_echo_endpoint_is_off_by_default(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(upgrade_request("/echo"))
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 404"), head


async def test_chat_still_answers_after_a_ping_between_fragments(node: Node) -> None:
    uid = await node.user()
    ws = await RawWs.open(node.port, f"/chat?id={uid}&token={node.token(uid)}")
    whole = json.dumps({"cmd": 4, "id": 1 << 62}).encode()
    ws.send(frame(OP_TEXT, whole[:4], fin=False) + frame(OP_PING, b"x")
            + frame(OP_CONT, whole[4:]))
    got = [await ws.recv() for _ in range(2)]
    assert got[0].opcode == OP_PONG
    assert json.loads(got[1].payload) == {"cmd": 4, "id": 1 << 62}
    ws.close()
