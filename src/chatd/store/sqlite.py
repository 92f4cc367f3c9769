"""The SQLite store: one file in WAL mode, reached through aiosqlite.

Two connections per process: a writer for ``append`` (one transaction per
batch of messages) and the routing changes and account writes, and a reader
for sync, history and look-ups (WAL lets it read while the writer commits).
A process that only reads (a shard replaying sync pages) opens it with
``writable=False``.

``append`` assigns ids inside its ``BEGIN IMMEDIATE`` transaction from the
table's max id, so ``id`` is the commit order, also when several processes
share the file. ``(cid, userid)`` is unique: a retried frame gets the stored
row's id back instead of a second row. The node's log (``chatd.log``) is the
only caller of ``append`` and of the routing changes; it decides what is
acked and delivered, after the commit returns.

The message indexes are few and local, because each index entry a commit
adds at a random place costs a page of WAL (docs/design.md, "Where the
store's cost is"): the private ones lead with the message's partition (``p =
id >> PARTITION_BITS``), so a batch adds to their newest pages only, and
sync and history walk the partitions of their id range (``_walk``).

SQLite's own errors never leave this module: they become ``StoreError``
(``StoreUnavailable`` when the database is busy, locked, full or gone, so
the caller answers "retry").

Schema changes are numbered migrations applied in order at open
(``PRAGMA user_version`` holds the number applied).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import aiosqlite
import cachetools

from chatd.errors import NotFoundError, StoreError, StoreUnavailable
from chatd.notify import notify
from chatd.store import (
    BROADCAST,
    DUPLICATE,
    NO_RECEIVER,
    STORED,
    SYSTEM_USER,
    GroupRecord,
    UserRecord,
)
from chatd.threads import name_this_thread
from chatd.wire import CMD_GROUP, CMD_PRIVATE, Message

log = logging.getLogger("chatd.store")

#: a message's partition is ``id >> PARTITION_BITS`` (4096 ids): the private
#: indexes lead with it. Migration 2 writes the number into a CHECK: changing it
#: takes a migration that rewrites ``p``.
PARTITION_BITS: Final = 12

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the seed's user / contact / community model, and messages
    """
    CREATE TABLE users (
        id            INTEGER PRIMARY KEY,
        mobile        TEXT    NOT NULL UNIQUE,
        passwd        TEXT    NOT NULL,
        nickname      TEXT    NOT NULL DEFAULT '',
        avatar        TEXT    NOT NULL DEFAULT '',
        sex           TEXT    NOT NULL DEFAULT 'U',
        memo          TEXT    NOT NULL DEFAULT '',
        token_version INTEGER NOT NULL DEFAULT 0,
        banned        INTEGER NOT NULL DEFAULT 0,
        created_ms    INTEGER NOT NULL
    );
    CREATE TABLE friends (
        ownerid    INTEGER NOT NULL REFERENCES users(id),
        dstid      INTEGER NOT NULL REFERENCES users(id),
        memo       TEXT    NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (ownerid, dstid)
    ) WITHOUT ROWID;
    CREATE TABLE communities (
        id         INTEGER PRIMARY KEY,
        name       TEXT    NOT NULL,
        ownerid    INTEGER NOT NULL REFERENCES users(id),
        icon       TEXT    NOT NULL DEFAULT '',
        cate       INTEGER NOT NULL DEFAULT 0,
        memo       TEXT    NOT NULL DEFAULT '',
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE members (
        gid        INTEGER NOT NULL REFERENCES communities(id),
        uid        INTEGER NOT NULL REFERENCES users(id),
        joined_id  INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (gid, uid)
    ) WITHOUT ROWID;
    CREATE INDEX members_uid ON members(uid, gid);
    CREATE TABLE messages (
        id      INTEGER PRIMARY KEY,
        userid  INTEGER NOT NULL,
        cmd     INTEGER NOT NULL,
        dstid   INTEGER NOT NULL,
        media   INTEGER NOT NULL DEFAULT 0,
        content TEXT    NOT NULL DEFAULT '',
        pic     TEXT    NOT NULL DEFAULT '',
        url     TEXT    NOT NULL DEFAULT '',
        memo    TEXT    NOT NULL DEFAULT '',
        amount  INTEGER NOT NULL DEFAULT 0,
        cid     TEXT,
        ts      INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX messages_cid ON messages(userid, cid) WHERE cid IS NOT NULL;
    CREATE INDEX messages_from ON messages(userid, id);
    CREATE INDEX messages_to ON messages(cmd, dstid, id);
    """,
    # 2: indexes that a batch adds to at a few places instead of three random
    # ones per message (issue 10). The table is rebuilt, not altered: ``p`` must
    # be a real column (an expression index on ``id >> 12`` gave wrong answers
    # after ANALYZE on SQLite 3.40), and a CHECK, which ALTER TABLE cannot add
    # to a table with rows, makes a row with a wrong ``p`` an error instead of
    # a message that sync never finds. Every index key ends with the rowid (the
    # id), so none names it. Broadcasts get an index of their own (a range, not
    # a search per partition), and ``users.created_id`` (the max message id
    # when the user was created; 0: not known) bounds the partitions a user's
    # walk searches: no private message of a user is older than the user.
    f"""
    CREATE TABLE messages_v2 (
        id      INTEGER PRIMARY KEY,
        userid  INTEGER NOT NULL,
        cmd     INTEGER NOT NULL,
        dstid   INTEGER NOT NULL,
        p       INTEGER NOT NULL CHECK (p = id >> {PARTITION_BITS}),
        media   INTEGER NOT NULL DEFAULT 0,
        content TEXT    NOT NULL DEFAULT '',
        pic     TEXT    NOT NULL DEFAULT '',
        url     TEXT    NOT NULL DEFAULT '',
        memo    TEXT    NOT NULL DEFAULT '',
        amount  INTEGER NOT NULL DEFAULT 0,
        cid     TEXT,
        ts      INTEGER NOT NULL
    );
    INSERT INTO messages_v2
           (id, userid, cmd, dstid, p, media, content, pic, url, memo, amount, cid, ts)
    SELECT id, userid, cmd, dstid, id >> {PARTITION_BITS}, media, content, pic, url, memo,
           amount, cid, ts
      FROM messages ORDER BY id;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE UNIQUE INDEX messages_cid ON messages(cid, userid) WHERE cid IS NOT NULL;
    CREATE INDEX messages_in ON messages(p, dstid) WHERE cmd = {CMD_PRIVATE};
    CREATE INDEX messages_out ON messages(p, userid) WHERE cmd = {CMD_PRIVATE};
    CREATE INDEX messages_group ON messages(dstid) WHERE cmd = {CMD_GROUP};
    CREATE INDEX messages_broadcast ON messages(dstid)
        WHERE cmd = {CMD_PRIVATE} AND dstid = {BROADCAST};
    ALTER TABLE users ADD COLUMN created_id INTEGER NOT NULL DEFAULT 0
    """,
)

WRITER_CACHE_KIB: Final = 65_536
WAL_CHECKPOINT_PAGES: Final = 10_000
#: how long a look-up in the caller's thread waits for a lock before it goes
#: to the reader's thread instead (the event loop must not wait)
POINT_BUSY_MS: Final = 5
#: while a migration runs, how often systemd hears that the start goes on
MIGRATION_NOTIFY_S: Final = 20.0
#: how often the checkpoint thread copies the WAL into the database file
CHECKPOINT_PERIOD_S: Final = 0.25
#: how often the message writer finishes a checkpoint itself (so that the WAL
#: restarts from its beginning instead of growing)
WAL_RESTART_S: Final = 2.0

_MSG_COLUMNS: Final = "id, userid, cmd, dstid, media, content, pic, url, memo, amount, cid, ts"
_M_COLUMNS: Final = ", ".join("m." + c.strip() for c in _MSG_COLUMNS.split(","))
#: one message row (its columns in this order: ``chatd_bench.stores --floor`` uses it too)
INSERT_MESSAGE_SQL: Final = (
    "INSERT INTO messages (id, userid, cmd, dstid, p, media, content, pic, url, memo, amount, "
    "cid, ts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
#: the partitions :pa..:pb (none if :pa > :pb), one row each: a walk's chunk
_PARTITIONS: Final = (
    "WITH RECURSIVE ps(p) AS (SELECT :pa WHERE :pa <= :pb "
    "UNION ALL SELECT p + 1 FROM ps WHERE p < :pb) "
)
#: a sync page within one chunk (``_walk``). The ids first, from the indexes
#: alone, then the page's rows: private messages to the user (messages_in)
#: and from the user (messages_out; UNION, not UNION ALL: a message to oneself
#: is in both), broadcasts (messages_broadcast: they have no partitions to
#: walk), and messages of the user's groups since the join. ``members g CROSS
#: JOIN messages m`` keeps the members outside: left to itself the planner may
#: read every group message and look its member up (7 ms a page on 1M rows).
SYNC_SQL: Final = f"""
    {_PARTITIONS}, page(id) AS (
        SELECT m.id FROM ps CROSS JOIN messages m INDEXED BY messages_in
            ON m.p = ps.p AND m.cmd = {CMD_PRIVATE} AND m.dstid = :uid
           AND m.id > :after AND m.id < :before
        UNION
        SELECT m.id FROM ps CROSS JOIN messages m INDEXED BY messages_out
            ON m.p = ps.p AND m.cmd = {CMD_PRIVATE} AND m.userid = :uid
           AND m.id > :after AND m.id < :before
        UNION
        SELECT id FROM messages INDEXED BY messages_broadcast
         WHERE cmd = {CMD_PRIVATE} AND dstid = {BROADCAST} AND id > :after AND id < :before
        UNION
        SELECT m.id FROM members g CROSS JOIN messages m INDEXED BY messages_group
            ON m.cmd = {CMD_GROUP} AND m.dstid = g.gid AND m.id > max(:after, g.joined_id)
           AND m.id < :before
         WHERE g.uid = :uid
        ORDER BY 1 LIMIT :limit)
    SELECT {_M_COLUMNS} FROM page CROSS JOIN messages m ON m.id = page.id ORDER BY m.id
"""
#: the conversation of :a and :b within one chunk: each one's inbox, filtered
#: by the other as sender; {order} is ASC or DESC
PRIVATE_HISTORY_SQL: Final = f"""
    {_PARTITIONS}
    SELECT * FROM (
        SELECT {_M_COLUMNS} FROM ps CROSS JOIN messages m INDEXED BY messages_in
            ON m.p = ps.p AND m.cmd = {CMD_PRIVATE} AND m.dstid = :b AND m.userid = :a
           AND m.id > :after AND m.id < :before
        UNION ALL
        SELECT {_M_COLUMNS} FROM ps CROSS JOIN messages m INDEXED BY messages_in
            ON m.p = ps.p AND m.cmd = {CMD_PRIVATE} AND m.dstid = :a AND m.userid = :b
           AND :a != :b AND m.id > :after AND m.id < :before)
    ORDER BY id {{order}} LIMIT :limit
"""
GROUP_HISTORY_SQL: Final = f"""
    SELECT {_MSG_COLUMNS} FROM messages INDEXED BY messages_group
     WHERE cmd = {CMD_GROUP} AND dstid = ? AND id > ? AND id < ?
     ORDER BY id {{order}} LIMIT ?
"""
#: the stored rows of the keys in ``cid_keys(n)``: (1, userid, cid, "id:ts"),
#: one search of messages_cid per key (a join against the keys: an IN over
#: row values would scan the table)
CID_LOOKUP_SQL: Final = (
    "SELECT 1, m.userid, m.cid, m.id || ':' || m.ts "
    "FROM k CROSS JOIN messages m INDEXED BY messages_cid ON m.cid = k.c AND m.userid = k.u"
)
#: a walk's first chunk covers this many partitions, each next one
#: ``WALK_GROWTH`` times as many: a dense range fills its page from a small
#: chunk (each chunk's matches are gathered and sorted whole), a sparse one
#: takes few chunks (each one costs a statement)
WALK_FIRST_PARTITIONS: Final = 4
WALK_GROWTH: Final = 4


def cid_keys(n: int) -> str:
    """``WITH k(u, c)``: ``n`` (userid, cid) pairs, bound in that order."""
    return f"WITH k(u, c) AS (VALUES {','.join(['(?,?)'] * n)}) "


def _walk(
    db: sqlite3.Connection,
    sql: str,
    params: dict[str, Any],
    after: int,
    before: int,
    limit: int,
    newest: bool,
    users: Sequence[int],
) -> list[Any]:
    """The rows of ``sql`` with ``after`` < id < ``before``, at most ``limit``:
    the oldest (in id order) or the ``newest`` (newest first).

    The private indexes are searched once per partition, so the range is
    walked in chunks of partitions, from its old or its new end, until the
    page is full; each chunk's statement binds ``:pa``/``:pb`` (its
    partitions), ``:after``/``:before`` (its ids) and ``:limit`` (what is
    still missing). What bounds the walk: the table's max id (``before`` may
    be unbounded), and the ``created_id`` of ``users``: no private message of
    a user is older than the user, so no partition below it is searched (the
    statement's other parts, broadcasts and groups, still read the whole
    range: the chunk at that end reaches down to ``after``). The whole walk
    reads one snapshot.
    """
    bits = PARTITION_BITS
    db.execute("BEGIN")
    try:
        marks = ",".join("?" * len(users)) or "NULL"
        top, floor = db.execute(
            "SELECT (SELECT max(id) FROM messages), "
            f"(SELECT coalesce(max(created_id), 0) FROM users WHERE id IN ({marks}))",
            users,
        ).fetchone()
        lo, hi = max(after, 0), min(before, (top or 0) + 1)
        # partitions that may hold the private rows: p_floor .. p_top
        p_floor, p_top = (max(lo, floor) + 1) >> bits, (hi - 1) >> bits
        out: list[Any] = []
        span = WALK_FIRST_PARTITIONS
        c_after, c_before = lo, hi
        p = p_top if newest else p_floor
        while c_before - c_after > 1 and len(out) < limit:
            if newest:
                p_lo, p_hi = max(p - span + 1, p_floor), p
                c_after = lo if p_lo <= p_floor else (p_lo << bits) - 1
                p = p_lo - 1
            else:
                p_lo, p_hi = p, min(p + span - 1, p_top)
                c_before = hi if p_hi >= p_top else (p_hi + 1) << bits
                p = p_hi + 1
            params.update(pa=p_lo, pb=p_hi, after=c_after, before=c_before,
                          limit=limit - len(out))
            out.extend(db.execute(sql, params).fetchall())
            if newest:
                c_before, c_after = c_after + 1, lo
            else:
                c_after, c_before = c_before - 1, hi
            span *= WALK_GROWTH
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return out


_NO_GROUPS: Final[frozenset[int]] = frozenset()
#: SQLite result codes that mean "try again later", not "this is wrong"
_TRANSIENT: Final = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
     sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY}
)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_R = TypeVar("_R", UserRecord, GroupRecord)


def _translated(fn: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Turn SQLite's errors into the store's (``StoreUnavailable`` / ``StoreError``)."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _TRANSIENT:
                raise StoreUnavailable(str(exc)) from exc
            raise StoreError(str(exc)) from exc
        except ValueError as exc:  # e.g. an operation on a closed connection
            raise StoreUnavailable(str(exc)) from exc

    return wrapper


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_broadcast(msg: Message) -> bool:
    """A system message to every user (``Log.broadcast``; clients cannot send one)."""
    return msg.dstid == BROADCAST and msg.userid == SYSTEM_USER


def _read_only_uri(path: Path) -> str:
    """The URI that opens ``path`` read-only (percent-encoded: a folder name
    with ``?`` or ``#`` stays a folder name)."""
    return Path(path).resolve().as_uri() + "?mode=ro"


def row_to_message(row: Sequence[Any]) -> Message:
    """A ``Message`` from a messages row in ``_MSG_COLUMNS`` order."""
    return Message(
        id=row[0],
        userid=row[1],
        cmd=row[2],
        dstid=row[3],
        media=row[4],
        content=row[5],
        pic=row[6],
        url=row[7],
        memo=row[8],
        amount=row[9],
        cid=row[10] or "",
        ts=row[11],
    )


class Checkpoints:
    """Keeps SQLite's WAL checkpoints off the commit path of the message writer.

    With SQLite's own rule (``wal_autocheckpoint``) the commit that passes the
    threshold copies the whole WAL into the database file and syncs it before
    it returns: tens of milliseconds during which every message waits (the p99
    of an open-loop run was that stall). Instead a thread with a connection of
    its own copies the WAL every ``CHECKPOINT_PERIOD_S`` (PASSIVE: it never
    blocks the writer) and syncs the database file, so the copying and the
    random writes happen beside the commits. A PASSIVE checkpoint that runs
    while the writer keeps writing never finishes the WAL, though, and SQLite
    restarts the WAL only after one that did: so every ``WAL_RESTART_S`` the
    writer itself runs one before its next transaction (it copies only what
    came since the thread's last pass, a few milliseconds), and the WAL then
    starts again from its beginning instead of growing without bound.
    """

    #: the thread's name, in Python and to the kernel (top -H, the bench)
    THREAD_NAME: Final = "chatd-checkpt"

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_restart = time.monotonic()
        #: passes made, and failed (the figures; a failure is retried next pass)
        self.passes = 0
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        name_this_thread(self.THREAD_NAME)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            fd = os.open(self.path, os.O_RDONLY)
        except (sqlite3.Error, OSError) as exc:
            log.error("the checkpoint thread cannot open %s: %s", self.path, exc)
            return
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            while not self._stop.wait(CHECKPOINT_PERIOD_S):
                try:
                    # a second pass takes what the writer committed during the first
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    # a partial checkpoint does not sync the database file: do it
                    # here, so that the writer's finishing one has little to sync
                    os.fdatasync(fd)
                    self.passes += 1
                except (sqlite3.Error, OSError) as exc:
                    self.failures += 1
                    log.warning("a checkpoint pass failed: %s", exc)
        finally:
            os.close(fd)
            db.close()

    def before_write(self, db: sqlite3.Connection) -> None:
        """In the writer's thread, before its next transaction: now and then
        finish the checkpoint, so that this transaction restarts the WAL."""
        now = time.monotonic()
        if self._thread is None or now - self._last_restart < WAL_RESTART_S:
            return
        self._last_restart = now
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")


class _NoCheckpoints:
    """SQLite's own rule (``wal_autocheckpoint``): stores that write little."""

    def before_write(self, db: sqlite3.Connection) -> None:
        return None

    def stop(self) -> None:
        return None


class SqliteStore:
    """The node's database in one SQLite file. Open with ``await SqliteStore.open(...)``."""

    def __init__(
        self,
        writer: aiosqlite.Connection | None,
        reader: aiosqlite.Connection,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self._writer = writer
        self._r = reader
        #: a connection read in the caller's thread: a small look-up by the
        #: index costs less than the hand-over to a thread and back
        self._point: sqlite3.Connection | None = None
        self._checkpoints: Checkpoints | _NoCheckpoints = checkpoints or _NoCheckpoints()
        self._known_users: cachetools.LRUCache[int, bool] = cachetools.LRUCache(200_000)
        self.batches = 0
        self.committed = 0

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreError("this store was opened read-only")
        return self._writer

    # --- opening and closing ------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        writable: bool = True,
        busy_timeout_ms: int = 10_000,
        checkpoints: bool = False,
    ) -> SqliteStore:
        """Open the database at ``path``; a writable open creates and migrates it.

        ``checkpoints``: this store is the node's message writer: checkpoint the
        WAL beside the commits (``Checkpoints``) instead of inside them.
        """
        writer = None
        if writable:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await aiosqlite.connect(path, isolation_level=None)
            try:
                await _in_thread(writer, _name_thread, "chatd-writer")
                await writer.execute("PRAGMA journal_mode=WAL")
                await writer.execute(f"PRAGMA synchronous={synchronous.upper()}")
                await writer.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
                await writer.execute("PRAGMA foreign_keys=ON")
                # a bigger page cache keeps the hot index pages in memory, and a
                # longer WAL between checkpoints writes each hot page back once per
                # checkpoint instead of once per 1000 pages of log
                await writer.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
                pages = 0 if checkpoints else WAL_CHECKPOINT_PAGES
                await writer.execute(f"PRAGMA wal_autocheckpoint={pages}")
                await _migrate(writer)
            except BaseException:
                await writer.close()
                raise
        elif not path.exists():
            raise StoreError(f"no database at {path}")
        try:
            reader = await aiosqlite.connect(path, isolation_level=None)
            await _in_thread(reader, _name_thread, "chatd-reader")
            await reader.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            await reader.execute("PRAGMA query_only=ON")
            point = sqlite3.connect(_read_only_uri(path), uri=True, isolation_level=None,
                                    check_same_thread=False)
            point.execute(f"PRAGMA busy_timeout={POINT_BUSY_MS}")
        except BaseException:
            if writer is not None:
                await writer.close()
            raise
        keeper = None
        if writer is not None and checkpoints:
            keeper = Checkpoints(path, busy_timeout_ms)
            keeper.start()
        store = cls(writer, reader, keeper)
        store._point = point
        return store

    async def close(self) -> None:
        self._checkpoints.stop()
        if self._point is not None:
            self._point.close()
        await self._r.close()
        if self._writer is not None:
            await self._writer.close()

    # --- messages -------------------------------------------------------------

    async def append(self, batch: Sequence[Message]) -> list[int]:
        """Store ``batch`` in one transaction; the outcome of each message.

        Stored messages get their ``id`` (the commit order) and ``ts``; a retry
        of a stored ``(userid, cid)`` gets the original's. Raises
        ``StoreUnavailable``/``StoreError`` if nothing was stored.
        """
        outcomes = await self._write_batch(batch)
        self.batches += 1
        return outcomes

    async def _write_batch(self, batch: Sequence[Message]) -> list[int]:
        """Store ``batch`` in one transaction, in one hop to the writer thread.

        The whole transaction (look-ups, insert, commit) runs as one function
        in aiosqlite's thread for the writer connection: one hand-over each
        way per batch instead of four (at 20k messages/s in small batches the
        hand-overs were a sixth of the server's CPU).
        """
        outcomes, stored = await self._in_writer(self._write_batch_sync, batch)
        self.committed += stored
        return outcomes

    async def _in_writer(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(connection, *args)`` in the writer connection's thread."""
        return await _in_thread(self._w, fn, *args)

    async def _in_reader(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(connection, *args)`` in the reader connection's thread (the
        several statements of a walk in one hop)."""
        return await _in_thread(self._r, fn, *args)

    def _write_batch_sync(
        self, db: sqlite3.Connection, batch: Sequence[Message]
    ) -> tuple[list[int], int]:
        """(outcomes, rows stored). Retries (a ``cid`` already stored) are rare,
        so the batch is first written without looking them up: the unique
        index refuses a retry, and only then is the batch written again with
        the look-up (which costs an index search per message)."""
        self._checkpoints.before_write(db)
        try:
            return self._write_batch_once(db, batch, look_up_cids=False)
        except sqlite3.IntegrityError:
            return self._write_batch_once(db, batch, look_up_cids=True)

    def _write_batch_once(
        self, db: sqlite3.Connection, batch: Sequence[Message], look_up_cids: bool
    ) -> tuple[list[int], int]:
        # what the batch needs to know from the table: its max id, rows already
        # stored under the same (userid, cid), and which private receivers exist
        cids: dict[tuple[int, str], int] = {}
        unknown_dst: set[int] = set()
        known = self._known_users
        for i, msg in enumerate(batch):
            if msg.cid:
                cids.setdefault((msg.userid, msg.cid), i)
            if msg.cmd == CMD_PRIVATE and msg.dstid not in known and not _is_broadcast(msg):
                unknown_dst.add(msg.dstid)
        sql = ["SELECT 0, coalesce(max(id), 0), NULL, NULL FROM messages"]
        params: list[Any] = []
        head = ""
        if cids and look_up_cids:
            head = cid_keys(len(cids))
            sql.append(CID_LOOKUP_SQL)
            for key in cids:
                params.extend(key)
        if unknown_dst:
            marks = ",".join("?" * len(unknown_dst))
            sql.append(f"SELECT 2, id, NULL, NULL FROM users WHERE id IN ({marks})")
            params.extend(unknown_dst)
        query = head + " UNION ALL ".join(sql)
        db.execute("BEGIN IMMEDIATE")
        try:
            found = db.execute(query, params).fetchall()
            max_id = 0
            stored: dict[tuple[int, str], tuple[int, int]] = {}
            for kind, a, b, c in found:
                if kind == 0:
                    max_id = a
                elif kind == 1:
                    sid, sts = c.split(":")
                    stored[(a, b)] = (int(sid), int(sts))
                else:
                    known[a] = True
            ts = _now_ms()
            rows: list[tuple[Any, ...]] = []
            outcomes: list[int] = []
            for i, msg in enumerate(batch):
                if msg.cid:
                    key = (msg.userid, msg.cid)
                    prior = stored.get(key)
                    if prior is None and cids[key] != i:
                        # same cid twice in this batch: the first one is the original
                        first = batch[cids[key]]
                        prior = (first.id, first.ts) if first.id else None
                    if prior is not None:
                        msg.id, msg.ts = prior
                        outcomes.append(DUPLICATE)
                        continue
                if msg.cmd == CMD_PRIVATE and msg.dstid not in known and not _is_broadcast(msg):
                    outcomes.append(NO_RECEIVER)
                    continue
                max_id += 1
                msg.id = max_id
                msg.ts = ts
                rows.append(
                    (
                        max_id,
                        msg.userid,
                        msg.cmd,
                        msg.dstid,
                        max_id >> PARTITION_BITS,
                        msg.media,
                        msg.content,
                        msg.pic,
                        msg.url,
                        msg.memo,
                        msg.amount,
                        msg.cid or None,
                        ts,
                    )
                )
                outcomes.append(STORED)
            if rows:
                db.executemany(INSERT_MESSAGE_SQL, rows)
            db.execute("COMMIT")
        except BaseException:
            for msg in batch:
                msg.id = msg.ts = 0
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes, len(rows)

    # --- reads ----------------------------------------------------------------

    async def sync_page(self, uid: int, after: int, before: int, limit: int) -> list[Message]:
        """Messages for ``uid`` with ``after`` < id < ``before``, oldest first, at most ``limit``.

        Private messages to or from the user, and group messages of the user's
        groups sent after the user joined; nothing of anyone else's.
        """
        rows = await self._in_reader(
            _walk, SYNC_SQL, {"uid": uid}, after, before, limit, False, (uid,)
        )
        return [row_to_message(r) for r in rows]

    async def user_groups(self, uid: int) -> frozenset[int]:
        """Ids of the groups ``uid`` is a member of."""
        return (await self.group_ids_of((uid,))).get(uid, _NO_GROUPS)

    async def group_ids_of(self, uids: Collection[int]) -> dict[int, frozenset[int]]:
        """uid -> the ids of its groups, for the users in ``uids`` who have any."""
        if not uids:
            return {}
        marks = ",".join("?" * len(uids))
        sql = f"SELECT uid, gid FROM members WHERE uid IN ({marks})"
        rows: Any = None
        if self._point is not None:
            try:
                rows = self._point.execute(sql, list(uids)).fetchall()
            except sqlite3.OperationalError:
                rows = None  # busy for a moment: the reader's thread waits instead
        if rows is None:
            rows = await self._r.execute_fetchall(sql, list(uids))
        found: dict[int, set[int]] = {}
        for uid, gid in rows:
            found.setdefault(uid, set()).add(gid)
        return {uid: frozenset(gids) for uid, gids in found.items()}

    async def token_versions(self) -> dict[int, int]:
        """uid -> token version, for every user who ever revoked tokens."""
        async with self._r.execute(
            "SELECT id, token_version FROM users WHERE token_version > 0"
        ) as cur:
            return {r[0]: r[1] for r in await cur.fetchall()}

    async def token_version(self, uid: int) -> int:
        """The current token version of ``uid``; ``NotFoundError`` if no such user."""
        async with self._r.execute("SELECT token_version FROM users WHERE id = ?", (uid,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"no user {uid}")
        return int(row[0])

    async def max_message_id(self) -> int:
        async with self._r.execute("SELECT coalesce(max(id), 0) FROM messages") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def get_messages(self, ids: Sequence[int]) -> list[Message]:
        """The stored messages with these ids, in id order."""
        if not ids:
            return []
        sql = f"SELECT {_MSG_COLUMNS} FROM messages WHERE id IN ({','.join('?' * len(ids))})"
        async with self._r.execute(sql + " ORDER BY id", list(ids)) as cur:
            return [row_to_message(r) for r in await cur.fetchall()]

    # --- accounts and groups (admin CLI now, HTTP API later) -------------------

    async def create_user(
        self, mobile: str, passwd_hash: str, nickname: str = "", avatar: str = "", sex: str = "U"
    ) -> int:
        """Insert a user; ``StoreError`` if the mobile number is taken."""
        try:
            cur = await self._w.execute(
                "INSERT INTO users (mobile, passwd, nickname, avatar, sex, created_ms, created_id) "
                "VALUES (?, ?, ?, ?, ?, ?, (SELECT coalesce(max(id), 0) FROM messages))",
                (mobile, passwd_hash, nickname, avatar, sex, _now_ms()),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"mobile {mobile} is already registered") from None
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def create_group(
        self, name: str, owner: int, icon: str = "", cate: int = 0, memo: str = ""
    ) -> int:
        """Create a group owned (and joined) by ``owner``; return its id."""
        db = self._w
        await db.execute("BEGIN IMMEDIATE")
        try:
            if not await _exists(db, "users", owner):
                raise NotFoundError(f"no user {owner}")
            cur = await db.execute(
                "INSERT INTO communities (name, ownerid, icon, cate, memo, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, owner, icon, cate, memo, _now_ms()),
            )
            gid = cur.lastrowid
            assert gid is not None
            await _join(db, gid, owner)
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        return gid

    async def join_group(self, gid: int, uid: int) -> bool:
        """Make ``uid`` a member of ``gid``; False if it already was."""
        db = self._w
        await db.execute("BEGIN IMMEDIATE")
        try:
            if not await _exists(db, "communities", gid):
                raise NotFoundError(f"no group {gid}")
            if not await _exists(db, "users", uid):
                raise NotFoundError(f"no user {uid}")
            added = await _join(db, gid, uid)
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        return added

    # --- HTTP API: accounts, contacts, groups, history ------------------------
    #
    # Every write below runs under one lock: the writer connection is one
    # SQLite connection, and two coroutines interleaving statements on it would
    # share (and commit or roll back) each other's transaction. The message
    # writer (``start_writer``) does not take this lock, so a process that
    # serves the API should not also run the writer on the same ``Store``.

    _api_lock: asyncio.Lock | None = None

    def _write_lock(self) -> asyncio.Lock:
        if self._api_lock is None:
            self._api_lock = asyncio.Lock()
        return self._api_lock

    async def add_user(
        self, mobile: str, passwd_hash: str, nickname: str = "", avatar: str = "", sex: str = "U"
    ) -> int | None:
        """Insert a user and return its id; None if the mobile number is taken."""
        async with self._write_lock():
            try:
                return await self.create_user(mobile, passwd_hash, nickname, avatar, sex)
            except StoreError:
                return None

    async def user_by_mobile(self, mobile: str) -> UserRecord | None:
        """The user (password hash included) with this mobile number, or None."""
        row = await self._one(f"SELECT {_USER_COLUMNS} FROM users WHERE mobile = ?", (mobile,))
        return None if row is None else UserRecord(*row)

    async def user_by_id(self, uid: int) -> UserRecord | None:
        """The user (password hash included) with this id, or None."""
        row = await self._one(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (uid,))
        return None if row is None else UserRecord(*row)

    async def bump_token_version(self, uid: int) -> int:
        """Void every token of ``uid`` issued so far; the new token version."""
        async with self._write_lock():
            cur = await self._w.execute(
                "UPDATE users SET token_version = token_version + 1 WHERE id = ? "
                "RETURNING token_version",
                (uid,),
            )
            row = await cur.fetchone()
            await cur.close()
        if row is None:
            raise NotFoundError(f"no user {uid}")
        return int(row[0])

    async def add_friend(self, uid: int, dstid: int) -> bool:
        """Make ``uid`` and ``dstid`` friends both ways in one transaction.

        False if they already were (idempotent); ``NotFoundError`` if either
        user does not exist.
        """
        async with self._write_lock():
            db = self._w
            await db.execute("BEGIN IMMEDIATE")
            try:
                for row_id in (uid, dstid):
                    if not await _exists(db, "users", row_id):
                        raise NotFoundError(f"no user {row_id}")
                now = _now_ms()
                cur = await db.execute(
                    "INSERT OR IGNORE INTO friends (ownerid, dstid, created_ms) "
                    "VALUES (?, ?, ?), (?, ?, ?)",
                    (uid, dstid, now, dstid, uid, now),
                )
                added = cur.rowcount > 0
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return added

    async def friends(self, uid: int) -> list[UserRecord]:
        """The friends of ``uid``, oldest friendship first."""
        return await self._all(UserRecord,
            f"SELECT {_USER_COLUMNS_U} FROM friends f JOIN users u ON u.id = f.dstid "
            "WHERE f.ownerid = ? ORDER BY f.created_ms, u.id",
            (uid,),
        )

    async def add_group(
        self, name: str, owner: int, icon: str = "", cate: int = 0, memo: str = ""
    ) -> int:
        """``create_group`` under the API's write lock."""
        async with self._write_lock():
            return await self.create_group(name, owner, icon, cate, memo)

    async def add_member(self, gid: int, uid: int) -> bool:
        """``join_group`` under the API's write lock: False if already a member."""
        async with self._write_lock():
            return await self.join_group(gid, uid)

    async def leave_group(self, gid: int, uid: int) -> bool:
        """Remove ``uid`` from ``gid``; False if it was not a member."""
        cur = await self._w.execute("DELETE FROM members WHERE gid = ? AND uid = ?", (gid, uid))
        return cur.rowcount > 0

    async def set_banned(self, uid: int, banned: bool) -> bool:
        """Ban or unban ``uid``; False if it already was; ``NotFoundError`` if no such user."""
        db = self._w
        async with db.execute("SELECT banned FROM users WHERE id = ?", (uid,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"no user {uid}")
        if bool(row[0]) == banned:
            return False
        await db.execute("UPDATE users SET banned = ? WHERE id = ?", (int(banned), uid))
        return True

    async def banned_users(self) -> list[int]:
        """The ids of every banned user."""
        rows = await self._r.execute_fetchall("SELECT id FROM users WHERE banned != 0")
        return [int(r[0]) for r in rows]

    async def remove_member(self, gid: int, uid: int) -> bool:
        """Remove ``uid`` from ``gid``; False if it was not a member."""
        async with self._write_lock():
            cur = await self._w.execute(
                "DELETE FROM members WHERE gid = ? AND uid = ?", (gid, uid)
            )
            return cur.rowcount > 0

    async def group_by_id(self, gid: int) -> GroupRecord | None:
        """The group ``gid``, or None."""
        row = await self._one(f"SELECT {_GROUP_COLUMNS} FROM communities WHERE id = ?", (gid,))
        return None if row is None else GroupRecord(*row)

    async def groups_of(self, uid: int) -> list[GroupRecord]:
        """The groups ``uid`` is a member of, in the order joined."""
        return await self._all(GroupRecord,
            f"SELECT {_GROUP_COLUMNS_C} FROM members m JOIN communities c ON c.id = m.gid "
            "WHERE m.uid = ? ORDER BY m.created_ms, c.id",
            (uid,),
        )

    async def members_of(self, gid: int) -> list[UserRecord]:
        """The members of ``gid``, in the order they joined."""
        return await self._all(UserRecord,
            f"SELECT {_USER_COLUMNS_U} FROM members m JOIN users u ON u.id = m.uid "
            "WHERE m.gid = ? ORDER BY m.created_ms, u.id",
            (gid,),
        )

    async def joined_id(self, gid: int, uid: int) -> int | None:
        """The message id from which ``uid`` sees ``gid`` (its join), or None if not a member."""
        async with self._r.execute(
            "SELECT joined_id FROM members WHERE gid = ? AND uid = ?", (gid, uid)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def private_history(
        self, uid: int, peer: int, after: int, before: int, limit: int, newest: bool
    ) -> list[Message]:
        """Private messages between ``uid`` and ``peer`` with ``after`` < id < ``before``.

        At most ``limit``, in id order: the newest ones of the range if
        ``newest``, else the oldest.
        """
        sql = PRIVATE_HISTORY_SQL.format(order="DESC" if newest else "ASC")
        found = await self._in_reader(
            _walk, sql, {"a": uid, "b": peer}, after, before, limit, newest, (uid, peer)
        )
        rows = [row_to_message(r) for r in found]
        return rows[::-1] if newest else rows

    async def group_history(
        self, gid: int, after: int, before: int, limit: int, newest: bool
    ) -> list[Message]:
        """Messages of group ``gid`` with ``after`` < id < ``before``, like ``private_history``."""
        sql = GROUP_HISTORY_SQL.format(order="DESC" if newest else "ASC")
        async with self._r.execute(sql, (gid, after, before, limit)) as cur:
            rows = [row_to_message(r) for r in await cur.fetchall()]
        return rows[::-1] if newest else rows

    async def _one(self, sql: str, params: Sequence[Any]) -> Sequence[Any] | None:
        async with self._r.execute(sql, params) as cur:
            row = await cur.fetchone()
        return None if row is None else tuple(row)

    async def _all(self, kind: type[_R], sql: str, params: Sequence[Any]) -> list[_R]:
        rows = await self._r.execute_fetchall(sql, params)
        return [kind(*row) for row in rows]


async def _in_thread(db: aiosqlite.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(sqlite3 connection, *args)`` in ``db``'s thread.

    aiosqlite runs one function per call in its thread; ``_execute`` is how
    its own methods queue theirs (not public API: the version is pinned, and
    every store test goes through here).
    """

    def call() -> _T:
        return fn(db._conn, *args)

    result: _T = await db._execute(call)  # type: ignore[no-untyped-call]
    return result


def _name_thread(_db: sqlite3.Connection, name: str) -> None:
    """Name a connection's thread (run in it: ``_in_thread``), for top -H and the bench."""
    name_this_thread(name)
    threading.current_thread().name = name


async def _exists(db: aiosqlite.Connection, table: str, row_id: int) -> bool:
    async with db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)) as cur:
        return await cur.fetchone() is not None


async def _join(db: aiosqlite.Connection, gid: int, uid: int) -> bool:
    # joined_id: a new member syncs the group's messages from here on, not its past
    cur = await db.execute(
        "INSERT OR IGNORE INTO members (gid, uid, joined_id, created_ms) "
        "SELECT ?, ?, coalesce(max(id), 0), ? FROM messages",
        (gid, uid, _now_ms()),
    )
    return cur.rowcount == 1


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema {version} is newer than this chatd knows ({len(MIGRATIONS)})"
        )
    for number in range(version + 1, len(MIGRATIONS) + 1):
        log.info("migrating schema to %d", number)
        still = asyncio.ensure_future(_still_starting(number))
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        finally:
            still.cancel()


async def _still_starting(number: int) -> None:
    """While migration ``number`` runs, keep systemd from giving up on the start.

    A migration may take long (migration 2 rebuilds the messages table: ~5 s
    per million messages) and runs before READY=1, in the supervisor (the
    unit's main process), where it would outlast ``TimeoutStartSec`` and be
    killed and rolled back at every restart. ``EXTEND_TIMEOUT_USEC`` moves the
    deadline on while it runs; outside systemd this does nothing.
    """
    extend_us = int(3 * MIGRATION_NOTIFY_S * 1_000_000)
    while True:
        notify(f"EXTEND_TIMEOUT_USEC={extend_us}\nSTATUS=migrating the database schema to {number}")
        await asyncio.sleep(MIGRATION_NOTIFY_S)

# the HTTP API's views of users and groups
_USER_COLUMNS: Final = (
    "id, mobile, passwd, nickname, avatar, sex, memo, token_version, banned, created_ms"
)
_USER_COLUMNS_U: Final = ", ".join("u." + c.strip() for c in _USER_COLUMNS.split(","))
_GROUP_COLUMNS: Final = "id, name, ownerid, icon, cate, memo, created_ms"
_GROUP_COLUMNS_C: Final = ", ".join("c." + c.strip() for c in _GROUP_COLUMNS.split(","))


# every public coroutine speaks the store's errors, never SQLite's
for _name, _fn in list(vars(SqliteStore).items()):
    if not _name.startswith("_") and inspect.iscoroutinefunction(_fn):
        setattr(SqliteStore, _name, _translated(_fn))


# --- maintenance (chatd db …): plain sqlite3, online, next to a running node ---------

#: pages one step of an online backup copies before letting writers in again
BACKUP_STEP_PAGES: Final = 1024


def backup(path: Path, target: Path) -> int:
    """Copy the database at ``path`` to ``target`` while the node may write it
    (SQLite's backup API, in steps), then check the copy; its page count.

    Raises ``StoreError`` if there is no database or the copy is not sound.
    """
    if not path.exists():
        raise StoreError(f"no database at {path}")
    if target.exists():
        raise StoreError(f"{target} exists; not overwriting it")
    try:
        src = sqlite3.connect(_read_only_uri(path), uri=True, timeout=10)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst, pages=BACKUP_STEP_PAGES, sleep=0.005)
                pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise StoreError(f"backup failed: {exc}") from None
    problems = check(target)
    if problems:
        raise StoreError(f"the backup {target} is not sound: {problems[0]}")
    return pages


def check(path: Path) -> list[str]:
    """``PRAGMA integrity_check`` of the database at ``path``: its problems (none: [])."""
    if not path.exists():
        raise StoreError(f"no database at {path}")
    try:
        db = sqlite3.connect(_read_only_uri(path), uri=True, timeout=10)
        try:
            rows = [str(r[0]) for r in db.execute("PRAGMA integrity_check")]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"check failed: {exc}") from None
    return [] if rows == ["ok"] else rows


def vacuum(path: Path) -> tuple[int, int]:
    """Rebuild the database at ``path`` (the node's writers wait while it runs);
    its size in bytes before and after."""
    if not path.exists():
        raise StoreError(f"no database at {path}")
    before = path.stat().st_size
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"vacuum failed: {exc}") from None
    return before, path.stat().st_size
