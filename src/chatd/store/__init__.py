"""The store: what chatd keeps on disk, behind one interface.

``Store`` is the seam where the next engine plugs in: the SQLite store
(``chatd.store.sqlite``, the embedded default) implements it, and nothing
outside that module speaks SQL or sees ``sqlite3`` errors. Failures come out
as ``StoreError`` (``StoreUnavailable``: nothing was done, retry;
``NotFoundError``: the row named does not exist).

Who calls what:

- the node's log (one per node) is the only caller of ``append`` and of the
  routing changes (``create_group``, ``join_group``, ``leave_group``,
  ``bump_token_version``, ``set_banned``), so that they are ordered with the
  messages (docs/design.md, invariant 5);
- shards read: ``sync_page`` for replays, token versions and bans at start;
- the API worker reads history and writes plain account data (users,
  friendships) directly: those change no routing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from chatd.wire import Message

if TYPE_CHECKING:
    from chatd.config import Config

#: outcome of one message of ``Store.append``
STORED: Final = 0  # a new row: deliver it
DUPLICATE: Final = 1  # the same (userid, cid) was stored before: ack again, do not deliver
NO_RECEIVER: Final = 2  # a private message to a user that does not exist

#: kinds of ``Event`` (a routing change recorded in the chain of a ``ChainStore``)
EVENT_JOIN: Final = 1  # uid joined group gid (also the owner of a new group)
EVENT_LEAVE: Final = 2  # uid left group gid
EVENT_REVOKE: Final = 3  # uid's tokens up to ``version`` - 1 are void (version: the new one)
EVENT_BAN: Final = 4  # uid is banned
EVENT_UNBAN: Final = 5  # uid is no longer banned

#: the sender of system messages (``chatd admin broadcast``): no user row has it
SYSTEM_USER: Final = 0
#: the ``dstid`` of a private system message to every user (sync returns it to all)
BROADCAST: Final = 0


class UserRecord(msgspec.Struct, frozen=True):
    """A user as stored (``passwd`` is the scrypt hash)."""

    id: int
    mobile: str
    passwd: str
    nickname: str
    avatar: str
    sex: str
    memo: str
    token_version: int
    banned: bool
    created_ms: int


class GroupRecord(msgspec.Struct, frozen=True):
    """A group (the seed's "community") as stored."""

    id: int
    name: str
    ownerid: int
    icon: str
    cate: int
    memo: str
    created_ms: int


class Event(msgspec.Struct, frozen=True, array_like=True):
    """A routing change at its place in a ``ChainStore``'s chain.

    ``id`` is a position in the same id space as messages: a member who
    joined at event ``id`` sees the group's messages with a higher id, and a
    leave, revocation or ban stops delivery from its position on. ``gid`` is
    set for joins and leaves, ``version`` (the new token version) for
    revocations.
    """

    id: int
    kind: int
    uid: int
    gid: int = 0
    version: int = 0


class Store(Protocol):
    """The operations chatd needs of a database."""

    committed: int
    batches: int

    async def close(self) -> None: ...

    # messages (the log)
    async def append(self, batch: Sequence[Message]) -> list[int]: ...
    async def max_message_id(self) -> int: ...

    # reads for delivery (shards, the log)
    async def sync_page(self, uid: int, after: int, before: int, limit: int) -> list[Message]: ...
    async def group_ids_of(self, uids: Collection[int]) -> dict[int, frozenset[int]]: ...
    async def user_groups(self, uid: int) -> frozenset[int]: ...
    async def token_versions(self) -> dict[int, int]: ...
    async def token_version(self, uid: int) -> int: ...
    async def banned_users(self) -> list[int]: ...
    async def get_messages(self, ids: Sequence[int]) -> list[Message]: ...

    # routing changes (the log only)
    async def create_group(
        self, name: str, owner: int, icon: str = "", cate: int = 0, memo: str = ""
    ) -> int: ...
    async def join_group(self, gid: int, uid: int) -> bool: ...
    async def leave_group(self, gid: int, uid: int) -> bool: ...
    async def bump_token_version(self, uid: int) -> int: ...
    async def set_banned(self, uid: int, banned: bool) -> bool: ...

    # accounts, contacts, history (the API, the CLI)
    async def create_user(
        self, mobile: str, passwd_hash: str, nickname: str = "", avatar: str = "", sex: str = "U"
    ) -> int: ...
    async def add_user(
        self, mobile: str, passwd_hash: str, nickname: str = "", avatar: str = "", sex: str = "U"
    ) -> int | None: ...
    async def user_by_mobile(self, mobile: str) -> UserRecord | None: ...
    async def user_by_id(self, uid: int) -> UserRecord | None: ...
    async def add_friend(self, uid: int, dstid: int) -> bool: ...
    async def friends(self, uid: int) -> list[UserRecord]: ...
    async def group_by_id(self, gid: int) -> GroupRecord | None: ...
    async def groups_of(self, uid: int) -> list[GroupRecord]: ...
    async def members_of(self, gid: int) -> list[UserRecord]: ...
    async def joined_id(self, gid: int, uid: int) -> int | None: ...
    async def private_history(
        self, uid: int, peer: int, after: int, before: int, limit: int, newest: bool
    ) -> list[Message]: ...
    async def group_history(
        self, gid: int, after: int, before: int, limit: int, newest: bool
    ) -> list[Message]: ...


class ChainStore(Store, Protocol):
    """A store shared by many nodes, whose ids are one chain in commit order.

    Every chain write (a batch of ``append`` or one routing change) is one
    transaction that takes the chain's lock first and allocates positions
    from the head, so positions are the commit order: a reader that saw the
    head at n never later finds a new id <= n (docs/design.md, invariant 2).
    A batch of k messages takes exactly k positions, whether each is stored
    or not (a duplicate or refused message leaves a gap, which is harmless);
    a routing change that changed something takes one, for its ``Event``.

    ``last_span`` and ``last_event`` describe this store's latest chain
    write; read them right after the call returns, before awaiting anything
    else (another caller's write replaces them).
    """

    #: (prev, last) of the latest chain write: the head just before it and
    #: its last position (prev == last for an empty batch); None after a
    #: routing change that changed nothing (it took no position)
    last_span: tuple[int, int] | None
    #: the event the latest routing change recorded; None when it changed
    #: nothing (e.g. joining a group twice) and after ``append``
    last_event: Event | None

    async def head(self) -> int:
        """The highest chain position committed (every lower one is committed too)."""
        ...

    async def chain_range(self, after: int, upto: int, limit: int) -> list[Message | Event]:
        """The committed messages and events with ``after`` < id <= ``upto``, in id
        order, at most ``limit``: what a node missed, read from the store."""
        ...

    async def group_ids_at(self, uids: Collection[int]) -> tuple[int, dict[int, frozenset[int]]]:
        """``group_ids_of(uids)`` and the committed head, read in one snapshot:
        the users' memberships as of that chain position."""
        ...


async def open_store(
    path: Path,
    *,
    synchronous: str = "NORMAL",
    writable: bool = True,
    busy_timeout_ms: int = 10_000,
    checkpoints: bool = False,
) -> Store:
    """Open the node's store (SQLite at ``path``; created and migrated if writable).

    ``busy_timeout_ms``: how long a statement waits for a lock another
    connection holds before the store answers ``StoreUnavailable``;
    ``checkpoints``: this is the node's message writer (its log): checkpoint
    the WAL beside its commits, not inside them.
    """
    from chatd.store.sqlite import SqliteStore

    return await SqliteStore.open(
        path,
        synchronous=synchronous,
        writable=writable,
        busy_timeout_ms=busy_timeout_ms,
        checkpoints=checkpoints,
    )


async def open_configured(cfg: Config, *, writable: bool = True, log: bool = False) -> Store:
    """Open the store ``cfg`` names (``store``): SQLite (the embedded default)
    or PostgreSQL. A writable open creates and migrates the schema; ``log``:
    for the node's log (the message writer)."""
    if cfg.store_is_postgres:
        from chatd.store.postgres import PostgresStore

        return await PostgresStore.open(
            cfg.store, min_size=1, max_size=cfg.pg_pool if writable else 2, migrate=writable
        )
    return await open_store(
        cfg.db_path,
        synchronous=cfg.db_synchronous,
        writable=writable,
        busy_timeout_ms=cfg.db_busy_timeout_ms,
        checkpoints=log,
    )
