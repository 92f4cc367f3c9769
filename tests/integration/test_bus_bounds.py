"""The bus's two bounds, over real Unix sockets: a shard that does not read
its batches is cut off by the log; a shard whose log does not read refuses
submissions (error 503 for its clients) instead of buffering without end.

The bounds are module constants (64 MiB, 16 MiB); the tests lower them so
that a few MiB of real traffic reach them.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from conftest import TEST_PASSWORD_HASH, UNIT

from chatd.bus import unix
from chatd.bus.frames import AnyItem, Burst, Hello, Online, Welcome, decode_down, encode
from chatd.bus.unix import LogServer, UnixLogLink
from chatd.log import Log
from chatd.store.sqlite import SqliteStore
from chatd.wire import CMD_PRIVATE, Message

BIG = "x" * 6000


class Listener:
    """A shard's side of the link, keeping what the log sends."""

    def __init__(self) -> None:
        self.items: list[AnyItem] = []
        self.welcomes: list[Welcome] = []
        self.lost = 0
        self.changed = asyncio.Event()

    def on_welcome(self, welcome: Welcome) -> None:
        self.welcomes.append(welcome)
        self.changed.set()

    def on_batch(self, items: list[AnyItem], hw: int) -> None:
        self.items.extend(items)
        self.changed.set()

    def on_lost(self) -> None:
        self.lost += 1
        self.changed.set()


def _pm(src: int, dst: int, i: int) -> Message:
    return Message(userid=src, cmd=CMD_PRIVATE, dstid=dst, media=1, content=BIG, cid=f"b{i}")


async def test_a_shard_that_does_not_read_its_batches_is_cut_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unix, "PORT_BUFFER_MAX_BYTES", 1 << 20)
    store = await SqliteStore.open(tmp_path / "chatd.db")
    alice, bob = [await store.create_user(f"1380000{i:04d}", TEST_PASSWORD_HASH)
                  for i in range(2)]
    node_log = Log(store)
    await node_log.start()
    server = LogServer(node_log, tmp_path / "log.sock")
    await server.start()
    loop = asyncio.get_running_loop()
    # bob's shard: a raw socket that says Hello, places bob, then never reads again
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    await loop.sock_connect(stuck, str(server.path))
    for msg in (Hello(1), Burst([Online(bob)])):
        await loop.sock_sendall(stuck, unix.frame(encode(msg)))
    head = await asyncio.wait_for(loop.sock_recv(stuck, 4), 5 * UNIT)
    body = b""
    while len(body) < int.from_bytes(head, "big"):
        body += await loop.sock_recv(stuck, int.from_bytes(head, "big") - len(body))
    assert isinstance(decode_down(body), Welcome)
    # alice's shard: the real link, sending to bob until the log gives up on his
    sender = Listener()
    link = UnixLogLink(server.path, 2, sender)
    link.start()
    assert await link.wait_up(5 * UNIT)
    try:
        n = 0
        while len(server.conns) == 2 and n < 2000:  # 2000 × 6 KB = 12 MiB: far past 1 MiB
            for _ in range(20):
                n += 1
                assert link.submit(n, _pm(alice, bob, n))
            await asyncio.wait_for(node_log.flush(), 10 * UNIT)
        assert len(server.conns) == 1, f"the stuck shard was not cut off after {n} messages"
        assert n < 2000
        # the other shard is unaffected: its messages are still acked
        acked = len(sender.items)
        assert link.submit(n + 1, _pm(alice, bob, n + 1))
        await asyncio.wait_for(node_log.flush(), 10 * UNIT)
        while len(sender.items) == acked:
            sender.changed.clear()
            await asyncio.wait_for(sender.changed.wait(), 5 * UNIT)
        assert sender.lost == 0
        # everything that was acked is stored, cut-off or not
        assert await store.max_message_id() == n + 1
    finally:
        stuck.close()
        await link.close()
        await node_log.close()
        await server.close()
        await store.close()


async def test_a_shard_whose_log_does_not_read_refuses_submissions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unix, "LINK_BUFFER_MAX_BYTES", 1 << 20)
    loop = asyncio.get_running_loop()
    path = tmp_path / "log.sock"
    accepted: asyncio.Future[socket.socket] = loop.create_future()
    # a log that welcomes the shard and then stops reading
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen()
    listening.setblocking(False)

    async def serve() -> None:
        conn, _ = await loop.sock_accept(listening)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await loop.sock_sendall(conn, unix.frame(encode(Welcome(0, {}, []))))
        accepted.set_result(conn)

    serving = asyncio.ensure_future(serve())
    listener = Listener()
    link = UnixLogLink(path, 1, listener)
    link.start()
    try:
        assert await link.wait_up(5 * UNIT)
        conn = await asyncio.wait_for(accepted, 5 * UNIT)
        n = 0
        refused_at = 0
        while n < 2000:  # 12 MiB, far past the 1 MiB bound
            n += 1
            if not link.submit(n, _pm(1, 2, n)):
                refused_at = n
                break
            if n % 20 == 0:
                await asyncio.sleep(0)  # the burst is written
        assert refused_at, "2000 submissions buffered for a log that reads nothing"
        assert link.up, "the link stays up: it refuses, it does not give up"
        assert listener.lost == 0
        conn.close()
    finally:
        await link.close()
        serving.cancel()
        listening.close()
