"""A websocket client on a raw socket, for frames no library would send:
reserved bits, bad close codes, several frames in one write, a handshake
in pieces. Every read has a deadline (``UNIT``)."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from dataclasses import dataclass

from conftest import UNIT

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame (RFC 6455 §5.2); ``rsv``: the 3 reserved bits (0-7)."""
    mask = os.urandom(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def close_frame(code: int | None = None, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


def upgrade_request(path: str, *, key: str | None = None, version: str = "13",
                    extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode() if key is None else key
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n").encode()


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE, self
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


class RawWs:
    """An upgraded connection on a plain socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, timeout: float = 5.0) -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout * UNIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        """Bytes as they are: one frame, or several in one write."""
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0) -> Frame:
        async def go() -> Frame:
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames are not masked"
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return Frame(bool(b0 & 0x80), b0 & 0x0F, await self.reader.readexactly(n))
        return await asyncio.wait_for(go(), timeout * UNIT)

    async def until_close(self, timeout: float = 5.0) -> tuple[list[Frame], Frame]:
        """(the frames before the server's close frame, the close frame)."""
        before: list[Frame] = []
        while True:
            got = await self.recv(timeout)
            if got.opcode == OP_CLOSE:
                return before, got
            before.append(got)

    async def closed_by_server(self, timeout: float = 5.0) -> bytes:
        """Answer the server's close, then wait for it to drop the TCP
        connection; what came after its close frame (must be nothing)."""
        self.writer.write(close_frame(1000))
        rest = await asyncio.wait_for(self.reader.read(), timeout * UNIT)
        self.writer.close()
        return rest

    def close(self) -> None:
        self.writer.close()
