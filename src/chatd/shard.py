"""A shard: one process's picows websocket server, glue around its sessions.

The listener factory (``Shard.route``) is the router of the handshake; it
sees each request with its peer's address (``gate``: a guard in front of
picows until the request head is in, which also answers an oversized head
with 431). ``/chat`` checks that it is an upgrade (``handshake``: 400, 426),
the connections its address holds here (429), the origin and the token, and
returns a ``Conn``; ``/healthz`` answers a small 200; ``echo_path``, when the
config sets it (a test aid), returns an ``EchoConn``; anything else 404. It
also mends what picows refuses although RFC 6455 allows it (``Connection:
keep-alive, Upgrade``, as Firefox sends it).

``Conn.on_ws_frame`` keeps the rules of RFC 6455 that picows leaves to its
user: no reserved bits (no extension is negotiated), no new message inside
a fragmented one, valid close codes (all 1002), and valid UTF-8 in text
messages, checked fragment by fragment as they come (1007).

Everything a connection knows lives in its ``protocol.Session``; ``Conn``
only feeds it (a frame is valid only inside ``on_ws_frame``: it is decoded at
once) and writes what it collects. The shard talks to the node's log through
a ``bus.LogLink``: it submits validated messages and reports which users it
holds; the log's batches come back to ``on_batch`` in the node's order, and
the shard acks its senders and fans out to its connections (``fanout``).

Presence on this shard, per user: ``pending`` (its first connection is here,
the log has not placed it yet: its sessions wait in LOADING), or present: in
the registry and not pending (the log sends everything for it; no set of its
own, which cost ~50-100 bytes per user). The log sees ``Online`` and
``Offline`` strictly alternating per user.

Liveness is one shard-wide sweep: each frame stamps the session with the
shard's current tick; the sweep advances the tick, pings sessions silent for
3 ticks, closes those silent for 5 (a tick is idle_timeout / 5) and aborts
connections whose closing handshake did not finish within 2 ticks.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import ssl
import time
from typing import Any, Final
from urllib.parse import parse_qs

import cachetools
from multidict import CIMultiDict, CIMultiDictProxy
from picows import (
    WSCloseCode,
    WSListener,
    WSMsgType,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from chatd.auth import TokenChecker
from chatd.bus import LogLink
from chatd.bus.frames import (
    Acked,
    AnyItem,
    Banned,
    Deliver,
    Here,
    Joined,
    Left,
    Refused,
    Revoked,
    Unbanned,
    Welcome,
)
from chatd.config import Config
from chatd.errors import AuthError, FrameError, StoreError
from chatd.fanout import Fanout
from chatd.gate import WSLog, listen
from chatd.handshake import (
    WS_VERSION,
    AddressLimit,
    address_key,
    normalize_origin,
    origin_allowed,
    upgrade_refusal,
)
from chatd.media import preview_url_for
from chatd.protocol import CLOSED, CLOSING, SYNCING, Limits, Session, Verdict
from chatd.registry import STRIPES, Registry
from chatd.store import Store
from chatd.wire import (
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_INVALID_TEXT,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RATE_LIMITED,
    CLOSE_REVOKED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    ERR_BUSY,
    MEDIA_IMAGE,
    Message,
    decode_json,
    decode_msgpack,
    error_frame,
    valid_close_code,
)

log = logging.getLogger("chatd.shard")
#: picows makes a logging.Logger per connection unless given an adapter (~1 KiB
#: each, never freed from its own bookkeeping): one adapter serves them all
_WS_LOG = WSLog(logging.getLogger("chatd.ws"), {})

TEXT: Final = WSMsgType.TEXT
BINARY: Final = WSMsgType.BINARY
CONTINUATION: Final = WSMsgType.CONTINUATION
CLOSE: Final = WSMsgType.CLOSE

PING_AFTER_TICKS: Final = 3
IDLE_AFTER_TICKS: Final = 5
ABORT_CLOSING_AFTER_TICKS: Final = 2
#: live copies held for one connection while its replay runs, past which it is
#: closed as a slow consumer (it syncs again when it comes back): at least this
#: many, more with a bigger slow_consumer_bytes (one per 64 bytes of it)
HELD_MIN: Final = 1_000
#: frames a connection may send before its place in the order is known
WAITING_MAX: Final = 256
#: image urls whose preview url (or its absence) is remembered
PREVIEW_CACHE_SIZE: Final = 10_000
#: Retry-After of a 429 (too many connections from one address): one of them
#: must close first, so a quick retry would only be refused again
RETRY_AFTER_PER_IP_S: Final = 5
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_NO_GROUPS: Final[frozenset[int]] = frozenset()
#: what a connection's upgrade request and response keep as headers once it is up
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())
_monotonic = time.monotonic


def _json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> WSUpgradeResponseWithListener:
    data = json.dumps(body).encode()
    extra = {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})}
    if status < 400:
        response = WSUpgradeResponse.create_ok_response(data, extra)
    else:
        response = WSUpgradeResponse.create_error_response(status, data, extra)
    return WSUpgradeResponseWithListener(response, None)


def mend_upgrade_headers(request: WSUpgradeRequest) -> None:
    """Make an RFC 6455 handshake that picows would refuse acceptable to it.

    RFC 6455 §4.2.1 asks for a ``Connection`` header *containing* the token
    "Upgrade" (case-insensitive) and an ``Upgrade`` header containing
    "websocket"; picows 2.3 accepts only the exact values. Browsers send e.g.
    ``Connection: keep-alive, Upgrade`` (Firefox).
    """
    headers = request.headers
    connection = headers.get("connection")
    if connection is not None and any(
        token.strip().lower() == "upgrade" for token in connection.split(",")
    ):
        headers["Connection"] = "upgrade"
    upgrade = headers.get("upgrade")
    if upgrade is not None and any(
        token.strip().lower() == "websocket" for token in upgrade.split(",")
    ):
        headers["Upgrade"] = "websocket"


def _forget_handshake(transport: Any) -> None:
    """Drop what picows keeps of the upgrade for the connection's whole life.

    The transport holds the request and the response (their header
    multidicts: ~2 KiB of strings, and the token in the request's path) and
    never reads them again once the connection is up; neither does chatd.
    """
    request = transport.request
    if request is not None:
        request.headers = _NO_HEADERS
        request.path = b""
        request.method = b"GET"
        request.version = b"HTTP/1.1"
    response = transport.response
    if response is not None:
        response.headers = _NO_HEADERS


class Conn(WSListener):
    """The picows glue of one connection: feeds its session, writes its output."""

    __slots__ = ("shard", "sess", "tr", "version", "since", "closed_tick", "writable", "addr",
                 "utf8")

    def __init__(self, shard: Shard, uid: int, version: int, resume: int,
                 addr: str = "") -> None:
        self.shard = shard
        # no ``now``: the bucket starts full whatever its stamp (one float less)
        self.sess = Session(uid, shard.limits, resume=resume, conn=self)
        #: the token version it connected with (a revocation past it closes it)
        self.version = version
        self.since = shard.wall_second()
        self.tr: Any = None
        self.closed_tick = 0
        #: set while a replay waits for the client to read (pause_writing)
        self.writable: asyncio.Future[None] | None = None
        #: the peer's address as the shard's AddressLimit counts it (once up: the
        #: limit's own string for it, "" when the limit is off)
        self.addr = addr
        #: the UTF-8 check of a fragmented text message, while it comes in
        self.utf8: codecs.IncrementalDecoder | None = None

    # --- lifecycle ------------------------------------------------------------

    def on_ws_connected(self, transport: Any) -> None:
        self.tr = transport
        _forget_handshake(transport)
        transport.underlying_transport.set_write_buffer_limits(
            high=self.shard.cfg.slow_consumer_bytes
        )
        # counted from the upgrade (the router's check and this run in the
        # same callback: handshakes arriving together cannot pass it together)
        self.addr = self.shard.addresses.opened(self.addr)
        self.sess.tick = self.shard.tick
        self.shard.connected(self.sess)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.shard.addresses.closed(self.addr)
        self.shard.disconnected(self.sess)
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        # the session keeps its glue (an answer from the log may still come
        # for it); the glue lets go of the session: without that cycle a
        # closed connection (13 objects: the session, picows' and uvloop's
        # transports, ...) is freed at once, not left for a full collection
        del self.sess

    def pause_writing(self) -> None:
        if self.sess.state is SYNCING:
            # a replay waits for the client to read; live traffic does not
            if self.writable is None or self.writable.done():
                self.writable = asyncio.get_running_loop().create_future()
            return
        self.shard.close(self.sess, CLOSE_SLOW_CONSUMER, "slow consumer")

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # --- frames in ------------------------------------------------------------------

    def on_bad_frame(self, code: int, reason: str) -> None:
        """The gate found a frame that picows would fail the connection for
        (1002: it breaks the framing or is a bad close frame; 1007: a close
        reason not in UTF-8; 1009: over ``max_frame_bytes``) before picows
        parsed it: the connection is closed as chatd closes any, the answers
        to the frames before it first (``Shard.close``)."""
        self.shard.close(self.sess, code, reason)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        sess = self.sess
        state = sess.state
        if state is CLOSING or state is CLOSED:
            # we started closing: nothing the peer says now is acted on; its
            # close frame completes the handshake
            if frame.msg_type is CLOSE and sess.close_pending is None:
                transport.disconnect()
            return
        shard = self.shard
        if transport.is_close_frame_sent:
            # picows failed the connection (an exception in a callback: the
            # gate keeps every protocol error from it) and sent its close first
            sent = transport.close_handshake.sent
            shard.close(sess, int(sent.code), sent.reason or "")
            return
        sess.tick = shard.tick
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            shard.close(sess, CLOSE_PROTOCOL_ERROR, "reserved bits set, no extension agreed")
            return
        kind = frame.msg_type
        if kind is TEXT or kind is BINARY:
            if sess.frag is not None:
                shard.close(sess, CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                return
            binary = kind is BINARY
            if not frame.fin:
                self._fragment(frame, True, binary)
                return
            size = frame.payload_size
            if binary:
                data: bytes | memoryview | str = frame.get_payload_as_memoryview()
            else:
                try:
                    data = frame.get_payload_as_utf8_text()
                except UnicodeDecodeError:
                    shard.close(sess, CLOSE_INVALID_TEXT, "invalid UTF-8 in a text message")
                    return
        elif kind is CONTINUATION:
            binary = sess.frag_binary
            whole = self._fragment(frame, False, binary)
            if whole is None:
                return
            data = whole
            size = len(whole)
        elif kind is CLOSE:
            code = int(frame.get_close_code())
            if frame.payload_size and not valid_close_code(code):
                shard.close(sess, CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
                return
            sess.close(1000, "")
            transport.send_close(code if frame.payload_size else WSCloseCode.OK)
            transport.disconnect()
            return
        else:
            return  # ping (picows answers it) or pong: only liveness matters
        if not sess.allow(_monotonic()):
            shard.close(sess, CLOSE_RATE_LIMITED, "rate limited")
            return
        shard.frames_in += 1
        shard.bytes_in += size
        self.on_message(data, binary)

    def on_message(self, data: bytes | memoryview | str, binary: bool) -> None:
        """One whole message (text: its UTF-8 checked already): a chat frame."""
        sess = self.sess
        shard = self.shard
        sess.binary = binary
        try:
            msg = decode_msgpack(data) if binary else decode_json(data)  # type: ignore[arg-type]
        except FrameError as exc:
            sess.send(error_frame(exc))
        else:
            shard.handle(sess, msg)
        shard.flush(sess)

    def _fragment(self, frame: Any, first: bool, binary: bool) -> bytes | None:
        """Feed a fragment to the session; the whole message after the last.

        A text message's UTF-8 is checked fragment by fragment, so that an
        invalid one fails the connection when it comes, not at the end.
        """
        payload = frame.get_payload_as_bytes()
        fin = bool(frame.fin)
        try:
            whole = self.sess.fragment(payload, fin, first, binary)
        except FrameError:
            self.shard.close(self.sess, CLOSE_TOO_BIG, "message too big")
            return None
        except ValueError as exc:
            self.shard.close(self.sess, CLOSE_PROTOCOL_ERROR, str(exc))
            return None
        if not binary:
            utf8 = self.utf8
            if first or utf8 is None:
                utf8 = self.utf8 = _utf8_decoder()
            try:
                utf8.decode(payload, fin)
            except UnicodeDecodeError:
                self.utf8 = None
                self.shard.close(self.sess, CLOSE_INVALID_TEXT, "invalid UTF-8 in a text message")
                return None
            if fin:
                self.utf8 = None
        return whole

    # --- frames out -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write already framed websocket frames."""
        self.tr.underlying_transport.write(data)

    def send_close(self, code: int, reason: str) -> None:
        """The closing handshake's first half: the close frame, then a FIN.

        Reading goes on (and discards), so unread client frames never turn the
        close into a reset that would discard what the client has not read.
        """
        tr = self.tr
        if tr.is_disconnected:
            return
        self.closed_tick = self.shard.tick
        if not tr.is_close_frame_sent:  # picows may have sent one (a protocol error)
            tr.send_close(code, reason.encode())
        underlying = tr.underlying_transport
        if underlying.can_write_eof():
            underlying.write_eof()
        else:
            tr.disconnect()


class EchoConn(Conn):
    """A connection to ``echo_path`` (a test aid, off by default): the frame
    handling of ``Conn`` (reassembly, size cap, UTF-8, reserved bits, close
    codes, rate limit, closing handshake), but each whole message is answered
    with itself instead of being read as a chat ``Message``.

    It has no user: it is not in the registry, the log never hears of it, the
    sweep does not ping or close it and a drain does not close it. It is
    counted per address. A client that does not read pauses its reading
    (backpressure) instead of being dropped as a slow consumer.
    """

    __slots__ = ()

    def __init__(self, shard: Shard, addr: str) -> None:
        super().__init__(shard, 0, 0, -1, addr)

    def on_ws_connected(self, transport: Any) -> None:
        self.tr = transport
        transport.underlying_transport.set_write_buffer_limits(
            high=self.shard.cfg.slow_consumer_bytes
        )
        self.addr = self.shard.addresses.opened(self.addr)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.shard.addresses.closed(self.addr)
        self.sess.disconnected()
        del self.sess  # see Conn.on_ws_disconnected

    def pause_writing(self) -> None:
        self.tr.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        self.tr.underlying_transport.resume_reading()

    def on_message(self, data: bytes | memoryview | str, binary: bool) -> None:
        payload = data.encode() if isinstance(data, str) else data
        self.tr.send(BINARY if binary else TEXT, payload)


class Shard:
    """One process's websocket server, its sessions and its end of the log."""

    def __init__(self, cfg: Config, reader: Store, checker: TokenChecker, index: int = 0) -> None:
        self.cfg = cfg
        self.index = index
        #: read-only use: sync pages (the log is the only writer)
        self.reader = reader
        self.checker = checker
        self.link: LogLink | None = None
        self.registry = Registry(cfg.max_conns)
        self.fanout = Fanout(self.registry)
        self.limits = Limits(
            max_frame_bytes=cfg.max_frame_bytes,
            rate_per_s=cfg.rate_per_s if cfg.rate_limit else 0.0,
            rate_burst=cfg.rate_burst,
            held_max=max(HELD_MIN, cfg.slow_consumer_bytes // 64),
            waiting_max=WAITING_MAX,
        )
        self.media_dir = cfg.data_path / "media"
        self.origins = frozenset(
            o if o == "*" else normalize_origin(o) for o in cfg.allowed_origins
        )
        #: upgraded connections per peer address (max_conns_per_ip)
        self.addresses = AddressLimit(cfg.max_conns_per_ip)
        self.echo_path = cfg.echo_path.encode()
        self._previews: cachetools.LRUCache[str, str] = cachetools.LRUCache(PREVIEW_CACHE_SIZE)
        #: the highest id the log has routed (from its last batch to us)
        self.hw = 0
        #: users whose first connection waits for the log's Here (a registered
        #: user not in it is present: the log routes it here)
        self.pending: set[int] = set()
        #: our submissions without an answer: seq -> (session, message)
        self._inflight: dict[int, tuple[Session, Message]] = {}
        self._seq = 0
        self._touched: list[Session] = []
        self.tick = 1
        self._second = 0
        self._second_f = 0.0
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._direct: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._answered: asyncio.Event | None = None
        # figures
        self.frames_in = 0
        #: message payload bytes read, frame bytes written
        self.bytes_in = 0
        self.bytes_out = 0
        #: websocket data frames written (acks, copies, replays, errors)
        self.frames_out = 0
        #: batches and items the log sent here (targeted routing shows in them)
        self.batches_in = 0
        self.items_in = 0
        self.closes: dict[int, int] = {}
        self.auth_failures = 0

    def wall_second(self) -> float:
        """The wall clock to the second: a connection's ``since`` (those of one
        second share one float instead of 24 bytes each)."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._second_f = float(now)
        return self._second_f

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task that is kept alive and whose errors are logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    async def start(self, link: LogLink, sock: Any = None, port: int | None = None,
                    tls: ssl.SSLContext | None = None) -> None:
        """Listen on the chat port (SO_REUSEPORT) with ``link`` to the node's log
        (``tls``: wss://)."""
        cfg = self.cfg
        self.link = link
        self._tls = tls
        kwargs: dict[str, Any] = (
            {"sock": sock}
            if sock is not None
            else {
                "host": cfg.host,
                "port": cfg.chat_port if port is None else port,
                "reuse_port": True,
            }
        )
        self._server = await self._listen(**kwargs)
        self.port = self._server.sockets[0].getsockname()[1]
        if cfg.shard_base_port:
            # this shard alone, for diagnostics and placement (no SO_REUSEPORT)
            self._direct = await self._listen(host=cfg.host, port=cfg.shard_base_port + self.index)
        self.spawn(self._sweep())

    async def _listen(self, **where: Any) -> asyncio.Server:
        cfg = self.cfg
        return await listen(
            self.route,
            max_frame_bytes=cfg.max_frame_bytes,
            handshake_timeout_s=cfg.handshake_timeout_s,
            max_head_bytes=cfg.max_handshake_bytes,
            logger=_WS_LOG,
            tls=self._tls,
            **where,
        )

    def preview_of(self, url: str) -> str:
        """The preview url of an uploaded image ``url`` ("" if none).

        Uploads are content-addressed and written before their url is known,
        so the answer for a url never changes: it is cached, and the file
        system is asked once per url, not once per message.
        """
        pic = self._previews.get(url)
        if pic is None:
            pic = preview_url_for(url, self.media_dir) or ""
            self._previews[url] = pic
        return pic

    # --- handshake ------------------------------------------------------------------

    def route(self, request: WSUpgradeRequest, peer: str = "") -> Any:
        """The router of the HTTP handshake (picows' listener factory, called
        by the gate with the ``peer``'s address)."""
        path, _, query = request.path.partition(b"?")
        if path == b"/chat":
            return self._chat(request, query, peer)
        if path == b"/healthz":
            ready = self.link is not None and self.link.up
            status = "draining" if self.draining else "ok" if ready else "unavailable"
            return _json_response(
                200 if status == "ok" else 503,
                {"status": status, "connections": self.registry.count},
            )
        if path == self.echo_path and path:
            return self._echo(request, peer)
        return _json_response(404, {"error": "not found"})

    def _refusal(self, request: WSUpgradeRequest, addr: str) -> Any:
        """The answer to a request that is no websocket upgrade, or from an
        address that holds its share already; None if neither."""
        refusal = upgrade_refusal(request.headers)
        if refusal is not None:
            status, reason = refusal
            extra = {"Sec-WebSocket-Version": WS_VERSION} if status == 426 else None
            return _json_response(status, {"error": reason}, extra)
        if not self.addresses.allows(addr):
            log.debug("handshake refused: %s holds %d connections", addr,
                      self.addresses.count(addr))
            return _json_response(
                429, {"error": "too many connections from this address"},
                {"Retry-After": str(RETRY_AFTER_PER_IP_S)},
            )
        return None

    def _echo(self, request: WSUpgradeRequest, peer: str) -> Any:
        addr = address_key(peer)
        refused = self._refusal(request, addr)
        if refused is not None:
            return refused
        if self.draining:
            return _json_response(503, {"error": "server is shutting down"}, {"Retry-After": "1"})
        mend_upgrade_headers(request)
        return EchoConn(self, addr)

    def _chat(self, request: WSUpgradeRequest, query: bytes, peer: str = "") -> Any:
        addr = address_key(peer)
        refused = self._refusal(request, addr)
        if refused is not None:
            return refused
        headers = request.headers
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(
            origin, headers.get("host"), self.origins, self.cfg.api_port
        ):
            log.debug("handshake refused: origin %s not allowed", origin)
            return _json_response(403, {"error": "origin not allowed"})
        try:
            params = parse_qs(query.decode("latin-1"))
            uid = int(params["id"][0])
            token = params["token"][0]
        except (KeyError, ValueError, IndexError):
            self.auth_failures += 1
            return _json_response(401, {"error": "id and token are required"})
        resume = -1
        if "last" in params:
            try:
                resume = int(params["last"][0])
            except ValueError:
                resume = -1
            if not 0 <= resume < 1 << 63:
                return _json_response(400, {"error": "last must be a message id (>= 0)"})
        try:
            _, version = self.checker.verify(token, uid)
        except (AuthError, ValueError) as exc:
            self.auth_failures += 1
            log.debug("handshake refused for user %s: %s", uid, exc)
            return _json_response(401, {"error": str(exc)})
        if uid in self.checker.banned:
            return _json_response(403, {"error": "banned"})
        if self.draining:
            return _json_response(503, {"error": "server is shutting down"}, {"Retry-After": "1"})
        if self.registry.full:
            return _json_response(503, {"error": "shard is full"}, {"Retry-After": "1"})
        mend_upgrade_headers(request)
        return Conn(self, uid, version, resume, addr)

    # --- sessions: connect, frames, disconnect ---------------------------------------

    def connected(self, sess: Session) -> None:
        """A new connection is upgraded: find its place in the node's order."""
        uid = sess.uid
        registry = self.registry
        # counted from the upgrade on, so that handshakes arriving together
        # cannot pass the cap together
        registry.reserve()
        others = registry.get(uid)
        registry.add(sess)
        if uid in self.pending:
            return  # its Here places every session of the user
        if others:
            # present: the log routes this user here already: the stream takes
            # over at our high-water, the store has everything up to it
            self._place(sess, others[0].groups, self.hw)
        else:
            self.pending.add(uid)
            if self.link is not None:
                self.link.online(uid)

    def _place(self, sess: Session, groups: frozenset[int], bound: int) -> None:
        """Give ``sess`` its groups and bound (``Session.on_here``) and act on it."""
        old = sess.groups
        waiting, replay = sess.on_here(groups, bound)
        registry = self.registry
        for gid in old - groups:
            registry.leave(sess, gid)
        for gid in groups - old:
            registry.join(sess, gid)
        if replay:
            self.spawn(self._replay(sess))
        for msg in waiting:
            self.handle(sess, msg)
        self.flush(sess)

    def handle(self, sess: Session, msg: Message) -> None:
        """Act on one valid client frame."""
        verdict = sess.accept(msg, self.hw)
        if verdict is Verdict.SUBMIT:
            if msg.media == MEDIA_IMAGE and not msg.pic:
                # recipients download the small preview first, not the original
                msg.pic = self.preview_of(msg.url)
            link = self.link
            self._seq += 1
            seq = self._seq
            if self.draining or link is None or not link.submit(seq, msg):
                sess.refuse(ERR_BUSY, "server busy, retry later", msg.cid)
                return
            self._inflight[seq] = (sess, msg)
            sess.submitted()
        elif verdict is Verdict.REPLAY:
            self.spawn(self._replay(sess))
        elif verdict is Verdict.ENTER:
            self.registry.join(sess, msg.dstid)
        elif verdict is Verdict.LEAVE:
            self.registry.leave(sess, msg.dstid)

    def disconnected(self, sess: Session) -> None:
        uid = sess.uid
        sess.disconnected()
        registry = self.registry
        known = registry.remove(sess)
        registry.release()
        link = self.link
        if known and link is not None and registry.get(uid) is None and uid not in self.pending:
            link.offline(uid)  # the last connection of a present user
        # a pending user with nobody left: Offline follows its Here (on_here)

    def close(self, sess: Session, code: int, reason: str) -> None:
        """Start the closing handshake of ``sess`` (see ``Session.close``)."""
        if sess.state is CLOSING or sess.state is CLOSED:
            return
        self.closes[code] = self.closes.get(code, 0) + 1
        sess.conn.closed_tick = self.tick
        sess.close(code, reason)
        self.flush(sess)

    def flush(self, sess: Session) -> None:
        """Write what ``sess`` collected; then its close frame, if that is due."""
        conn = sess.conn
        frames = sess.out
        data = sess.take_out()
        if data is not None and not conn.tr.is_disconnected:
            assert frames is not None
            self.frames_out += len(frames)
            self.bytes_out += len(data)
            conn.write(data)
        if sess.close_frame is not None:
            code, reason = sess.close_frame
            sess.close_frame = None
            conn.send_close(code, reason)

    async def _replay(self, sess: Session) -> None:
        """Read the pages of ``sess``'s replay from the store until it is done."""
        page_size = self.cfg.sync_page
        conn = sess.conn
        while sess.state is SYNCING:
            after, before = sess.replay_window()
            try:
                page = await self.reader.sync_page(sess.uid, after, before, page_size)
            except StoreError as exc:
                log.error("sync for user %d failed: %s", sess.uid, exc)
                sess.replay_failed()
                self.flush(sess)
                return
            more = sess.on_page(page, page_size)
            self.flush(sess)
            if conn.writable is not None and not conn.writable.done():
                # the transport paused us (pause_writing): let the client read,
                # also before going live (a paused transport would not pause
                # again, and a slow consumer would go unnoticed)
                await conn.writable
            if not more:
                return

    # --- the log's side -------------------------------------------------------------

    def on_welcome(self, welcome: Welcome) -> None:
        """The link to the log is (again) up: ask it to place every user we hold."""
        self.hw = max(self.hw, welcome.hw)
        checker = self.checker
        for uid, version in welcome.versions.items():
            checker.revoke(uid, version)
        checker.banned = set(welcome.banned)
        # sessions whose token was voided or whose user was banned meanwhile
        for sess in list(self.registry):
            if sess.uid in checker.banned:
                self.close(sess, CLOSE_BANNED, "banned")
            elif sess.conn.version < checker.versions.get(sess.uid, 0):
                self.close(sess, CLOSE_REVOKED, "token revoked")
        link = self.link
        assert link is not None
        users = {sess.uid for sess in self.registry} | self.pending
        self.pending = set()
        for uid in users:
            if self.registry.get(uid) is not None:
                self.pending.add(uid)
                link.online(uid)

    def on_lost(self) -> None:
        """The link to the log broke: what it did not answer may or may not be
        stored; the senders retry (same cid: stored once, acked again)."""
        inflight, self._inflight = self._inflight, {}
        for sess, msg in inflight.values():
            sess.on_refused(ERR_BUSY, "server busy, retry", msg.cid)
            self.flush(sess)
        self._notify_answered()

    def on_batch(self, items: list[AnyItem], hw: int) -> None:
        """Items from the log, in the node's order: ack, deliver, place, change."""
        self.batches_in += 1
        self.items_in += len(items)
        touched = self._touched
        slow: list[Session] = []
        inflight = self._inflight
        fanout = self.fanout
        for item in items:
            kind = type(item)
            if kind is Deliver:
                fanout.deliver(item.msg, None, touched, slow)  # type: ignore[union-attr]
            elif isinstance(item, Acked):
                entry = inflight.pop(item.seq, None)
                if entry is None:
                    continue
                sess, msg = entry
                msg.id = item.id
                msg.ts = item.ts
                if not sess.on_acked(item.id, item.ts, msg.cid, item.stored):
                    slow.append(sess)
                touched.append(sess)
                if item.stored:
                    fanout.deliver(msg, sess, touched, slow)
            elif isinstance(item, Refused):
                refused = inflight.pop(item.seq, None)
                if refused is not None:
                    sess, msg = refused
                    sess.on_refused(item.code, item.reason, msg.cid)
                    touched.append(sess)
            else:
                self._apply(item)
        self.hw = max(self.hw, hw)
        self._touched = []
        for sess in touched:
            self.flush(sess)
        for sess in slow:
            self.close(sess, CLOSE_SLOW_CONSUMER, "slow consumer")
        if self._answered is not None and not inflight:
            self._notify_answered()

    def _apply(self, item: AnyItem) -> None:
        """A placement or a routing change, at its place in the order."""
        if isinstance(item, Here):
            self._on_here(item)
            return
        if isinstance(item, Acked | Refused | Deliver):
            return  # handled by on_batch
        sessions = list(self.registry.get(item.uid) or ())
        if isinstance(item, Joined):
            for sess in sessions:
                sess.joined(item.gid)
                self.registry.join(sess, item.gid)
        elif isinstance(item, Left):
            for sess in sessions:
                sess.left(item.gid)
                self.registry.leave(sess, item.gid)
        elif isinstance(item, Revoked):
            self.checker.revoke(item.uid, item.version)
            for sess in sessions:
                if sess.conn.version < item.version:
                    self.close(sess, CLOSE_REVOKED, "token revoked")
        elif isinstance(item, Banned):
            self.checker.banned.add(item.uid)
            for sess in sessions:
                self.close(sess, CLOSE_BANNED, "banned")
        elif isinstance(item, Unbanned):
            self.checker.banned.discard(item.uid)

    def _on_here(self, here: Here) -> None:
        uid = here.uid
        self.pending.discard(uid)
        sessions = self.registry.get(uid)
        if not sessions:
            # everyone left while the log placed the user: tell it so now
            if self.link is not None:
                self.link.offline(uid)
            return
        # users in no group share one empty set (216 bytes each otherwise)
        groups = frozenset(here.groups) if here.groups else _NO_GROUPS
        for sess in list(sessions):
            self._place(sess, groups, here.hw)

    # --- liveness -------------------------------------------------------------------

    async def _sweep(self) -> None:
        period = self.cfg.idle_timeout_s / IDLE_AFTER_TICKS
        registry = self.registry
        while True:
            await asyncio.sleep(period)
            self.tick += 1
            tick = self.tick
            for index in range(STRIPES):
                for sess in registry.stripe(index):
                    state = sess.state
                    conn = sess.conn
                    if state is CLOSING:
                        if tick - conn.closed_tick >= ABORT_CLOSING_AFTER_TICKS:
                            conn.tr.disconnect(False)
                        continue
                    silent = tick - sess.tick
                    if silent >= IDLE_AFTER_TICKS:
                        self.close(sess, CLOSE_IDLE, "idle timeout")
                    elif silent >= PING_AFTER_TICKS:
                        conn.tr.send_ping()
                if index % 8 == 7:
                    await asyncio.sleep(0)  # let traffic through on a big shard

    # --- shutdown -------------------------------------------------------------------

    def _notify_answered(self) -> None:
        if self._answered is not None:
            self._answered.set()

    async def _all_answered(self) -> None:
        while self._inflight and self.link is not None and self.link.up:
            self._answered = asyncio.Event()
            await self._answered.wait()

    async def drain(self, timeout_s: float, code: int = CLOSE_GOING_AWAY,
                    reason: str = "server going away") -> None:
        """Stop accepting, wait for the log's answers, close every client with ``code``.

        Bounded by ``timeout_s``: connections still open then are aborted.
        """
        self.draining = True
        for server in (self._server, self._direct):
            if server is not None:
                server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await asyncio.wait_for(self._all_answered(), timeout_s * 0.8)
        except TimeoutError:
            log.error("drain: %d messages were not answered in time", len(self._inflight))
        sessions = list(self.registry)
        for sess in sessions:
            self.close(sess, code, reason)
        waits = [s.conn.tr.wait_disconnected() for s in sessions]
        remaining = max(0.1, deadline - loop.time())
        if waits:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=remaining
            )
            for sess in sessions:
                if not sess.conn.tr.is_disconnected:
                    sess.conn.tr.disconnect(False)
            for fut in pending:
                fut.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def answer(self, what: str, args: list[Any]) -> Any:
        """An admin question from the supervisor (``chatd.admin``)."""
        if what == "online":
            return [
                {
                    "state": sess.state.value,
                    "since": round(sess.conn.since, 3),
                    "encoding": "msgpack" if sess.binary else "json",
                }
                for sess in self.registry.get(int(args[0])) or ()
            ]
        if what == "kick":
            uid, code = int(args[0]), int(args[1])
            sessions = [s for s in self.registry.get(uid) or () if s.state is not CLOSING]
            for sess in sessions:
                self.close(sess, code, "closed by an operator")
            return len(sessions)
        if what == "figures":
            return self.figures()
        return None

    def figures(self) -> dict[str, Any]:
        """What the shard reports (status, metrics)."""
        return {
            "connections": self.registry.count,
            "users": self.registry.users,
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "batches_in": self.batches_in,
            "items_in": self.items_in,
            "deliveries": self.fanout.delivered,
            "closes": dict(self.closes),
            "auth_failures": self.auth_failures,
            "inflight": len(self._inflight),
            "hw": self.hw,
            "log_up": bool(self.link is not None and self.link.up),
        }
