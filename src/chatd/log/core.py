"""The node's ordered log: the one writer of a node, and its router.

Every change that affects live routing goes through here and nowhere else:
messages from every shard, group joins and leaves, token revocations, bans.
One task (``_run``) takes them in turn, so their order is the order of the
store's ids (docs/design.md, invariants 2 and 5):

1. users that came online whose groups must be read (one query for all),
   each answered with ``Here(uid, groups, hw)`` at this point of the order;
2. routing changes (``Control``), each committed alone, then announced to
   the shards concerned at this point;
3. a batch of queued messages (at most ``batch_max``), one transaction
   (group commit), then routed.

Routing after a commit: the shard that submitted a message gets ``Acked``
(or ``Refused``), every other shard that holds a recipient gets ``Deliver``
once; each shard gets one ``Batch`` per commit, items in id order, with the
high-water id. A shard with nothing to deliver gets nothing. Presence
(``log.presence``) says which shards hold whom; no shard knows more than
its own connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

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
from chatd.errors import NotFoundError, StoreError, StoreUnavailable
from chatd.log.presence import Presence
from chatd.store import (
    BROADCAST,
    DUPLICATE,
    EVENT_BAN,
    EVENT_JOIN,
    EVENT_LEAVE,
    EVENT_REVOKE,
    EVENT_UNBAN,
    NO_RECEIVER,
    STORED,
    SYSTEM_USER,
    Event,
    Store,
)
from chatd.wire import (
    CMD_GROUP,
    CMD_PRIVATE,
    ERR_BUSY,
    ERR_NOT_FOUND,
    ERR_SERVER,
    MEDIA_TEXT,
    Message,
)

log = logging.getLogger("chatd.log")

#: most users whose groups one store query reads
LOOKUP_BATCH: Final = 500
#: upper bounds of the commit-latency histogram (seconds) and of the batch sizes
COMMIT_S_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Port(Protocol):
    """The log's view of a connected shard."""

    def send(self, items: list[AnyItem], hw: int) -> None:
        """Deliver ``items`` (in order) and the high-water ``hw`` to the shard."""


Submission = tuple[int, int, Message]  # (port id, the shard's seq, message)
#: the port of a message no shard submitted (a broadcast)
NO_PORT: Final = 0


class Log:
    """The node's one writer: group commit, ids, dedupe, presence, routing.

    Implements ``chatd.bus.Control`` for the API. Start with ``await
    log.start()``; ``close`` commits what is queued first.
    """

    def __init__(
        self,
        store: Store,
        *,
        batch_max: int = 2048,
        queue_max: int = 100_000,
        commit_interval_s: float = 0.0,
    ) -> None:
        self.store = store
        self.batch_max = batch_max
        self.queue_max = queue_max
        #: the least time between two commits' starts under load (``_pace``)
        self.commit_interval_s = commit_interval_s
        self._last_commit = 0.0
        self.presence = Presence()
        #: the highest id committed and routed
        self.hw = 0
        self._ports: dict[int, Port] = {}
        self._next_port = 0
        self._queue: deque[Submission] = deque()
        self._lookups: list[tuple[int, int]] = []
        self._ops: deque[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]] = deque()
        self._out: dict[int, list[AnyItem]] = {}
        self._flush_soon = False
        self._wake: asyncio.Event | None = None
        #: set while the writer paces (``_pace``): a full batch or a close ends the wait
        self._full: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: token versions of users who ever revoked, and banned users (for Welcome)
        self._versions: dict[int, int] = {}
        self._banned: set[int] = set()
        #: whether the store answered the last time the log asked it something
        self.store_ok = True
        # figures
        self.batches = 0
        self.committed = 0
        self.commit_s = _Histogram(COMMIT_S_BUCKETS)
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)

    # --- life -----------------------------------------------------------------

    async def start(self) -> None:
        """Read where the store is and start the writer."""
        self._loop = asyncio.get_running_loop()
        self.hw = await self._start_point()
        self._versions = await self.store.token_versions()
        self._banned = set(await self.store.banned_users())
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = self._loop.create_task(self._run(), name="log-writer")

    async def _start_point(self) -> int:
        """The high-water id the node starts from."""
        return await self.store.max_message_id()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed and routed."""
        assert self._idle is not None
        while self._pending():
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> None:
        """Commit what is queued, then stop the writer (the store stays open)."""
        if self._task is None:
            return
        if self._full is not None:
            self._full.set()  # what is queued goes now, not after the interval
        await self.flush()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _pending(self) -> bool:
        return bool(self._queue or self._lookups or self._ops) or self._busy

    _busy = False

    @property
    def busy(self) -> bool:
        """Whether the writer is in the middle of a step (a read, a change, a commit)."""
        return self._busy

    # --- ports (shards) ----------------------------------------------------------

    def attach(self, port: Port) -> tuple[int, Welcome]:
        """A shard connected: its port id, and the ``Welcome`` to send it first."""
        self._next_port += 1
        self._ports[self._next_port] = port
        return self._next_port, Welcome(
            hw=self.hw, versions=dict(self._versions), banned=sorted(self._banned)
        )

    def detach(self, port_id: int) -> None:
        """A shard is gone: forget what it held. Its queued messages still
        commit (their senders retry and are acked with the same id)."""
        self._ports.pop(port_id, None)
        self._out.pop(port_id, None)
        self.presence.drop_port(port_id)
        self._lookups = [(p, u) for p, u in self._lookups if p != port_id]

    @property
    def ports(self) -> int:
        return len(self._ports)

    def submit(self, port_id: int, seq: int, msg: Message) -> bool:
        """Queue a validated message; False if the queue is full (the shard answers 503)."""
        if len(self._queue) >= self.queue_max:
            return False
        self._queue.append((port_id, seq, msg))
        self._kick()
        if self._full is not None and len(self._queue) >= self.batch_max:
            self._full.set()
        return True

    def online(self, port_id: int, uid: int) -> None:
        """``port_id`` holds its first connection of ``uid``; answered with ``Here``."""
        if port_id not in self._ports:
            return
        if self.presence.known(uid):
            groups = self.presence.add(uid, port_id)
            self._emit(port_id, Here(uid, sorted(groups), self.hw))
            self._schedule_flush()
        else:
            self._lookups.append((port_id, uid))
            self._kick()

    def offline(self, port_id: int, uid: int) -> None:
        """``port_id`` holds no connection of ``uid`` any more."""
        self.presence.remove(uid, port_id)

    # --- control: the routing changes (chatd.bus.Control) -------------------------

    async def create_group(
        self, name: str, owner: int, icon: str = "", cate: int = 0, memo: str = ""
    ) -> int:
        async def op() -> int:
            gid = await self.store.create_group(name, owner, icon, cate, memo)
            self._changed(Event(0, EVENT_JOIN, owner, gid))
            return gid

        return int(await self._control(op))

    async def join_group(self, gid: int, uid: int) -> bool:
        async def op() -> bool:
            added = await self.store.join_group(gid, uid)
            if added:
                self._changed(Event(0, EVENT_JOIN, uid, gid))
            return added

        return bool(await self._control(op))

    async def leave_group(self, gid: int, uid: int) -> bool:
        async def op() -> bool:
            removed = await self.store.leave_group(gid, uid)
            if removed:
                self._changed(Event(0, EVENT_LEAVE, uid, gid))
            return removed

        return bool(await self._control(op))

    async def revoke_tokens(self, uid: int) -> int:
        async def op() -> int:
            version = await self.store.bump_token_version(uid)
            self._changed(Event(0, EVENT_REVOKE, uid, version=version))
            return version

        return int(await self._control(op))

    async def set_banned(self, uid: int, banned: bool) -> bool:
        async def op() -> bool:
            changed = await self.store.set_banned(uid, banned)
            self._changed(Event(0, EVENT_BAN if banned else EVENT_UNBAN, uid), changed)
            return changed

        return bool(await self._control(op))

    async def broadcast(self, text: str, gid: int | None = None) -> int:
        """A system message (sender ``SYSTEM_USER``) to every user, online or not,
        or to the members of group ``gid``: stored and ordered like any other
        (sync returns it); the id it was stored as."""
        if gid is not None and await self.store.group_by_id(gid) is None:
            raise NotFoundError(f"no group {gid}")
        msg = Message(
            userid=SYSTEM_USER,
            cmd=CMD_PRIVATE if gid is None else CMD_GROUP,
            dstid=BROADCAST if gid is None else gid,
            media=MEDIA_TEXT,
            content=text,
        )

        async def op() -> int:
            [status] = await self.store.append([msg])
            if status != STORED:
                raise StoreError(f"the broadcast was not stored ({status})")
            self.committed = self.store.committed
            self._committed([(NO_PORT, 0, msg)], [status])
            return msg.id

        return int(await self._control(op))

    def _changed(self, event: Event, changed: bool = True) -> None:
        """A routing change was committed: announce it at this point of the order.

        (A node of a cluster announces it when its place in the cluster's
        order comes: ``ClusterLog``.)
        """
        self._apply_event(event)

    def _apply_event(self, event: Event) -> None:
        """What a routing change means for the shards: who must learn it."""
        kind, uid = event.kind, event.uid
        if kind == EVENT_JOIN:
            self._announce_join(uid, event.gid)
        elif kind == EVENT_LEAVE:
            for port in self.presence.leave(uid, event.gid):
                self._emit(port, Left(uid, event.gid))
        elif kind == EVENT_REVOKE:
            self._versions[uid] = event.version
            self._emit_all(Revoked(uid, event.version))
        elif kind == EVENT_BAN:
            self._banned.add(uid)
            self._emit_all(Banned(uid))
        elif kind == EVENT_UNBAN:
            self._banned.discard(uid)
            self._emit_all(Unbanned(uid))

    def _announce_join(self, uid: int, gid: int) -> None:
        for port in self.presence.join(uid, gid):
            self._emit(port, Joined(uid, gid))

    async def _control(self, op: Callable[[], Awaitable[Any]]) -> Any:
        if self._task is None:
            raise StoreUnavailable("the log is not running")
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._ops.append((op, future))
        self._kick()
        return await future

    # --- the writer ----------------------------------------------------------------

    def _kick(self) -> None:
        wake = self._wake
        if wake is not None:
            wake.set()

    async def _run(self) -> None:
        wake = self._wake
        idle = self._idle
        assert wake is not None and idle is not None
        while True:
            if not (self._queue or self._lookups or self._ops):
                idle.set()
                wake.clear()
                await wake.wait()
            self._busy = True
            try:
                if self._lookups:
                    await self._answer_onlines()
                while self._ops:
                    op, future = self._ops.popleft()
                    try:
                        result = await op()
                    except Exception as exc:  # the caller gets it
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(result)
                    self._flush()
                if self._queue:
                    await self._pace()
                    await self._commit()
            except Exception:  # our bug: log it, keep the writer alive
                log.exception("the log's writer failed a step")
            finally:
                self._busy = False

    async def _pace(self) -> None:
        """Let a batch grow when commits come close together.

        Under load a commit starts as soon as the previous one ended, so
        batches stay as small as one commit's time lets them (20 messages at
        20k/s): every commit writes its hot pages again and pays its own
        transaction. When the last commit started less than
        ``commit_interval_s`` ago, wait out the rest of that interval (or
        until a full batch is queued): commits are then at most 1/interval
        per second, batches bigger, pages written once for more messages. A
        message after a quiet spell is committed at once.
        """
        interval = self.commit_interval_s
        if interval <= 0:
            return
        loop = self._loop
        assert loop is not None
        wait = self._last_commit + interval - loop.time()
        if wait > 0 and len(self._queue) < self.batch_max:
            full = self._full = asyncio.Event()
            try:
                await asyncio.wait_for(full.wait(), wait)
            except TimeoutError:
                pass
            finally:
                self._full = None
        self._last_commit = loop.time()

    async def _answer_onlines(self) -> None:
        pending, self._lookups = self._lookups[:LOOKUP_BATCH], self._lookups[LOOKUP_BATCH:]
        try:
            groups = await self.store.group_ids_of({uid for _, uid in pending})
        except StoreError as exc:
            log.error("reading the groups of %d users failed: %s; retrying", len(pending), exc)
            self._lookups[:0] = pending
            await asyncio.sleep(0.1)
            return
        for port_id, uid in pending:
            if port_id not in self._ports:
                continue
            mine = self.presence.add(uid, port_id, groups.get(uid, ()))
            self._emit(port_id, Here(uid, sorted(mine), self.hw))
        self._flush()

    async def _commit(self) -> None:
        queue = self._queue
        n = min(len(queue), self.batch_max)
        batch = [queue.popleft() for _ in range(n)]
        msgs = [m for _, _, m in batch]
        started = time.perf_counter()
        try:
            outcomes = await self.store.append(msgs)
        except StoreUnavailable as exc:
            self.store_ok = False
            log.error("a batch of %d was not stored: %s", n, exc)
            for port_id, seq, _ in batch:
                self._emit(port_id, Refused(seq, ERR_BUSY, "store unavailable, retry"))
            self._flush()
            return
        except Exception:
            log.exception("a batch of %d was not stored", n)
            for port_id, seq, _ in batch:
                self._emit(port_id, Refused(seq, ERR_SERVER, "message not stored, retry"))
            self._flush()
            return
        self.store_ok = True
        self._count_commit(n, time.perf_counter() - started)
        self._committed(batch, outcomes)

    def _committed(self, batch: list[Submission], outcomes: list[int]) -> None:
        """A batch is stored: answer and route it at this point of the order.

        (A node of a cluster does it when the batch's place in the cluster's
        order comes: ``ClusterLog``.)
        """
        self._route_batch(batch, outcomes)
        self._flush()

    def _route_batch(self, batch: list[Submission], outcomes: list[int]) -> None:
        """Acks to the ports that submitted, copies to every other port concerned."""
        presence = self.presence
        emit = self._emit
        hw = self.hw
        for (port_id, seq, msg), status in zip(batch, outcomes, strict=True):
            if status == STORED:
                if port_id != NO_PORT:
                    emit(port_id, Acked(seq, msg.id, msg.ts, True))
                deliver: Deliver | None = None
                if msg.cmd == CMD_PRIVATE:
                    if msg.dstid == BROADCAST and msg.userid == SYSTEM_USER:
                        targets: Any = list(self._ports)
                    else:
                        targets = presence.ports_of(msg.dstid)
                        if msg.dstid != msg.userid:
                            mine = presence.ports_of(msg.userid)
                            # the sender's other devices on other shards (most
                            # senders have one device: no set to build)
                            if mine and (len(mine) > 1 or port_id not in mine):
                                targets = {*targets, *mine}
                else:
                    targets = presence.group_targets(msg.dstid)
                for port in targets:
                    if port != port_id:
                        if deliver is None:
                            deliver = Deliver(msg)
                        emit(port, deliver)
                if msg.id > hw:
                    hw = msg.id
            elif status == DUPLICATE:
                emit(port_id, Acked(seq, msg.id, msg.ts, False))
            elif status == NO_RECEIVER:
                emit(port_id, Refused(seq, ERR_NOT_FOUND, f"no user {msg.dstid}"))
        self.hw = hw

    def _count_commit(self, n: int, seconds: float) -> None:
        self.batches += 1
        self.batch_size.observe(n)
        self.commit_s.observe(seconds)
        self.committed = self.store.committed

    # --- output ------------------------------------------------------------------

    def _emit(self, port_id: int, item: AnyItem) -> None:
        out = self._out.get(port_id)
        if out is None:
            if port_id not in self._ports:
                return  # that shard is gone
            self._out[port_id] = [item]
        else:
            out.append(item)

    def _emit_all(self, item: AnyItem) -> None:
        for port_id in self._ports:
            self._emit(port_id, item)

    def _schedule_flush(self) -> None:
        if not self._flush_soon and self._loop is not None:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._out:
            return
        out, self._out = self._out, {}
        hw = self.hw
        for port_id, items in out.items():
            port = self._ports.get(port_id)
            if port is None:
                continue
            try:
                port.send(items, hw)
            except Exception:
                log.exception("sending a batch to shard port %d failed", port_id)

    def figures(self) -> dict[str, Any]:
        """What the log reports (status, metrics)."""
        return {
            "committed": self.committed,
            "batches": self.batches,
            "queued": len(self._queue),
            "hw": self.hw,
            "ports": len(self._ports),
            "online_users": len(self.presence.users),
            "store_ok": self.store_ok,
            "commit_seconds": self.commit_s.figures(),
            "batch_size": self.batch_size.figures(),
        }


class _Histogram:
    """Counts of observations per bucket, reported the way Prometheus wants
    them: cumulative, with the +Inf bucket."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def figures(self) -> dict[str, Any]:
        buckets = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            buckets.append([bound, total])
        return {"buckets": buckets, "sum": self.sum, "count": self.count}
