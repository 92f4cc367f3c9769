"""The chat port's gate: every accepted connection meets ``HandshakeGuard``
first, picows' own protocol behind it, and ``FrameGate`` once it is upgraded.

picows parses the HTTP handshake and gives the listener factory (the
shard's router) the request alone: not the peer's address, which the limit
per address needs. And a request head past picows' buffer (16 KiB) is cut off
without an answer. So until the request head is in, a guard stands between
the transport and picows' protocol: it passes every read through, counts the
head's bytes (past ``max_head_bytes``: 431, then a half-close), calls the
router with the peer's address, and once the head is complete hands the
connection to a ``FrameGate`` (``transport.set_protocol``).

picows fails a connection itself when a frame header breaks RFC 6455's
framing (1002) or announces more than its ``max_frame_size`` (1009), and for
a bad close frame or a second one (1002, 1007): it sends its close frame and
drops the TCP connection 10 ms later, with the client's unread frames turned
into a reset, before the answers chatd owes for the frames in front of the
bad one, and without chatd's session knowing. And it parses a frame ahead
before it hands over the one before. So the ``FrameGate`` reads every frame
header before picows does (the payloads stay in picows' buffer: reads go
straight into it, nothing is copied), passes picows only the frames it would
accept, and hands a bad one to the listener's ``on_bad_frame``: chatd closes
the connection as it closes any (the answers due, the close frame, a
half-close; see ``shard.Conn.send_close``). What follows a bad frame is read
and dropped (an oversized frame's payload, however big, is counted off and
the frames after it go on to picows; after a framing error, everything), and
nothing after a client's close frame reaches picows (RFC 6455 §5.5.1).

The handshake deadline is picows' ``websocket_handshake_timeout``: a timer
from the moment the connection is accepted, cancelled by the upgrade, that
drops the connection (whether the client sends its head byte by byte or
nothing at all). Over TLS, the TLS handshake gets the same time before it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final

import picows.picows as _picows
from picows import WSAutoPingStrategy, WSUpgradeRequest

from chatd.wire import CLOSE_INVALID_TEXT, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, valid_close_code

log = logging.getLogger("chatd.gate")

#: picows' protocol class (not in its type stubs; its constructor is positional)
_WSProtocol: Any = _picows.WSProtocol  # type: ignore[attr-defined]

#: the router: (request, peer address) -> what a picows listener factory returns
Router = Callable[[WSUpgradeRequest, str], Any]

_HEAD_END: Final = b"\r\n\r\n"
_TOO_LARGE_BODY: Final = b'{"error": "request header fields too large"}'
TOO_LARGE_RESPONSE: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: application/json\r\nCache-Control: no-store\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_TOO_LARGE_BODY)).encode() + b"\r\n\r\n" + _TOO_LARGE_BODY
)


class WSLog(logging.LoggerAdapter[logging.Logger]):
    """The logger picows gets. picows logs a protocol violation of the peer
    (a frame it cannot accept) as an error; it is the client's fault, not
    ours, and any client could fill the log with it: it goes out as debug."""

    PEER_FAULTS: Final = ("WS parser error", "on_ws_frame raised WSProtocolError")

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith(self.PEER_FAULTS):
            self.debug(msg, *args, **kwargs)
        else:
            super().error(msg, *args, **kwargs)


class HandshakeGuard(asyncio.BufferedProtocol):
    """Stands in front of one connection's picows protocol until its request
    head is in (see the module docstring)."""

    __slots__ = ("inner", "route", "limit", "frame_limit", "transport", "peer", "buf", "seen",
                 "tail", "refused")

    def __init__(self, route: Router, limit: int, ws: Callable[[Callable[..., Any]], Any],
                 frame_limit: int) -> None:
        self.route = route
        self.limit = limit
        #: the FrameGate's max_frame_bytes
        self.frame_limit = frame_limit
        #: picows' protocol for this connection (None once the guard stepped aside)
        self.inner: Any = ws(self._route)
        self.transport: Any = None
        self.peer = ""
        self.buf: Any = None
        #: bytes of the request head received so far, and the last 3 of them
        self.seen = 0
        self.tail = b""
        self.refused = False

    def _route(self, request: WSUpgradeRequest) -> Any:
        return self.route(request, self.peer)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> Any:
        if self.refused:
            if self.buf is None or len(self.buf) < 1024:
                self.buf = memoryview(bytearray(4096))
            return self.buf
        buf = self.buf = self.inner.get_buffer(sizehint)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        inner = self.inner
        if self.refused or inner is None:
            return  # the refused request's rest is read and dropped
        window = self.tail + bytes(self.buf[:nbytes])
        before = self.seen - len(self.tail)  # bytes of the head before ``window``
        self.seen += nbytes
        end = window.find(_HEAD_END)
        if end < 0:
            if self.seen >= self.limit:
                self._refuse()
                return
            self.tail = window[-3:]
            inner.buffer_updated(nbytes)
            return
        if before + end + len(_HEAD_END) > self.limit:
            self._refuse()
            return
        # the head is complete: picows gets it alone and answers it (the
        # router runs now); frames that came with it go through the FrameGate
        # like every later read
        self.inner = None
        head = end + len(_HEAD_END) - len(self.tail)
        rest = window[end + len(_HEAD_END):]
        self.buf = None
        inner.buffer_updated(head)
        gate = FrameGate(inner, self.frame_limit)
        self.transport.set_protocol(gate)
        if rest:
            gate.feed(rest)

    def _refuse(self) -> None:
        """431, then a half-close; what the client still sends is dropped until
        it closes, or the handshake deadline drops the connection."""
        self.refused = True
        self.buf = None
        transport = self.transport
        transport.write(TOO_LARGE_RESPONSE)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def eof_received(self) -> bool | None:
        inner = self.inner
        return inner.eof_received() if inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


#: FrameGate modes: frames go to picows; an oversized frame's payload is being
#: read and dropped (``left`` bytes of it to come); everything is dropped
PASS: Final = 0
SKIP: Final = 1
DROP: Final = 2
#: first bytes of a frame header that ``FrameGate.buffer_updated`` passes on
#: its quick path: data frames (opcodes 0-2, any FIN; reserved bits are the
#: shard's to fail)
_DATA: Final = bytes(1 if b & 0x0F <= 2 else 0 for b in range(256))
#: where a FrameGate reads what it drops (reads are synchronous: one serves all)
_SCRATCH: Final = memoryview(bytearray(64 * 1024))


def _unmask(payload: memoryview, mask: memoryview) -> bytes:
    """A client frame's payload unmasked (RFC 6455 §5.3)."""
    n = len(payload)
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload) ^ int.from_bytes(key)).to_bytes(n)


class FrameGate(asyncio.BufferedProtocol):
    """Stands in front of one upgraded connection's picows protocol for its
    whole life: reads every frame header before picows parses it and turns a
    frame that picows would fail the connection for into the listener's
    ``on_bad_frame(code, reason)`` (see the module docstring).

    Reads go into picows' own buffer (``get_buffer``); ``buffer_updated``
    walks the headers of what came and tells picows of the bytes it may parse.
    A header or a close frame cut by the end of a read is kept (``carry``, at
    most 131 bytes) and put in front of the next read: picows never sees a
    part of a header that could fail. The checks are picows' own (RFC 6455
    §5.2: opcodes, masking, the length's encoding, control frames unfragmented
    and at most 125 bytes; a data frame over ``limit``; a close frame's code,
    which chatd's ``valid_close_code`` allows, and its UTF-8 reason), so picows
    never fails a connection itself.
    """

    __slots__ = ("inner", "limit", "buf", "left", "carry", "mode")

    def __init__(self, inner: Any, limit: int) -> None:
        #: picows' protocol of this connection (it has run the handshake)
        self.inner = inner
        #: max_frame_bytes: the largest data frame payload that picows gets
        self.limit = limit
        #: picows' buffer as the last ``get_buffer`` gave it (carry included);
        #: between reads the scratch, so that no view of picows' buffer is kept
        self.buf = _SCRATCH
        #: bytes of the current frame still to come (PASS: to picows; SKIP: dropped)
        self.left = 0
        #: bytes read but not given to picows yet: an unfinished header or close frame
        self.carry = b""
        #: no listener: the upgrade was refused, picows closes the connection
        self.mode = PASS if inner.listener is not None else DROP

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.mode:
            return _SCRATCH
        view: memoryview = self.inner.get_buffer(sizehint)
        self.buf = view
        carry = self.carry
        if carry:
            # picows' free space is more than 256 bytes, a carry at most 131
            view[: len(carry)] = carry
            return view[len(carry):]
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if self.mode or self.carry:
            rest = self._take(nbytes)
            if rest:
                self.feed(rest)
            return
        # the usual read: whole data frames of up to 64 KiB (the general walk,
        # ``_walk``, takes over at any other header)
        view = self.buf
        self.buf = _SCRATCH
        pos = self.left
        limit = self.limit
        while pos < nbytes:
            if nbytes - pos < 4 or _DATA[view[pos]] == 0:
                rest = self._walk(view, pos, nbytes)
                if rest:
                    self.feed(rest)
                return
            size = view[pos + 1] - 0x80  # negative: unmasked, which _walk fails
            if size < 126:
                if size < 0 or size > limit:
                    break
                pos += 6 + size
            elif size == 126:
                size = view[pos + 2] << 8 | view[pos + 3]
                if size < 126 or size > limit:
                    break
                pos += 8 + size
            else:
                break
        else:
            self.left = pos - nbytes
            self.inner.buffer_updated(nbytes)
            return
        rest = self._walk(view, pos, nbytes)
        if rest:
            self.feed(rest)

    def feed(self, data: bytes) -> None:
        """Take ``data`` as if it had been read (bytes that the guard read
        with the request head, or that follow an oversized frame in a read)."""
        while data and self.mode != DROP:
            view = self.get_buffer(-1)
            k = min(len(view), len(data))
            if not k:  # cannot be (picows keeps 256 bytes free): never spin on it
                raise RuntimeError("no room in picows' read buffer")
            view[:k] = data[:k]
            del view  # picows may grow (move) its buffer in _take
            data = self._take(k) + data[k:]

    def _take(self, nbytes: int) -> bytes:
        """One read of ``nbytes``: give picows what it may parse. Returns the
        bytes (after an oversized frame) that are to be taken next."""
        mode = self.mode
        if mode:
            if mode == DROP:
                return b""
            left = self.left  # SKIP: the rest of an oversized frame
            if nbytes <= left:
                self.left = left - nbytes
                return b""
            self.left = 0
            self.mode = PASS
            return bytes(_SCRATCH[left:nbytes])
        view = self.buf
        self.buf = _SCRATCH
        total = nbytes
        if self.carry:
            total += len(self.carry)
            self.carry = b""
        return self._walk(view, self.left, total)

    def _walk(self, view: memoryview, pos: int, total: int) -> bytes:
        """Walk the headers in ``view[pos:total]`` (``pos``: where the first
        begins, or past ``total`` inside a payload) and give picows what it
        may parse. Returns the bytes (after an oversized frame) that are to
        be taken next."""
        if pos >= total:  # inside a payload
            self.left = pos - total
            self.inner.buffer_updated(total)
            return b""
        self.left = 0
        limit = self.limit
        while pos < total:
            avail = total - pos
            if avail < 2:
                break
            b0 = view[pos]
            b1 = view[pos + 1]
            opcode = b0 & 0x0F
            size = b1 & 0x7F
            if opcode > 10 or 2 < opcode < 8:
                return self._fail(pos, CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if b1 < 0x80:
                return self._fail(pos, CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
            if opcode >= 8:
                if b0 < 0x80:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if size > 125:
                    return self._fail(pos, CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
                end = pos + 6 + size
                if opcode == 8:
                    if end > total:
                        break
                    return self._close_frame(view, pos, end)
            else:
                if size < 126:
                    end = pos + 6 + size
                elif size == 126:
                    if avail < 4:
                        break
                    size = view[pos + 2] << 8 | view[pos + 3]
                    if size < 126:
                        return self._fail(pos, CLOSE_PROTOCOL_ERROR, "16-bit length under 126")
                    end = pos + 8 + size
                else:
                    if avail < 10:
                        break
                    size = int.from_bytes(view[pos + 2 : pos + 10])
                    if size >> 63 or size < 65536:
                        return self._fail(pos, CLOSE_PROTOCOL_ERROR, "invalid 64-bit length")
                    end = pos + 14 + size
                if size > limit:
                    return self._too_big(view, pos, end, total)
            pos = end
        if pos >= total:
            self.left = pos - total
            self.inner.buffer_updated(total)
        else:  # an unfinished header or close frame: the next read completes it
            self.carry = bytes(view[pos:total])
            if pos:
                self.inner.buffer_updated(pos)
        return b""

    def _close_frame(self, view: memoryview, pos: int, end: int) -> bytes:
        """A whole close frame at ``pos``: picows gets it and nothing after it."""
        payload = _unmask(view[pos + 6 : end], view[pos + 2 : pos + 6])
        if len(payload) == 1:
            return self._fail(pos, CLOSE_PROTOCOL_ERROR, "close code of 1 byte")
        if payload:
            code = payload[0] << 8 | payload[1]
            if not valid_close_code(code):
                return self._fail(pos, CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                payload[2:].decode()
            except UnicodeDecodeError:
                return self._fail(pos, CLOSE_INVALID_TEXT, "invalid UTF-8 in a close reason")
        self.mode = DROP
        self.inner.buffer_updated(end)
        return b""

    def _fail(self, pos: int, code: int, reason: str) -> bytes:
        """A frame at ``pos`` that breaks the framing: picows gets the frames
        before it, the listener the fault; the rest of the stream is dropped."""
        self.mode = DROP
        if pos:
            self.inner.buffer_updated(pos)
        self._report(code, reason)
        return b""

    def _too_big(self, view: memoryview, pos: int, end: int, total: int) -> bytes:
        """A data frame at ``pos`` over ``limit`` (ending at ``end``): picows
        gets the frames before it, the listener the fault; its payload is
        dropped, the frames after it go on to picows."""
        rest = b""
        if end <= total:
            rest = bytes(view[end:total])
        else:
            self.mode = SKIP
            self.left = end - total
        if pos:
            self.inner.buffer_updated(pos)
        self._report(CLOSE_TOO_BIG, "message too big")
        return rest

    def _report(self, code: int, reason: str) -> None:
        log.debug("a bad frame from a client: %s (%d)", reason, code)
        listener = self.inner.listener
        if listener is not None and not self.inner.transport.is_disconnected:
            listener.on_bad_frame(code, reason)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def listen(
    route: Router,
    *,
    max_frame_bytes: int,
    handshake_timeout_s: float,
    max_head_bytes: int,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    tls: ssl.SSLContext | None = None,
    **where: Any,
) -> asyncio.Server:
    """Listen for websocket connections (``where``: host/port/reuse_port or
    sock, as ``loop.create_server`` takes them), each behind a guard.

    The picows options are those that ``picows.ws_create_server`` would pass
    (it offers no way in for the guard): automatic pongs, no automatic pings
    (the shard's sweep pings), the frame size cap (which the FrameGate keeps
    before picows would) and the handshake deadline. Each listener the router
    returns has ``on_bad_frame(code, reason)`` (see ``FrameGate``).
    """
    loop = asyncio.get_running_loop()

    def ws(factory: Callable[..., Any]) -> Any:
        return _WSProtocol(
            None,  # host and port: a client's
            None,  # path: a client's
            False,  # server side
            factory,
            logger,
            True,  # disconnect on an exception in a listener
            handshake_timeout_s,
            False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE,  # no automatic pings
            True,  # automatic pongs
            max_frame_bytes,
            None,  # extra headers: a client's
            256,  # initial read buffer (picows makes it at least 2 KiB)
        )

    def guarded() -> HandshakeGuard:
        return HandshakeGuard(route, max_head_bytes, ws, max_frame_bytes)

    if tls is not None:
        where["ssl"] = tls
        where["ssl_handshake_timeout"] = handshake_timeout_s
    server: asyncio.Server = await loop.create_server(guarded, backlog=4096, **where)
    return server
