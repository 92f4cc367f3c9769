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
from conftest import UNIT, Node
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
async def test_frames_that_break_the_framing_fail_1002(path: tuple[Node, str],
                                                       data: bytes) -> None:
    ws = await _open(path)
    ws.send(data)
    await _fails_with(ws, 1002)


async def test_a_protocol_error_of_the_peer_is_not_logged_as_ours(
        path: tuple[Node, str], caplog: pytest.LogCaptureFixture) -> None:
    """A violation is the client's fault, which any client could repeat to
    fill the log: the gate notes it as debug, and nothing (picows' parser
    included) logs it as a warning or an error."""
    caplog.set_level(logging.DEBUG)
    ws = await _open(path)
    ws.send(frame(0x3, b"x"))
    await _fails_with(ws, 1002)
    faults = [r for r in caplog.records if r.name == "chatd.gate"]
    assert [(r.levelno, r.getMessage()) for r in faults] == [
        (logging.DEBUG, "a bad frame from a client: reserved opcode 0x3 (1002)")]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_the_frames_before_a_protocol_error_are_answered_first(
        path: tuple[Node, str]) -> None:
    """4.1.3: a message, a frame with a reserved opcode and a ping in one write.
    The message is answered (an echo; at /chat an error frame, cmd 42 is
    unknown), then the connection fails with 1002; the ping is not answered
    (nothing may follow a close frame)."""
    node, where = path
    ws = await _open(path)
    ws.send(frame(OP_TEXT, b'{"cmd": 42}') + frame(0x5, b"") + frame(OP_PING, b"p"))
    (answer,) = await _fails_with(ws, 1002)
    assert answer.opcode == OP_TEXT
    if where == "/echo":
        assert answer.payload == b'{"cmd": 42}'
    else:
        assert json.loads(answer.payload)["cmd"] == 5


async def test_a_close_frame_in_pieces_is_answered(path: tuple[Node, str]) -> None:
    """A close frame whose payload comes in several reads (the gate holds its
    start until the rest is in, then judges it whole)."""
    ws = await _open(path)
    data = close_frame(1001, b"going")
    for i in range(len(data)):
        ws.send(data[i:i + 1])
        await ws.writer.drain()
    _, close = await ws.until_close()
    assert close.close_code == 1001
    assert await ws.reader.read() == b""
    ws.close()


async def test_frames_in_the_same_write_as_the_request_head_are_judged_too(
        path: tuple[Node, str]) -> None:
    """The head, a ping and a frame with a reserved opcode in one write: the
    upgrade, the pong, then the connection fails with 1002."""
    node, where = path
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    ws = RawWs(reader, writer)
    try:
        writer.write(upgrade_request(where) + frame(OP_PING, b"early") + frame(0x3, b"x"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        (pong,) = await _fails_with(ws, 1002)
        assert (pong.opcode, pong.payload) == (OP_PONG, b"early")
    finally:
        ws.close()


async def test_a_ping_is_answered_with_its_payload(path: tuple[Node, str]) -> None:
    ws = await _open(path)  # 2.2, 2.3
    ws.send(frame(OP_PING, b"\x00\xff" * 62) + frame(OP_PONG, b"unasked"))
    got = await ws.recv()
    assert (got.opcode, got.payload) == (OP_PONG, b"\x00\xff" * 62)
    ws.send(close_frame(1000))
    _, close = await ws.until_close()
    assert close.close_code == 1000
    ws.close()


async def test_a_second_close_frame_is_ignored(path: tuple[Node, str]) -> None:
    """7.1.2: two close frames in one write. The first is answered; nothing
    after it reaches picows (which would fail the connection for a second
    close with 1002, parsing it before it hands over the first)."""
    ws = await _open(path)
    try:
        ws.send(close_frame(1000) + close_frame())
        before, close = await ws.until_close()
        assert (before, close.close_code) == ([], 1000)
        assert await ws.reader.read() == b""
    finally:
        ws.close()


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
