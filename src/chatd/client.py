"""chatd's Python SDK: the HTTP API, typed, and the chat websocket with a send queue.

Needs nothing beyond chatd's own dependencies (aiohttp, msgspec)::

    import asyncio
    from chatd.client import ChatClient

    async def main() -> None:
        async with ChatClient("http://127.0.0.1:8081") as chat:
            await chat.login("13800000001", "secret1")
            await chat.connect()                  # the websocket; returns once caught up
            ack = await chat.send_text(2, "hi")   # resolves with the ack: id, cid, ts
            async for msg in chat.messages():     # private and group messages, each once
                print(msg.userid, msg.content)

    asyncio.run(main())

HTTP calls (``chatd.client_http.ApiClient``, which ``ChatClient`` extends)
send and decode the types of ``chatd.api_schema`` (the server validates
with the same ones) and raise ``HttpError`` on a refusal.

The websocket keeps the semantics of the JavaScript client (docs/clients.md):

- ``submit``/``send`` queue a message; it goes out, in order, as soon as a
  connection is open. Each carries a ``cid`` (made here when empty); a
  message not acked when its connection drops is sent again, same cid, on
  the next one, and the server stores a cid once.
- The ack (cmd 1, matched by cid) resolves the send; an error frame (cmd 5)
  rejects it with ``SendError``, except 500 and 503 (not stored): those go
  again, same cid, after a backoff.
- Reconnect with exponential backoff and jitter; every connect resumes with
  ``last=`` (the highest id received), and messages are deduplicated by id:
  nothing missed, nothing twice.
- A heartbeat (cmd 0) goes out after ``heartbeat_s`` without sending; a
  connection that leaves a message unacked for ``ack_timeout_s`` with no
  frame at all meanwhile is presumed dead and replaced.
- Close codes 4500-4999 (revoked, banned) and a handshake refused with 400,
  401 or 403 are final: no reconnect, pending sends fail with ``ClosedError``.

Frames are JSON text by default, MessagePack with ``Options(binary=True)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
import msgspec
import yarl

from chatd import wire
from chatd.api_schema import (
    Group,
    HistoryPage,
    Me,
    UploadReply,
    User,
)
from chatd.client_http import ApiClient, ClientError, HttpError
from chatd.wire import Message

__all__ = [
    "ApiClient", "ChatClient", "ClientError", "ClosedError", "Group", "HistoryPage",
    "HttpError", "Me", "Message", "Options", "SendError", "State", "UploadReply", "User",
    "backoff_delay", "may_reconnect",
]

log = logging.getLogger("chatd.client")

#: error codes (cmd 5 ``amount``) that mean "not stored, send it again later"
RETRY_LATER: Final = frozenset({wire.ERR_SERVER, wire.ERR_BUSY})
#: handshake answers after which trying again cannot help
FINAL_HANDSHAKE: Final = frozenset({400, 401, 403})
CLOSE_NO_ACK: Final = 4000
#: the seed's heartbeat, spelled out (an empty object would mean the same)
HEARTBEAT_JSON: Final = '{"cmd":0}'
HEARTBEAT_MSGPACK: Final = msgspec.msgpack.encode({"cmd": 0})


class SendError(ClientError):
    """An error frame (cmd 5) refused a message: ``code`` as in docs/protocol.md."""

    def __init__(self, code: int, reason: str, cid: str) -> None:
        super().__init__(reason or f"refused with code {code}")
        self.code = code
        self.reason = reason
        self.cid = cid


class ClosedError(ClientError):
    """The client stopped (``close()``, or a final close) before the message was acked."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason or f"closed with code {code}")
        self.code = code
        self.reason = reason


class State(enum.Enum):
    IDLE = "idle"  #: connect() not called yet
    CONNECTING = "connecting"  #: a websocket is being opened
    OPEN = "open"  #: connected: sends go out at once
    WAITING = "waiting"  #: disconnected, waiting out the backoff
    CLOSED = "closed"  #: close() was called, or the server said not to come back


@dataclasses.dataclass(frozen=True)
class Options:
    """How the websocket side behaves; the defaults match the JavaScript client."""

    heartbeat_s: float = 30.0
    ack_timeout_s: float = 10.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    #: message ids remembered to drop a second copy
    dedupe_window: int = 10_000
    #: received messages waiting for ``recv``; when full, reading the socket
    #: waits (the server may drop a reader this slow with 4009, and the next
    #: connect resumes from ``last``)
    max_queue: int = 10_000
    #: MessagePack binary frames instead of JSON text
    binary: bool = False
    http_timeout_s: float = 30.0
    #: largest frame accepted from the server
    max_frame_bytes: int = 1 << 20


def backoff_delay(attempt: int, min_s: float, max_s: float,
                  rand: Callable[[], float] = random.random) -> float:
    """The wait before reconnect number ``attempt`` (0 first): half of
    ``min(max_s, min_s * 2**attempt)`` plus a random part of the other half."""
    cap = min(max_s, min_s * 2.0 ** min(attempt, 30))
    return cap / 2 + rand() * cap / 2


def may_reconnect(code: int) -> bool:
    """Whether a close code lets the client come back (4500-4999: it must not)."""
    return not 4500 <= code <= 4999


def new_cid() -> str:
    """A fresh cid: the time in ms (12 hex digits) and then 80 random bits (20
    hex digits). Leading with the time puts each new cid at the end of the
    server's unique index of cids, not at a random place in it: a page per
    batch instead of a page per message (docs/protocol.md, "cid")."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


@dataclasses.dataclass(eq=False)
class _Entry:
    msg: Message
    future: asyncio.Future[Message]
    sent_on: int = 0  #: the connection it went out on (0: not on this one)
    sent_at: float = 0.0
    not_before: float = 0.0  #: after a 500/503: not again before this time
    tries: int = 0


_json_frame = msgspec.json.Decoder(Message).decode
_msgpack_frame = msgspec.msgpack.Decoder(Message).decode
class ChatClient(ApiClient):
    """One user's connection to a chatd node: the HTTP calls of ``ApiClient``
    and the chat websocket.

    ``api_url`` is the HTTP API's base (``http://host:8081``). The websocket's
    URL is ``ws_url`` if given, else the API's host name on the chat port
    that ``/config.json`` names. ``token`` and ``uid`` are set by ``login`` and
    ``register``, or given for a saved session; ``last`` is where to resume.
    """

    def __init__(
        self,
        api_url: str,
        *,
        token: str = "",
        uid: int = 0,
        ws_url: str | None = None,
        last: int = 0,
        options: Options | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.options = options or Options()
        super().__init__(api_url, token=token, uid=uid, session=session,
                         timeout_s=self.options.http_timeout_s)
        self.ws_url = ws_url
        self._last = last
        self._state = State.IDLE
        self._state_changed = asyncio.Event()
        self._fatal: ClosedError | None = None
        self._outbox: list[_Entry] = []
        self._by_cid: dict[str, _Entry] = {}
        self._seen: set[int] = set()
        self._seen_order: collections.deque[int] = collections.deque()
        self._incoming: asyncio.Queue[Message | None] = asyncio.Queue(self.options.max_queue)
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._synced = asyncio.Event()
        self._serial = 0
        self._attempt = 0
        self._heard_at = 0.0
        self._runner: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def last(self) -> int:
        """The highest message id received: where the next connect resumes."""
        return self._last

    @property
    def connections(self) -> int:
        """How many websocket connections have opened so far: the first plus reconnects."""
        return self._serial

    @property
    def pending(self) -> int:
        """Messages submitted but not acked yet."""
        return len(self._outbox)

    @property
    def fatal(self) -> ClosedError | None:
        """Why the client stopped for good, if it did."""
        return self._fatal

    def pending_messages(self) -> list[Message]:
        """The unacked messages, in order, cids included (to submit them again later)."""
        return [e.msg for e in self._outbox]

    async def wait_state(self, state: State, timeout: float | None = None) -> None:
        """Return once the client is in ``state`` (``TimeoutError`` after ``timeout``)."""
        async def go() -> None:
            while self._state is not state:
                self._state_changed.clear()
                await self._state_changed.wait()
        await asyncio.wait_for(go(), timeout)

    def _set_state(self, state: State) -> None:
        self._state = state
        self._state_changed.set()

    # --- HTTP ---------------------------------------------------------------------------

    # --- the websocket: public side -------------------------------------------------------

    async def connect(self, *, wait: bool = True) -> None:
        """Start the websocket (and keep it up until ``close``).

        With ``wait``, return once the first connection has replayed what
        was missed since ``last`` (its cmd 4); ``ClosedError`` if the server
        refuses for good first. Without, return at once.
        """
        if self._state is State.CLOSED:
            raise self._fatal or ClosedError(1000, "the client is closed")
        if not self.token or not self.uid:
            raise ClientError("log in (or give token and uid) before connecting")
        if self._runner is None:
            if self.ws_url is None:
                cfg = await self.config()
                host = yarl.URL(self.api_url).host or "127.0.0.1"
                scheme = "wss" if yarl.URL(self.api_url).scheme == "https" else "ws"
                self.ws_url = str(yarl.URL.build(scheme=scheme, host=host, port=cfg.chat_port,
                                                 path=cfg.ws_path))
            self._runner = asyncio.create_task(self._run(), name="chatd-client")
        if wait:
            stopped = asyncio.create_task(self.wait_state(State.CLOSED))
            synced = asyncio.create_task(self._synced.wait())
            try:
                await asyncio.wait({stopped, synced}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                synced.cancel()
            if self._fatal is not None:
                raise self._fatal

    def submit(self, msg: Message) -> asyncio.Future[Message]:
        """Queue ``msg`` (cmd 10 or 11) for sending; the future gets its ack.

        A message with no cid gets one. Submitting a cid that is still
        pending returns the same future.
        """
        if not msg.cid:
            msg = msgspec.structs.replace(msg, cid=new_cid())
        known = self._by_cid.get(msg.cid)
        if known is not None:
            return known.future
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        if self._state is State.CLOSED:
            future.set_exception(self._fatal or ClosedError(1000, "the client is closed"))
            return future
        entry = _Entry(msg, future)
        self._outbox.append(entry)
        self._by_cid[msg.cid] = entry
        self._wake.set()
        return future

    async def send(self, msg: Message) -> Message:
        """Queue ``msg`` and wait for its ack (``SendError``, ``ClosedError``)."""
        return await self.submit(msg)

    async def send_text(self, dstid: int, content: str, *, group: bool = False,
                        cid: str = "") -> Message:
        """A text message to user ``dstid`` (or to group ``dstid``); its ack."""
        cmd = wire.CMD_GROUP if group else wire.CMD_PRIVATE
        return await self.send(Message(cmd=cmd, dstid=dstid, media=wire.MEDIA_TEXT,
                                       content=content, cid=cid))

    async def send_image(self, dstid: int, upload: UploadReply, *, group: bool = False,
                         cid: str = "") -> Message:
        """An image message (media 4) from an ``upload`` reply; its ack."""
        cmd = wire.CMD_GROUP if group else wire.CMD_PRIVATE
        return await self.send(Message(cmd=cmd, dstid=dstid, media=wire.MEDIA_IMAGE,
                                       url=upload.url, pic=upload.pic, cid=cid))

    async def recv(self) -> Message:
        """The next message received (cmd 10 or 11), each id once, in id order."""
        msg = await self._incoming.get()
        if msg is None:
            self._incoming.put_nowait(None)  # for the next reader too
            raise self._fatal or ClosedError(1000, "the client is closed")
        return msg

    async def messages(self) -> AsyncIterator[Message]:
        """Every message received, until the client closes."""
        while True:
            try:
                yield await self.recv()
            except ClosedError:
                return

    def reconnect_now(self) -> None:
        """Stop waiting out the backoff and try at once."""
        self._retry_now.set()

    async def close(self) -> None:
        """Stop for good; pending sends fail with ``ClosedError``."""
        if self._state is not State.CLOSED:
            self._stop(ClosedError(1000, "closed by the client"), fatal=False)
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await super().close()

    # --- the websocket: the connection loop --------------------------------------------------

    def _url(self) -> str:
        assert self.ws_url is not None
        return str(yarl.URL(self.ws_url).update_query(
            id=str(self.uid), token=self.token, last=str(self._last)))

    def _stop(self, err: ClosedError, *, fatal: bool) -> None:
        if fatal:
            self._fatal = err
        for entry in self._outbox:
            if not entry.future.done():
                entry.future.set_exception(err)
                entry.future.exception()  # retrieved: a caller that gave up is no bug
        if fatal:
            self._outbox.clear()
            self._by_cid.clear()
        self._set_state(State.CLOSED)
        # a full queue: a reader drains it, then finds the state closed
        with contextlib.suppress(asyncio.QueueFull):
            self._incoming.put_nowait(None)

    async def _run(self) -> None:
        opts = self.options
        while True:
            self._set_state(State.CONNECTING)
            code, reason = 1006, ""
            try:
                ws = await self._http().ws_connect(
                    self._url(), autoping=True, heartbeat=None, max_msg_size=opts.max_frame_bytes,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0))
            except aiohttp.WSServerHandshakeError as exc:
                reason = f"handshake refused: {exc.status} {exc.message}"
                if exc.status in FINAL_HANDSHAKE:
                    self._stop(ClosedError(exc.status, reason), fatal=True)
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"cannot connect: {exc!r}"
            else:
                code, reason = await self._converse(ws)
                if not may_reconnect(code):
                    self._stop(ClosedError(code, reason), fatal=True)
                    return
            delay = backoff_delay(self._attempt, opts.backoff_min_s, opts.backoff_max_s)
            self._attempt += 1
            log.debug("disconnected (%s %s); retrying in %.2f s", code, reason, delay)
            self._set_state(State.WAITING)
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), delay)

    async def _converse(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
        """One connection: write the queue, read frames; its close code and reason."""
        self._serial += 1
        serial = self._serial
        self._heard_at = asyncio.get_running_loop().time()
        for entry in self._outbox:
            entry.sent_on = 0
        self._set_state(State.OPEN)
        writer = asyncio.create_task(self._write(ws, serial), name="chatd-client-writer")
        try:
            async for frame in ws:
                self._heard_at = asyncio.get_running_loop().time()
                if frame.type == aiohttp.WSMsgType.TEXT:
                    await self._on_frame(frame.data.encode(), binary=False)
                elif frame.type == aiohttp.WSMsgType.BINARY:
                    await self._on_frame(frame.data, binary=True)
                elif frame.type == aiohttp.WSMsgType.ERROR:
                    break
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await writer
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await ws.close()
        code = ws.close_code if ws.close_code is not None else 1006
        reason = str(ws.exception() or "")
        return code, reason

    async def _send_frame(self, ws: aiohttp.ClientWebSocketResponse, msg: Message) -> None:
        if self.options.binary:
            await ws.send_bytes(wire.encode_msgpack(msg))
        else:
            await ws.send_str(wire.encode_json(msg).decode())

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, serial: int) -> None:
        """The one writer of a connection: the queue in order, heartbeats, the ack watch."""
        loop = asyncio.get_running_loop()
        opts = self.options
        sent_at = loop.time()
        while True:
            self._wake.clear()
            now = loop.time()
            wait = opts.heartbeat_s - (now - sent_at)
            for entry in list(self._outbox):
                if entry.sent_on == serial:
                    continue
                if entry.not_before > now:
                    wait = min(wait, entry.not_before - now)
                    continue
                entry.sent_on = serial
                entry.sent_at = now
                await self._send_frame(ws, entry.msg)
                sent_at = now = loop.time()
            in_flight = [e for e in self._outbox if e.sent_on == serial]
            if in_flight:
                oldest = min(e.sent_at for e in in_flight)
                silent_since = max(oldest, self._heard_at)
                if now - silent_since >= opts.ack_timeout_s:
                    log.debug("no ack for %.1f s and nothing heard: reconnecting", now - oldest)
                    await ws.close(code=CLOSE_NO_ACK, message=b"no ack")
                    return
                wait = min(wait, silent_since + opts.ack_timeout_s - now)
            if now - sent_at >= opts.heartbeat_s:
                if opts.binary:
                    await ws.send_bytes(HEARTBEAT_MSGPACK)
                else:
                    await ws.send_str(HEARTBEAT_JSON)
                sent_at = loop.time()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))

    # --- frames -------------------------------------------------------------------------------

    async def _on_frame(self, data: bytes, *, binary: bool) -> None:
        try:
            frame = (_msgpack_frame if binary else _json_frame)(data)
        except msgspec.DecodeError:
            log.warning("undecodable frame from the server: %r", data[:100])
            return
        cmd = frame.cmd
        if cmd == wire.CMD_ACK:
            self._bump(frame.id)
            entry = self._take(frame.cid)
            if entry is not None and not entry.future.done():
                entry.future.set_result(frame)
        elif cmd == wire.CMD_SYNC:
            self._bump(frame.id)
            self._attempt = 0  # a whole replay went through: the connection works
            self._synced.set()
        elif cmd == wire.CMD_ERROR:
            self._on_error(frame)
        elif cmd in (wire.CMD_PRIVATE, wire.CMD_GROUP):
            if frame.id:
                if frame.id in self._seen:
                    return
                self._remember(frame.id)
                self._bump(frame.id)
            await self._incoming.put(frame)

    def _on_error(self, frame: Message) -> None:
        entry = self._by_cid.get(frame.cid) if frame.cid else None
        if entry is None:
            log.warning("error frame %d: %s", frame.amount, frame.memo)
            return
        if frame.amount in RETRY_LATER:
            opts = self.options
            entry.sent_on = 0
            entry.not_before = asyncio.get_running_loop().time() + backoff_delay(
                entry.tries, opts.backoff_min_s, opts.backoff_max_s)
            entry.tries += 1
            self._wake.set()
            return
        self._take(frame.cid)
        if not entry.future.done():
            entry.future.set_exception(SendError(frame.amount, frame.memo, frame.cid))

    def _take(self, cid: str) -> _Entry | None:
        entry = self._by_cid.pop(cid, None) if cid else None
        if entry is not None:
            self._outbox.remove(entry)
        return entry

    def _bump(self, msg_id: int) -> None:
        if msg_id > self._last:
            self._last = msg_id

    def _remember(self, msg_id: int) -> None:
        self._seen.add(msg_id)
        self._seen_order.append(msg_id)
        if len(self._seen_order) > self.options.dedupe_window:
            self._seen.discard(self._seen_order.popleft())
