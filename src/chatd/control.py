"""Node-local control events: what the HTTP API (or the admin CLI) changes
that live connections must learn at once, without a reconnect.

An event is a small msgspec struct tagged by ``kind``. The API publishes it
after its transaction commits; every shard applies it to its connections
(``Shard.apply``). Events are idempotent, so delivering one twice is harmless.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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
