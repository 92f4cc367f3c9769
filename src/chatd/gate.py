"""The chat port's gate: every accepted connection meets ``HandshakeGuard``
first, picows' own protocol behind it.

picows parses the HTTP handshake and gives the listener factory (the
shard's router) the request alone: not the peer's address, which the limit
per address needs. And a request head past picows' buffer (16 KiB) is cut off
without an answer. So until the request head is in, a guard stands between
the transport and picows' protocol: it passes every read through, counts the
head's bytes (past ``max_head_bytes``: 431, then a half-close), calls the
router with the peer's address, and once the head is complete steps aside
(``transport.set_protocol``): frames then go to picows directly, the guard
costs an upgraded connection nothing.

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

    __slots__ = ("inner", "route", "limit", "transport", "peer", "buf", "seen", "tail",
                 "refused")

    def __init__(self, route: Router, limit: int, ws: Callable[[Callable[..., Any]], Any]
                 ) -> None:
        self.route = route
        self.limit = limit
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
        # the head is complete: picows answers it (the router runs now), and
        # everything after it goes to picows straight from the transport
        self.inner = None
        self.transport.set_protocol(inner)
        inner.buffer_updated(nbytes)

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
    (the shard's sweep pings), the frame size cap and the handshake deadline.
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
        return HandshakeGuard(route, max_head_bytes, ws)

    if tls is not None:
        where["ssl"] = tls
        where["ssl_handshake_timeout"] = handshake_timeout_s
    server: asyncio.Server = await loop.create_server(guarded, backlog=4096, **where)
    return server
