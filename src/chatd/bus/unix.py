"""The bus between processes: Unix stream sockets, MessagePack frames.

The log process listens on ``log.sock`` in the node's run folder (mode 0600:
only chatd's own user may connect). Each frame is a 4-byte big-endian length
and one MessagePack value of ``bus.frames``.

- ``LogServer`` (the log process): one connection per shard (``Hello``
  first) or control client (``Call``s). A shard's submissions go into the
  log's queue; its batches are written back, one write per batch.
- ``UnixLogLink`` (a shard): a ``LogLink`` that reconnects by itself; what a
  shard submits during one pass of the event loop goes out in one write.
  While the link is down, submissions are refused (the client gets error
  503 and retries); when it comes back, the shard asks the log to place
  every user it holds again, and their sessions catch up from the store.
- ``UnixControl`` (an API worker, the admin CLI): a ``Control`` whose calls
  are answered by the log once committed.

Every buffer has a bound: a frame over ``MAX_FRAME_BYTES`` breaks the
connection; a shard that stops reading its batches past
``PORT_BUFFER_MAX_BYTES`` is cut off (it reconnects and catches up); a shard
whose link cannot write past ``LINK_BUFFER_MAX_BYTES`` refuses submissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from chatd.bus import LogListener
from chatd.bus.frames import (
    AnyItem,
    Batch,
    Burst,
    Call,
    Hello,
    Offline,
    Online,
    Refused,
    Result,
    Submit,
    Welcome,
    decode_down,
    decode_up,
    encode,
)
from chatd.errors import ChatdError, NotFoundError, StoreUnavailable
from chatd.log import Log
from chatd.wire import ERR_BUSY, Message

log = logging.getLogger("chatd.bus")

MAX_FRAME_BYTES: Final = 64 << 20
PORT_BUFFER_MAX_BYTES: Final = 64 << 20
LINK_BUFFER_MAX_BYTES: Final = 16 << 20
RECONNECT_MIN_S: Final = 0.05
RECONNECT_MAX_S: Final = 1.0
_length = struct.Struct("!I")


def frame(payload: bytes) -> bytes:
    """``payload`` with its length prefix."""
    return _length.pack(len(payload)) + payload


class _Framed(asyncio.Protocol):
    """Splits a byte stream into length-prefixed frames for ``on_frame``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        end = len(buf)
        while end - start >= 4:
            (n,) = _length.unpack_from(buf, start)
            if n > MAX_FRAME_BYTES:
                log.error("a bus frame of %d bytes: closing the connection", n)
                assert self.transport is not None
                self.transport.close()
                buf.clear()
                return
            if end - start - 4 < n:
                break
            payload = bytes(buf[start + 4 : start + 4 + n])
            start += 4 + n
            try:
                self.on_frame(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("a bad bus frame (%s): closing the connection", exc)
                assert self.transport is not None
                self.transport.close()
                buf.clear()
                return
        if start:
            del buf[:start]

    def on_frame(self, payload: bytes) -> None:
        raise NotImplementedError


# --- the log's side ---------------------------------------------------------------

#: the operations a control client may call, with the log's method for each
_OPS: Final = (
    "create_group", "join_group", "leave_group", "revoke_tokens", "set_banned", "broadcast"
)


class _LogConn(_Framed):
    """One connection to the log: a shard (after ``Hello``) or a control client."""

    def __init__(self, server: LogServer) -> None:
        super().__init__()
        self.server = server
        self.port_id = 0
        #: the shard index its Hello gave (-1: a control client)
        self.shard = -1

    def on_frame(self, payload: bytes) -> None:
        node_log = self.server.log
        msg = decode_up(payload)
        if isinstance(msg, Burst):
            port = self.port_id
            refused: list[AnyItem] = []
            for item in msg.items:
                if isinstance(item, Submit):
                    if not node_log.submit(port, item.seq, item.msg):
                        refused.append(Refused(item.seq, ERR_BUSY, "server busy, retry later"))
                elif isinstance(item, Online):
                    node_log.online(port, item.uid)
                else:
                    node_log.offline(port, item.uid)
            if refused:
                self.send(refused, node_log.hw)
        elif isinstance(msg, Hello):
            self.shard = msg.shard
            self.port_id, welcome = node_log.attach(self)
            self.server.shards_attached(+1)
            self._write(encode(welcome))
            log.info("shard %d connected (port %d)", msg.shard, self.port_id)
        elif isinstance(msg, Call):
            self.server.spawn(self._answer(msg))

    async def _answer(self, call: Call) -> None:
        node_log = self.server.log
        try:
            if call.op not in _OPS:
                raise ChatdError(f"unknown operation {call.op!r}")
            value = await getattr(node_log, call.op)(*call.args)
            result = Result(call.req, True, value)
        except NotFoundError as exc:
            result = Result(call.req, False, kind="not_found", error=str(exc))
        except StoreUnavailable as exc:
            result = Result(call.req, False, kind="unavailable", error=str(exc))
        except (ChatdError, TypeError) as exc:
            result = Result(call.req, False, kind="error", error=str(exc))
        self._write(encode(result))

    def send(self, items: list[AnyItem], hw: int) -> None:
        """``Port``: one batch to this shard, in one write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > PORT_BUFFER_MAX_BYTES:
            log.error("shard port %d does not read its batches: cutting it off", self.port_id)
            transport.abort()
            return
        transport.write(frame(encode(Batch(hw, items))))

    def _write(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.port_id:
            log.info("shard port %d disconnected", self.port_id)
            self.server.log.detach(self.port_id)
            self.port_id = 0
            self.server.shards_attached(-1)
        self.server.conns.discard(self)


class LogServer:
    """The log process's listener for shards and control clients."""

    def __init__(self, node_log: Log, path: Path) -> None:
        self.log = node_log
        self.path = path
        self.conns: set[_LogConn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._shards = 0
        self._no_shards = asyncio.Event()
        self._no_shards.set()

    def shards_attached(self, delta: int) -> None:
        self._shards += delta
        if self._shards:
            self._no_shards.clear()
        else:
            self._no_shards.set()

    async def wait_no_shards(self, timeout_s: float) -> bool:
        """Wait until no shard is attached (they drained); False on timeout."""
        try:
            await asyncio.wait_for(self._no_shards.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _conn(self) -> _LogConn:
        conn = _LogConn(self)
        self.conns.add(conn)
        return conn

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a killed log
        old = os.umask(0o177)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._conn, str(self.path)
            )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- a shard's side -------------------------------------------------------------------


class _ShardConn(_Framed):
    def __init__(self, link: UnixLogLink) -> None:
        super().__init__()
        self.link = link
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_frame(self, payload: bytes) -> None:
        down = decode_down(payload)
        if isinstance(down, Batch):
            self.link.listener.on_batch(down.items, down.hw)
        elif isinstance(down, Welcome):
            self.link.welcomed(down)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class UnixLogLink:
    """A shard's ``LogLink`` to the log process, over ``path``."""

    def __init__(self, path: Path, shard: int, listener: LogListener) -> None:
        self.path = path
        self.shard = shard
        self.listener = listener
        self._conn: _ShardConn | None = None
        self._up = False
        self._out: list[Submit | Online | Offline] = []
        self._flush_soon = False
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def wait_up(self, timeout_s: float) -> bool:
        """Wait until the log has welcomed this shard once; False on timeout."""
        try:
            await asyncio.wait_for(self._first.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RECONNECT_MIN_S
        while True:
            try:
                _, conn = await loop.create_unix_connection(
                    lambda: _ShardConn(self), str(self.path)
                )
            except OSError:
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)
                continue
            delay = RECONNECT_MIN_S
            self._conn = conn
            assert conn.transport is not None
            conn.transport.write(frame(encode(Hello(self.shard))))
            await conn.lost
            self._conn = None
            self._out.clear()
            if self._up:
                self._up = False
                log.error("shard %d lost its link to the log; reconnecting", self.shard)
                self.listener.on_lost()

    def welcomed(self, welcome: Welcome) -> None:
        self._up = True
        self._first.set()
        self.listener.on_welcome(welcome)

    def _send(self, item: Submit | Online | Offline) -> None:
        self._out.append(item)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._out = self._out, []
        conn = self._conn
        if out and conn is not None and conn.transport is not None:
            conn.transport.write(frame(encode(Burst(out))))

    def submit(self, seq: int, msg: Message) -> bool:
        conn = self._conn
        if not self._up or conn is None or conn.transport is None:
            return False
        if conn.transport.get_write_buffer_size() > LINK_BUFFER_MAX_BYTES:
            return False
        self._send(Submit(seq, msg))
        return True

    def online(self, uid: int) -> None:
        if self._up:
            self._send(Online(uid))

    def offline(self, uid: int) -> None:
        if self._up:
            self._send(Offline(uid))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._flush()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._up = False


# --- a control client's side ----------------------------------------------------------


class _ControlConn(_Framed):
    def __init__(self, on_result: Callable[[Result], None], on_lost: Callable[[], None]) -> None:
        super().__init__()
        self._on_result = on_result
        self._on_lost = on_lost

    def on_frame(self, payload: bytes) -> None:
        down = decode_down(payload)
        if isinstance(down, Result):
            self._on_result(down)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class UnixControl:
    """``bus.Control`` over the log's socket (an API worker, the admin CLI)."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._conn: _ControlConn | None = None
        self._calls: dict[int, asyncio.Future[Result]] = {}
        self._req = 0
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _ControlConn:
        if self._conn is not None:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is None:
                try:
                    _, conn = await asyncio.get_running_loop().create_unix_connection(
                        lambda: _ControlConn(self._result, self._lost), str(self.path)
                    )
                except OSError as exc:
                    raise StoreUnavailable(f"the node's log is not reachable: {exc}") from None
                self._conn = conn
        assert self._conn is not None
        return self._conn

    def _result(self, result: Result) -> None:
        future = self._calls.pop(result.req, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _lost(self) -> None:
        self._conn = None
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(StoreUnavailable("the node's log went away"))

    async def call(self, op: str, *args: Any) -> Any:
        """Run ``op`` in the log; its value, or the error it raised."""
        conn = await self._connection()
        self._req += 1
        req = self._req
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._calls[req] = future
        assert conn.transport is not None
        conn.transport.write(frame(encode(Call(req, op, list(args)))))
        try:
            result = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            self._calls.pop(req, None)
            raise StoreUnavailable(f"the node's log did not answer {op} in time") from None
        if result.ok:
            return result.value
        if result.kind == "not_found":
            raise NotFoundError(result.error)
        if result.kind == "unavailable":
            raise StoreUnavailable(result.error)
        raise ChatdError(result.error)

    async def create_group(
        self, name: str, owner: int, icon: str = "", cate: int = 0, memo: str = ""
    ) -> int:
        return int(await self.call("create_group", name, owner, icon, cate, memo))

    async def join_group(self, gid: int, uid: int) -> bool:
        return bool(await self.call("join_group", gid, uid))

    async def leave_group(self, gid: int, uid: int) -> bool:
        return bool(await self.call("leave_group", gid, uid))

    async def revoke_tokens(self, uid: int) -> int:
        return int(await self.call("revoke_tokens", uid))

    async def set_banned(self, uid: int, banned: bool) -> bool:
        return bool(await self.call("set_banned", uid, banned))

    async def broadcast(self, text: str, gid: int | None = None) -> int:
        return int(await self.call("broadcast", text, gid))

    async def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
