"""Node-local control events: what the HTTP API (or the admin CLI) changes
that live connections must learn at once, without a reconnect.

An event is a small msgspec struct tagged by ``kind``. The API publishes it
after its transaction commits; every shard applies it to its connections
(``Shard.apply``). Events are idempotent, so delivering one twice is harmless.

They travel over ``Link``s: one pipe between the supervisor and each child
process. An API worker sends ``("event", bytes)`` up; the supervisor sends it
down to every shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import msgspec


class Event(msgspec.Struct, tag_field="kind"):
    """Base of every control event: each concerns one user."""

    uid: int


class GroupJoined(Event, tag="join"):
    """``uid`` is now a member of ``gid``: its connections enter the group."""

    gid: int


class GroupLeft(Event, tag="leave"):
    """``uid`` is no longer a member of ``gid``: its connections leave it."""

    gid: int


class TokensRevoked(Event, tag="revoke"):
    """Tokens of ``uid`` below ``version`` are void: close its connections (4501)."""

    version: int


class UserBanned(Event, tag="ban"):
    """``uid`` is banned: close its connections (4502)."""


AnyEvent = GroupJoined | GroupLeft | TokensRevoked | UserBanned
#: what the API calls after a commit; the node wires it to every shard
Publish = Callable[[Event], Awaitable[None]]

encode_event = msgspec.msgpack.Encoder().encode
decode_event = msgspec.msgpack.Decoder(AnyEvent).decode


class Link:
    """One end of a supervisor <-> child pipe, driven by the event loop.

    Messages are small tuples ``(verb, payload)``. ``on_message`` is called for
    each one received; ``on_eof`` once when the other side is gone (a child
    treats that as "the supervisor died": it drains and exits).
    """

    def __init__(self, conn: Connection, on_message: Callable[[str, Any], None],
                 on_eof: Callable[[], None]) -> None:
        self._conn = conn
        self._on_message = on_message
        self._on_eof = on_eof
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                verb, payload = self._conn.recv()
                self._on_message(verb, payload)
        except (EOFError, OSError):
            self.close()
            self._on_eof()

    def send(self, verb: str, payload: Any = None) -> bool:
        """Send one message; False if the other side is gone."""
        if self.closed:
            return False
        try:
            self._conn.send((verb, payload))
        except (BrokenPipeError, EOFError, OSError):
            return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
