"""A shard: the picows websocket server of one process, and its connections.

The listener factory (``Shard.route``) is the router of the handshake:
``/chat`` authenticates the token and returns a ``Conn``; ``/healthz`` answers a
small 200; anything else 404. It also mends what picows refuses although
RFC 6455 allows it (``Connection: keep-alive, Upgrade``, as Firefox sends it).

``Conn.on_ws_frame`` decodes and validates each frame at once (a frame is only
valid inside the callback), then: heartbeats and enter/leave act on the spot;
cmd 10/11 go to the store's group-commit queue (the router delivers them after
the commit); cmd 4 starts a replay from the store. Nothing on this path awaits
per recipient.

Liveness is one shard-wide sweep: each frame stamps the connection with the
shard's current tick; the sweep advances the tick, pings connections silent
for 3 ticks and closes those silent for 5 (a tick is idle_timeout / 5).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from typing import Any, Final
from urllib.parse import parse_qs

import cachetools
from picows import (
    WSCloseCode,
    WSListener,
    WSMsgType,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from chatd.auth import TokenChecker
from chatd.config import Config
from chatd.control import Event, GroupJoined, GroupLeft, TokensRevoked, UserBanned
from chatd.errors import AuthError, FrameError
from chatd.handshake import normalize_origin, origin_allowed
from chatd.media import preview_url_for
from chatd.registry import STRIPES, Registry
from chatd.router import CLOSING, LIVE, SYNCING, Router
from chatd.session import RateLimiter, add_fragment
from chatd.store import Store
from chatd.wire import (
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_RATE_LIMITED,
    CLOSE_REVOKED,
    CLOSE_SERVER_ERROR,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    CMD_ACK,
    CMD_GROUP,
    CMD_GROUP_ENTER,
    CMD_GROUP_LEAVE,
    CMD_PRIVATE,
    CMD_SYNC,
    ERR_BUSY,
    ERR_CONFLICT,
    ERR_FORBIDDEN,
    ERR_SERVER,
    MEDIA_IMAGE,
    Message,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
    error_frame,
)

log = logging.getLogger("chatd.shard")
#: picows makes a logging.Logger per connection unless given an adapter (~1 KiB
#: each, never freed from its own bookkeeping): one adapter serves them all
_WS_LOG = logging.LoggerAdapter(logging.getLogger("chatd.ws"), {})

TEXT: Final = WSMsgType.TEXT
BINARY: Final = WSMsgType.BINARY
CONTINUATION: Final = WSMsgType.CONTINUATION
CLOSE: Final = WSMsgType.CLOSE

PING_AFTER_TICKS: Final = 3
IDLE_AFTER_TICKS: Final = 5
ABORT_CLOSING_AFTER_TICKS: Final = 2
#: most users whose groups one store query loads
GROUP_LOAD_BATCH: Final = 500
#: live copies held for one connection while its replay runs, past which it is
#: closed as a slow consumer (it syncs again when it comes back): at least this
#: many, more with a bigger slow_consumer_bytes (one per 64 bytes of it)
HELD_MIN: Final = 1_000
#: image urls whose preview url (or its absence) is remembered
PREVIEW_CACHE_SIZE: Final = 10_000
_NO_GROUPS: Final[frozenset[int]] = frozenset()
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


class Conn(WSListener):
    """One websocket connection of an authenticated user."""

    __slots__ = (
        "shard",
        "uid",
        "tr",
        "binary",
        "state",
        "groups",
        "tick",
        "tokens",
        "stamp",
        "frag",
        "frag_binary",
        "held",
        "waiting",
        "live_from",
        "top",
        "resume",
        "closed_tick",
        "writable",
        "inflight",
        "close_pending",
    )

    def __init__(self, shard: Shard, uid: int, resume: int = -1) -> None:
        self.shard = shard
        self.uid = uid
        #: ``last`` from the handshake: replay from there before anything live
        self.resume = resume
        self.tr: Any = None
        self.binary = False
        self.state = LIVE
        self.groups: frozenset[int] = _NO_GROUPS
        self.tick = shard.tick
        self.tokens = 0.0
        self.stamp = 0.0
        self.frag: bytearray | None = None
        self.frag_binary = False
        self.held: list[Message] | None = None
        self.waiting: list[Message] | None = None
        self.live_from = 0
        self.top = 0
        self.closed_tick = 0
        self.writable: asyncio.Future[None] | None = None
        #: messages submitted to the store whose outcome has not come back
        self.inflight = 0
        #: (code, reason) of a close that waits for those outcomes to be written
        self.close_pending: tuple[int, str] | None = None

    # --- lifecycle ----------------------------------------------------------------

    def on_ws_connected(self, transport: Any) -> None:
        shard = self.shard
        self.tr = transport
        transport.underlying_transport.set_write_buffer_limits(high=shard.cfg.slow_consumer_bytes)
        if shard.limiter is not None:
            shard.limiter.start(self, _monotonic())
        shard.registry.reserve()
        # another device of the user on this shard already knows the groups
        devices = shard.registry.get(self.uid)
        if devices:
            self._register(devices[0].groups)
        else:
            # frames that arrive before the groups are known wait for them
            self.waiting = []
            shard.load_groups(self)

    def on_groups(self, groups: frozenset[int]) -> None:
        """The user's groups are known: register, then act on waiting frames.

        Called again for a registered connection when a join or leave came
        while its first set was loading (that set may predate the change).
        """
        if self.state == CLOSING:
            return
        if self.waiting is None:
            registry = self.shard.registry
            for gid in self.groups - groups:
                registry.leave(self, gid)
            for gid in groups - self.groups:
                registry.join(self, gid)
            self.groups = groups
            self.live_from = -1  # messages of a new group may have gone by
            return
        self._register(groups)
        waiting, self.waiting = self.waiting, None
        for msg in waiting or ():
            self.handle(msg)

    def _register(self, groups: frozenset[int]) -> None:
        self.groups = groups
        if self.resume >= 0:
            # in the same step as registering: no live copy can come first
            self.state = SYNCING
            self.held = []
            self.shard.spawn(self._sync(self.resume))
            self.resume = -1
        registry = self.shard.registry
        registry.add(self)
        for gid in groups:
            registry.join(self, gid)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.state = CLOSING
        shard = self.shard
        shard.loading.discard(self)
        shard._reload_groups.discard(self)
        shard.registry.remove(self)
        shard.registry.release()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (RFC 6455 §7.1.1) with ``code``.

        Nothing more is read or delivered live. The answers to messages the
        store already accepted from this connection still go out first (a
        flooding client gets the acks of what was stored, then its 4008);
        then the close frame, then a TCP half-close, so that the peer reads
        everything before it sees the end. The socket closes when the peer
        answers (or goes), or the sweep aborts it two ticks later.
        """
        if self.state == CLOSING:
            return
        self.state = CLOSING
        self.closed_tick = self.shard.tick
        if self.inflight:
            self.close_pending = (code, reason)
        else:
            self._send_close(code, reason)

    def on_outcome(self) -> None:
        """The store answered one of this connection's messages (router)."""
        self.inflight -= 1
        if not self.inflight and self.close_pending is not None:
            code, reason = self.close_pending
            self.close_pending = None
            self._send_close(code, reason)

    def _send_close(self, code: int, reason: str) -> None:
        tr = self.tr
        if tr.is_disconnected:
            return
        tr.send_close(code, reason.encode())
        underlying = tr.underlying_transport
        if underlying.can_write_eof():
            # a FIN after the queued bytes; reading goes on (and discards), so
            # unread client frames never turn the close into a reset
            underlying.write_eof()
        else:
            tr.disconnect()

    def hold(self, msg: Message) -> None:
        """Keep a live copy (or an ack) for after the running replay; a client
        that lets too much pile up is a slow consumer."""
        held = self.held
        if held is None:
            return
        if len(held) >= self.shard.held_max:
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            return
        held.append(msg)

    def pause_writing(self) -> None:
        if self.state == SYNCING:
            # a replay waits for the client to read; live traffic does not
            if self.writable is None or self.writable.done():
                self.writable = asyncio.get_running_loop().create_future()
            return
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # --- frames in ------------------------------------------------------------------

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if self.state == CLOSING:
            # we started closing: nothing the peer says now is acted on; its
            # close frame completes the handshake
            if frame.msg_type is CLOSE and self.close_pending is None:
                transport.disconnect()
            return
        shard = self.shard
        self.tick = shard.tick
        kind = frame.msg_type
        if kind is TEXT or kind is BINARY:
            binary = kind is BINARY
            if not frame.fin:
                self._fragment(frame, True, binary)
                return
            data = frame.get_payload_as_memoryview()
        elif kind is CONTINUATION:
            data = self._fragment(frame, False, self.frag_binary)
            if data is None:
                return
            binary = self.frag_binary
        elif kind is CLOSE:
            self.state = CLOSING
            self.closed_tick = shard.tick
            code = frame.get_close_code()
            transport.send_close(code if code != WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()
            return
        else:
            return  # ping (picows answers it) or pong: only liveness matters
        limiter = shard.limiter
        if limiter is not None and not limiter.allow(self, _monotonic()):
            self.close(CLOSE_RATE_LIMITED, "rate limited")
            return
        self.binary = binary
        try:
            msg = decode_msgpack(data) if binary else decode_json(data)
        except FrameError as exc:
            self.send_msg(error_frame(exc))
            return
        if self.waiting is not None:
            self.waiting.append(msg)
        else:
            self.handle(msg)

    def _fragment(self, frame: Any, first: bool, binary: bool) -> bytes | None:
        if first:
            self.frag_binary = binary
        try:
            return add_fragment(
                self, frame.get_payload_as_bytes(), frame.fin, first, self.shard.cfg.max_frame_bytes
            )
        except FrameError:
            self.close(CLOSE_TOO_BIG, "message too big")
        except ValueError as exc:
            self.close(CLOSE_PROTOCOL_ERROR, str(exc))
        return None

    def handle(self, msg: Message) -> None:
        """Act on one valid client frame."""
        cmd = msg.cmd
        if cmd in (CMD_PRIVATE, CMD_GROUP):
            if cmd == CMD_GROUP and msg.dstid not in self.groups:
                self.send_error(ERR_FORBIDDEN, f"not a member of group {msg.dstid}", msg.cid)
                return
            msg.userid = self.uid  # never trust the client's userid
            msg.id = msg.ts = 0
            shard = self.shard
            if msg.media == MEDIA_IMAGE and not msg.pic:
                # recipients download the small preview first, not the original
                msg.pic = shard.preview_of(msg.url)
            if shard.draining or not shard.store.submit(msg, self):
                self.send_error(ERR_BUSY, "server busy, retry later", msg.cid)
            else:
                self.inflight += 1
        elif cmd == CMD_SYNC:
            if self.state == SYNCING:
                self.send_error(ERR_CONFLICT, "a sync is already running", msg.cid)
            else:
                self.state = SYNCING
                self.held = []
                self.shard.spawn(self._sync(msg.id))
        elif cmd == CMD_GROUP_ENTER:
            if msg.dstid not in self.groups:
                self.send_error(ERR_FORBIDDEN, f"not a member of group {msg.dstid}", msg.cid)
            else:
                self.shard.registry.join(self, msg.dstid)
        elif cmd == CMD_GROUP_LEAVE:
            self.shard.registry.leave(self, msg.dstid)
            # group messages now skip this connection: a replay must not assume
            # that everything from live_from on went out live
            self.live_from = -1
        # CMD_HEARTBEAT: receiving it was the point

    # --- frames out -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write already framed websocket frames (see ``router.ws_frame``)."""
        self.tr.underlying_transport.write(data)

    def send_msg(self, msg: Message) -> None:
        if self.binary:
            self.tr.send(BINARY, encode_msgpack(msg))
        else:
            self.tr.send(TEXT, encode_json(msg))

    def send_error(self, code: int, reason: str, cid: str = "") -> None:
        self.send_msg(error_frame(FrameError(code, reason, cid)))

    async def _sync(self, after: int) -> None:
        """Replay what the client missed since ``after``, then answer cmd 4."""
        shard = self.shard
        page_size = shard.cfg.sync_page
        # everything for this connection from live_from on was already sent on it
        before = self.live_from if self.live_from > 0 else 1 << 62
        last = after
        store = shard.store
        try:
            while True:
                # never ahead of the router: a row it has not routed yet will be
                # held for this connection (or sent live after), not replayed
                bound = min(before, store.routed_id + 1, self._first_held_ack())
                page = await store.sync_page(self.uid, last, bound, page_size)
                if self.state == CLOSING:
                    return
                for msg in page:
                    self.send_msg(msg)
                if page:
                    last = page[-1].id
                if self.writable is not None and not self.writable.done():
                    # the transport paused us (pause_writing): let the client read,
                    # also before going live (a paused transport would not pause
                    # again, and a slow consumer would go unnoticed)
                    await self.writable
                    if self.state == CLOSING:
                        return
                if len(page) < page_size:
                    break
        except (sqlite3.Error, ValueError) as exc:
            log.error("sync for user %d failed: %s", self.uid, exc)
            self.send_error(ERR_SERVER, "sync failed, retry")
            self._end_sync(last)
            return
        self._end_sync(last)
        # the high-water mark: everything up to it is on the client now
        self.send_msg(Message(cmd=CMD_SYNC, id=max(last, self.top)))

    def _first_held_ack(self) -> int:
        """The id of the first ack held during this replay (1 << 62 if none).

        The replay stops below it: the client's own message is then not
        replayed ahead of its ack, and everything after it goes out from the
        held list, in order.
        """
        for msg in self.held or ():
            if msg.cmd == CMD_ACK:
                return msg.id
        return 1 << 62

    def _end_sync(self, last: int) -> None:
        held, self.held = self.held or [], None
        if self.state == CLOSING:
            return
        self.state = LIVE
        for msg in held:
            if msg.id > last:
                self.send_msg(msg)
                last = msg.id
                if not self.live_from:
                    self.live_from = msg.id
        if last > self.top:
            self.top = last


class Shard:
    """One process's websocket server, registry, router and store writer."""

    def __init__(self, cfg: Config, store: Store, checker: TokenChecker) -> None:
        self.cfg = cfg
        self.store = store
        self.checker = checker
        self.registry = Registry(cfg.max_conns)
        self.router = Router(self.registry)
        self.limiter = RateLimiter(cfg.rate_per_s, cfg.rate_burst) if cfg.rate_limit else None
        self.media_dir = cfg.data_path / "media"
        self.origins = frozenset(
            o if o == "*" else normalize_origin(o) for o in cfg.allowed_origins
        )
        self.held_max = max(HELD_MIN, cfg.slow_consumer_bytes // 64)
        self._previews: cachetools.LRUCache[str, str] = cachetools.LRUCache(PREVIEW_CACHE_SIZE)
        #: connections upgraded but not registered yet (their groups are loading)
        self.loading: set[Conn] = set()
        self._to_load: list[Conn] = []
        #: loading connections whose set must be read again (a join or leave came)
        self._reload_groups: set[Conn] = set()
        self._load_wake: asyncio.Event | None = None
        self.tick = 1
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task that is kept alive and whose errors are logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed", exc_info=task.exception())

    async def start(self, sock: Any = None) -> None:
        """Listen on the chat port (SO_REUSEPORT) and start the writer and sweep."""
        cfg = self.cfg
        self.store.start_writer(self.router.on_commit)
        kwargs: dict[str, Any] = (
            {"sock": sock}
            if sock is not None
            else {"host": cfg.host, "port": cfg.chat_port, "reuse_port": True}
        )
        self._server = await ws_create_server(
            self.route,
            backlog=4096,
            max_frame_size=cfg.max_frame_bytes,
            read_buffer_init_size=256,
            use_aiofastnet=False,
            enable_auto_pong=True,
            websocket_handshake_timeout=10,
            logger_name=_WS_LOG,
            **kwargs,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.spawn(self._sweep())
        self.spawn(self._group_loader())

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

    # --- group memberships of new connections ------------------------------------------

    def load_groups(self, conn: Conn) -> None:
        """Queue ``conn`` for the loader, which calls ``conn.on_groups`` later."""
        self.loading.add(conn)
        self._to_load.append(conn)
        if self._load_wake is not None:
            self._load_wake.set()

    async def _group_loader(self) -> None:
        """Load the groups of new connections, one query for all that queued.

        A reconnect storm after a restart then costs one store round trip per
        batch of users instead of one per connection.
        """
        self._load_wake = wake = asyncio.Event()
        while True:
            if not self._to_load:
                wake.clear()
                await wake.wait()
            batch, self._to_load = (
                self._to_load[:GROUP_LOAD_BATCH],
                self._to_load[GROUP_LOAD_BATCH:],
            )
            try:
                groups = await self.store.group_ids_of({c.uid for c in batch})
            except Exception:  # the loader must outlive any one failure
                log.exception("loading the groups of %d users failed", len(batch))
                for conn in batch:
                    self.loading.discard(conn)
                    conn.close(CLOSE_SERVER_ERROR, "server error")
                continue
            for conn in batch:
                self.loading.discard(conn)
                try:
                    conn.on_groups(groups.get(conn.uid, _NO_GROUPS))
                except Exception:
                    log.exception("registering a connection of user %d failed", conn.uid)
                    conn.close(CLOSE_SERVER_ERROR, "server error")
                    continue
                if conn in self._reload_groups:
                    self._reload_groups.discard(conn)
                    if conn.state != CLOSING:
                        self.load_groups(conn)

    # --- handshake ------------------------------------------------------------------

    def route(self, request: WSUpgradeRequest) -> Any:
        """picows listener factory: the router of the HTTP handshake."""
        path, _, query = request.path.partition(b"?")
        if path == b"/chat":
            return self._chat(request, query)
        if path == b"/healthz":
            return _json_response(
                200,
                {
                    "status": "draining" if self.draining else "ok",
                    "connections": self.registry.count,
                },
            )
        return _json_response(404, {"error": "not found"})

    def _chat(self, request: WSUpgradeRequest, query: bytes) -> Any:
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
            self.checker.check(token, uid)
        except (AuthError, ValueError) as exc:
            log.debug("handshake refused for user %s: %s", uid, exc)
            return _json_response(401, {"error": str(exc)})
        if self.draining:
            return _json_response(503, {"error": "server is shutting down"}, {"Retry-After": "1"})
        if self.registry.full:
            return _json_response(503, {"error": "shard is full"}, {"Retry-After": "1"})
        mend_upgrade_headers(request)
        return Conn(self, uid, resume)

    # --- control events --------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Apply a node-local control event to this shard's live connections."""
        conns = list(self.registry.get(event.uid) or ())
        loading = [c for c in self.loading if c.uid == event.uid]
        if isinstance(event, GroupJoined | GroupLeft):
            # their sets may be read before the change committed: read again
            self._reload_groups.update(loading)
        if isinstance(event, GroupJoined):
            for conn in conns:
                conn.groups = conn.groups | {event.gid}
                self.registry.join(conn, event.gid)
                # the group's messages committed between the join and this event
                # did not go out live: a replay must not stop at live_from
                conn.live_from = -1
        elif isinstance(event, GroupLeft):
            for conn in conns:
                conn.groups = conn.groups - {event.gid}
                self.registry.leave(conn, event.gid)
        elif isinstance(event, TokensRevoked):
            self.checker.revoke(event.uid, event.version)
            for conn in conns + loading:
                conn.close(CLOSE_REVOKED, "token revoked")
        elif isinstance(event, UserBanned):
            self.checker.revoke(event.uid, 1 << 62)
            for conn in conns + loading:
                conn.close(CLOSE_BANNED, "banned")

    # --- liveness -------------------------------------------------------------------

    async def _sweep(self) -> None:
        period = self.cfg.idle_timeout_s / IDLE_AFTER_TICKS
        registry = self.registry
        while True:
            await asyncio.sleep(period)
            self.tick += 1
            tick = self.tick
            for index in range(STRIPES):
                for conn in registry.stripe(index):
                    if conn.state == CLOSING:
                        if tick - conn.closed_tick >= ABORT_CLOSING_AFTER_TICKS:
                            conn.tr.disconnect(False)
                        continue
                    silent = tick - conn.tick
                    if silent >= IDLE_AFTER_TICKS:
                        conn.close(CLOSE_IDLE, "idle timeout")
                    elif silent >= PING_AFTER_TICKS:
                        conn.tr.send_ping()
                if index % 8 == 7:
                    await asyncio.sleep(0)  # let traffic through on a big shard

    # --- shutdown -------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, commit what is queued, close every client with 1001.

        Bounded by ``timeout_s``: connections still open then are aborted.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            await asyncio.wait_for(self.store.flush(), timeout_s * 0.8)
        except TimeoutError:
            log.error("drain: store did not flush %d queued messages in time", self.store.queued)
        conns = [*self.registry, *self.loading]
        for conn in conns:
            conn.close(CLOSE_GOING_AWAY, "server going away")
        waits = [c.tr.wait_disconnected() for c in conns]
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        if waits:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=remaining
            )
            for conn in conns:
                if not conn.tr.is_disconnected:
                    conn.tr.disconnect(False)
            for fut in pending:
                fut.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
