"""The link between nodes: NATS (nats-py), from inside each node's log.

A node publishes what it committed, and hears what the others committed,
on three kinds of subjects (``SUBJECTS_PREFIX`` first):

- ``h`` — every unit's ``Header``, to every node: its positions in the chain
  ``(prev, last]``, the users and groups its messages concern, and its
  routing changes and messages for everyone inline. One per unit, not per
  message.
- ``u.<uid>`` — a ``Payload``: the unit's private messages to or from that
  user. A node subscribes while it holds a connection of the user.
- ``g.<gid>`` — a ``Payload``: the unit's messages to that group. A node
  subscribes while it has an online member of the group.

So NATS's interest routing sends a message only to the nodes that want it.
A publisher sends a unit's payloads before its header over one connection,
so a subscriber normally has the payloads when the header comes; the node's
chain (``log.chain``) checks, and reads from the store what is missing. The
bus is a fast hint, never the only copy of anything acked: a publish made
while NATS is unreachable is dropped (and counted), and every node re-reads
from the store what it may have missed.

nats-py hands each subscription's messages to a queue and a task of its
own; with a subscription per online user that is a task per user, and the
order between subjects would be the scheduler's. ``_Client`` therefore
takes the subscriptions it is asked for directly from the connection's read
loop, in the order they arrive, and writes a unit's publishes as one
buffer. It relies on nats-py internals (``_process_msg``, ``_send_command``,
``_flush_pending``), so the dependency is pinned to a minor version and the
cluster tests run against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import msgspec
import nats
from nats.aio.client import Client as _NatsClient

from chatd.errors import StoreUnavailable
from chatd.store import Event
from chatd.wire import Message

log = logging.getLogger("chatd.bus.nats")

SUBJECTS_PREFIX: Final = "chatd."
HEADER_SUBJECT: Final = SUBJECTS_PREFIX + "h"
#: how long a node waits for NATS when it starts before it gives up
CONNECT_TIMEOUT_S: Final = 5.0
#: publishes buffered while the link reconnects; past it they are dropped
PENDING_BYTES: Final = 8 * 1024 * 1024


class Header(msgspec.Struct, array_like=True):
    """A unit of the chain, as every node hears of it."""

    node: str
    prev: int
    last: int
    users: list[int] = []
    groups: list[int] = []
    events: list[Event] = []
    everyone: list[Message] = []


class Payload(msgspec.Struct, array_like=True):
    """A unit's messages for one subject."""

    prev: int
    msgs: list[Message]


_encode = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(Header).decode
_decode_payload = msgspec.msgpack.Decoder(Payload).decode


def user_subject(uid: int) -> str:
    return f"{SUBJECTS_PREFIX}u.{uid}"


def group_subject(gid: int) -> str:
    return f"{SUBJECTS_PREFIX}g.{gid}"


OnHeader = Callable[[Header], None]
OnPayload = Callable[[int, str, int, list[Message]], None]


class _Client(_NatsClient):
    """nats-py's client, with subscriptions served straight from its read loop."""

    def __init__(self) -> None:
        super().__init__()
        self.direct: dict[int, Callable[[bytes], None]] = {}

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self.direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        try:
            handler(data)
        except Exception:  # our bug: keep the read loop alive
            log.exception("handling a message from NATS failed")

    def write(self, data: bytes) -> bool:
        """Queue ``data`` (whole protocol commands) and have it flushed; False
        when the link is down (the caller drops it)."""
        if not self.is_connected:
            return False
        self._pending.append(data)
        self._pending_data_size += len(data)
        return True


class NodeBus:
    """A node's link to NATS: the header stream, its interest subjects, its publishes.

    ``on_header``/``on_payload`` get what other nodes publish, in the order it
    arrives; ``on_lost`` is called when the link drops and ``on_back`` when it
    is up again (the node then re-reads the store: anything may have been
    missed meanwhile).
    """

    def __init__(
        self,
        servers: list[str],
        node: str,
        *,
        on_header: OnHeader,
        on_payload: OnPayload,
        on_lost: Callable[[], None],
        on_back: Callable[[], None],
    ) -> None:
        self.servers = servers
        self.node = node
        self._on_header = on_header
        self._on_payload = on_payload
        self._on_lost = on_lost
        self._on_back = on_back
        self._nc = _Client()
        self._never: asyncio.Future[Any] | None = None
        #: subjects wanted now, and the subscriptions made for them
        self._want: dict[tuple[str, int], bool] = {}
        self._subs: dict[tuple[str, int], Any] = {}
        self._changes: asyncio.Event | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._flush_soon = False
        self._closing = False
        # figures
        self.published = 0
        self.dropped = 0
        self.received = 0

    @property
    def up(self) -> bool:
        return bool(self._nc.is_connected)

    async def start(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, and subscribe to the header stream; ``StoreUnavailable`` if
        no server answers within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        self._never = loop.create_future()
        self._changes = asyncio.Event()

        async def lost() -> None:
            if self._closing:
                return
            log.warning("NATS link lost; reconnecting")
            self._on_lost()

        async def back() -> None:
            log.info("NATS link back (%s)", self._nc.connected_url.netloc
                     if self._nc.connected_url else "?")
            self._on_back()

        async def error(exc: Exception) -> None:
            log.warning("NATS: %s", exc)

        try:
            await asyncio.wait_for(
                self._nc.connect(
                    servers=self.servers,
                    name=f"chatd {self.node}",
                    no_echo=True,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    # (nats-py annotates these as int; it takes seconds as floats)
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    connect_timeout=min(2.0, timeout_s),  # type: ignore[arg-type]
                    pending_size=PENDING_BYTES,
                    disconnected_cb=lost,
                    reconnected_cb=back,
                    error_cb=error,
                ),
                timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await self._nc.close()
            raise StoreUnavailable(f"cannot reach NATS at {', '.join(self.servers)}: "
                                   f"{exc or type(exc).__name__}") from None
        await self._subscribe(HEADER_SUBJECT, self._header)
        await self._nc.flush()
        self._syncer = loop.create_task(self._sync_subscriptions(), name="nats-subscriptions")

    async def close(self) -> None:
        self._closing = True
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._nc.drain()
        with contextlib.suppress(Exception):
            await self._nc.close()

    # --- receiving ------------------------------------------------------------------

    async def _subscribe(self, subject: str, handler: Callable[[bytes], None]) -> Any:
        sub = await self._nc.subscribe(subject, future=self._never)
        self._nc.direct[sub._id] = handler
        return sub

    def _header(self, data: bytes) -> None:
        try:
            header = _decode_header(data)
        except msgspec.DecodeError:
            log.warning("a header on NATS that is not chatd's (%d bytes); ignored", len(data))
            return
        self.received += 1
        self._on_header(header)

    def _payload_handler(self, kind: str, key: int) -> Callable[[bytes], None]:
        on_payload = self._on_payload

        def handle(data: bytes) -> None:
            try:
                payload = _decode_payload(data)
            except msgspec.DecodeError:
                log.warning("a payload on NATS that is not chatd's; ignored")
                return
            on_payload(payload.prev, kind, key, payload.msgs)

        return handle

    def want(self, kind: str, key: int, yes: bool) -> None:
        """Start (``yes``) or stop hearing user (``kind`` "u") or group ("g") ``key``.

        Applied in the background, in order; a subscription that is not up yet
        only costs a read from the store (the chain notices what it lacks)."""
        self._want[(kind, key)] = yes
        if self._changes is not None:
            self._changes.set()

    async def _sync_subscriptions(self) -> None:
        changes = self._changes
        assert changes is not None
        while True:
            await changes.wait()
            changes.clear()
            wanted, self._want = self._want, {}
            for (kind, key), yes in wanted.items():
                try:
                    await self._apply(kind, key, yes)
                except Exception as exc:  # the link is down: nats-py resubscribes
                    log.debug("subscription change %s.%d failed: %s", kind, key, exc)
                    self._want.setdefault((kind, key), yes)
            if self._want:
                await asyncio.sleep(0.05)
                changes.set()

    async def _apply(self, kind: str, key: int, yes: bool) -> None:
        have = self._subs.get((kind, key))
        if yes and have is None:
            subject = user_subject(key) if kind == "u" else group_subject(key)
            self._subs[(kind, key)] = await self._subscribe(
                subject, self._payload_handler(kind, key)
            )
        elif not yes and have is not None:
            del self._subs[(kind, key)]
            self._nc.direct.pop(have._id, None)
            await have.unsubscribe()

    @property
    def subscriptions(self) -> int:
        return len(self._subs)

    # --- publishing -----------------------------------------------------------------

    def publish(self, header: Header, payloads: Mapping[str, Iterable[Message]]) -> None:
        """Send a unit: its payloads (subject -> messages), then its header."""
        prev = header.prev
        limit = self._nc.max_payload or 1 << 20
        parts: list[bytes] = []
        for subject, msgs in payloads.items():
            data = _encode(Payload(prev, list(msgs)))
            if len(data) > limit:  # the subscribers read it from the store
                self.dropped += 1
                continue
            parts.append(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(data), data))
        data = _encode(header)
        if len(data) > limit:  # every node finds the gap and reads it from the store
            self.dropped += 1
            data = b""
        else:
            parts.append(b"PUB %s %d\r\n%s\r\n" % (HEADER_SUBJECT.encode(), len(data), data))
        if self._nc.write(b"".join(parts)):
            self.published += 1
            self._schedule_flush()
        else:
            self.dropped += 1

    def _schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        asyncio.get_running_loop().create_task(self._nc._flush_pending())


async def probe(url: str, timeout_s: float = 3.0) -> None:
    """Connect to the NATS server at ``url`` once (``chatd check-config``);
    ``StoreUnavailable`` saying why if it does not answer."""
    nc = _NatsClient()

    async def quiet(exc: Exception) -> None:
        return None

    try:
        await asyncio.wait_for(
            nc.connect(
                servers=[url],
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=timeout_s,  # type: ignore[arg-type]
                error_cb=quiet,
            ),
            timeout_s + 1,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise StoreUnavailable(str(exc) or type(exc).__name__) from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
