"""The node's log when the node is one of many: the same writer, plus the
cluster's order.

A node of a cluster shares its store (``store.ChainStore``, PostgreSQL) with
the other nodes and hears them over NATS (``bus.nats``). Every commit, its
own or another node's, is a unit of the chain at positions ``(prev, last]``
(``log.chain``); the node hands its shards the units in position order only,
so each connection still receives in id order and its highest id is still a
safe resume point, whichever node committed what (docs/design.md, "Many
nodes"):

- its own batch: commit, publish (payloads for the users and groups it
  concerns, then the header), then answer and route it when the chain
  reaches it — at once, unless another node's unit below it has not come;
- another node's unit: route its messages to the shards that hold their
  users (no acks: their senders are elsewhere) and apply its routing
  changes, in place;
- what the bus did not bring (a payload this node needs, a unit whose
  header never came, everything while NATS was away) is read from the store
  after a short wait; a poll of the store's head finds units nobody
  announced (a node killed between its commit and its publish).

A user who comes online is placed (``Here``) at the point of the chain
where its groups were read, so that neither a message nor a join or leave
committed by another node in between falls through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from chatd.bus.frames import Acked, Deliver, Here
from chatd.bus.nats import Header, NodeBus, group_subject, user_subject
from chatd.errors import StoreError
from chatd.log.chain import Chain, Unit
from chatd.log.core import LOOKUP_BATCH, NO_PORT, Log, Submission
from chatd.store import (
    BROADCAST,
    DUPLICATE,
    EVENT_JOIN,
    EVENT_LEAVE,
    STORED,
    SYSTEM_USER,
    ChainStore,
    Event,
)
from chatd.wire import CMD_PRIVATE, Message

log = logging.getLogger("chatd.log.cluster")

#: how long a unit whose header came waits for a payload this node needs
#: before the node reads it from the store
PAYLOAD_WAIT_S: Final = 0.02
#: how long a gap in the chain (a header that did not come) waits before the
#: node reads it from the store
GAP_WAIT_S: Final = 0.1
#: how often the node asks the store for its head (units nobody announced)
POLL_S: Final = 1.0
#: rows one read of the chain from the store takes at most
READ_PAGE: Final = 5000
#: how long a read of the store that failed waits before it is tried again
RETRY_S: Final = 0.5
#: routing changes kept to place users whose groups were read before them
RECENT_EVENTS: Final = 10_000

_OWN_EVENTS: Final = "events"


class ClusterLog(Log):
    """The node's one writer in a cluster (see the module's docstring).

    ``servers``: the NATS URLs; ``node``: this node's name (in its headers).
    """

    store: ChainStore

    def __init__(
        self,
        store: ChainStore,
        *,
        node: str,
        servers: list[str],
        batch_max: int = 2048,
        queue_max: int = 100_000,
        commit_interval_s: float = 0.0,
        payload_wait_s: float = PAYLOAD_WAIT_S,
        gap_wait_s: float = GAP_WAIT_S,
        poll_s: float = POLL_S,
    ) -> None:
        super().__init__(store, batch_max=batch_max, queue_max=queue_max,
                         commit_interval_s=commit_interval_s)
        self.node = node
        self.payload_wait_s = payload_wait_s
        self.gap_wait_s = gap_wait_s
        self.poll_s = poll_s
        self.presence.watch = self._watch
        self.bus = NodeBus(
            servers,
            node,
            on_header=self._on_header,
            on_payload=self._on_payload,
            on_lost=self._on_lost,
            on_back=self._on_back,
        )
        self.chain = Chain(0, self._wants_user, self._wants_group)
        #: users whose groups were read at chain position ``at``, placed when
        #: the chain gets there: (at, port, uid, groups)
        self._deferred: list[tuple[int, int, int, frozenset[int]]] = []
        #: the routing changes released lately; every one above ``_recent_floor`` is here
        self._recent: deque[Event] = deque()
        self._recent_floor = 0
        self._timer: asyncio.TimerHandle | None = None
        self._gap_seen: tuple[int, float] | None = None
        self._head_seen: tuple[int, int] | None = None
        self._suspect = False
        self._poller: asyncio.Task[None] | None = None
        # figures
        self.remote_units = 0
        self.store_reads = 0

    # --- life -------------------------------------------------------------------------

    async def _start_point(self) -> int:
        # hear the others first, then read where the chain is: a unit committed
        # after the read is heard (or found by the poll)
        await self.bus.start()
        w = await self.store.head()
        self.chain = Chain(w, self._wants_user, self._wants_group)
        self._recent_floor = w
        return w

    async def start(self) -> None:
        await super().start()
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="log-poll")

    async def close(self) -> None:
        await super().close()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await self.bus.close()

    # --- this node's commits ------------------------------------------------------------

    def _committed(self, batch: list[Submission], outcomes: list[int]) -> None:
        span = self.store.last_span
        assert span is not None  # an append always takes positions
        prev, last = span
        users: set[int] = set()
        groups: set[int] = set()
        payloads: dict[str, list[Message]] = {}
        everyone: list[Message] = []
        stored: list[Message] = []
        for (_, _, msg), status in zip(batch, outcomes, strict=True):
            if status != STORED:
                continue
            stored.append(msg)
            if msg.cmd == CMD_PRIVATE:
                if msg.dstid == BROADCAST and msg.userid == SYSTEM_USER:
                    everyone.append(msg)
                    continue
                _add(payloads, users, msg.dstid, user_subject, msg)
                if msg.userid != msg.dstid:
                    _add(payloads, users, msg.userid, user_subject, msg)
            else:
                _add(payloads, groups, msg.dstid, group_subject, msg)
        self.bus.publish(
            Header(self.node, prev, last, sorted(users), sorted(groups), [], everyone),
            payloads,
        )
        if not self.chain.own(prev, last, (batch, outcomes), stored):
            self._answer_late(batch, outcomes)
        self._pump()

    def _answer_late(self, batch: list[Submission], outcomes: list[int]) -> None:
        """Acks for a batch of ours that a read of the store released already
        (its copies went out with it). The writer never reads a range its own
        commit is in, so this is our bug if it happens."""
        log.error("a batch of ours (%d messages) was released before its commit was", len(batch))
        for (port_id, seq, msg), status in zip(batch, outcomes, strict=True):
            if port_id != NO_PORT and status in (STORED, DUPLICATE):
                self._emit(port_id, Acked(seq, msg.id, msg.ts, status == STORED))

    def _changed(self, event: Event, changed: bool = True) -> None:
        recorded = self.store.last_event
        span = self.store.last_span
        if recorded is None or span is None:  # nothing changed: nothing to announce
            return
        prev, last = span
        self.bus.publish(Header(self.node, prev, last, events=[recorded]), {})
        self.chain.own(prev, last, _OWN_EVENTS, events=[recorded])
        self._pump()

    # --- what the other nodes committed ---------------------------------------------------

    def _on_header(self, header: Header) -> None:
        self.chain.header(
            header.prev, header.last, header.users, header.groups, header.events, header.everyone
        )
        self._pump()

    def _on_payload(self, prev: int, kind: str, key: int, msgs: list[Message]) -> None:
        self.chain.payload(prev, kind, key, msgs)
        if prev == self.chain.w:
            self._pump()

    def _wants_user(self, uid: int) -> bool:
        return uid in self.presence.users

    def _wants_group(self, gid: int) -> bool:
        return gid in self.presence.group_ports

    def _watch(self, kind: str, key: int, yes: bool) -> None:
        self.bus.want(kind, key, yes)
        if yes:
            self.chain.interest_added(kind, key)

    # --- releasing, in the chain's order ------------------------------------------------

    def _pump(self) -> None:
        chain = self.chain
        while (unit := chain.next()) is not None:
            self._release(unit)
            self.hw = chain.w
            if self._deferred:
                self._place_deferred()
        self._flush()
        if len(chain) and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self.payload_wait_s, self._check, chain.w)

    def _release(self, unit: Unit) -> None:
        own = unit.own
        if own is not None and own != _OWN_EVENTS:
            batch, outcomes = own
            self._route_batch(batch, outcomes)
            return
        if own is None:
            self.remote_units += 1
        for row in unit.rows():
            if isinstance(row, Message):
                self._deliver(row)
            else:
                self._remember(row)
                self._apply_event(row)

    def _deliver(self, msg: Message) -> None:
        """Route another node's message to the ports that hold its recipients."""
        presence = self.presence
        targets: Any
        if msg.cmd == CMD_PRIVATE:
            if msg.dstid == BROADCAST and msg.userid == SYSTEM_USER:
                targets = list(self._ports)
            else:
                targets = presence.ports_of(msg.dstid)
                if msg.userid != msg.dstid:
                    mine = presence.ports_of(msg.userid)
                    if mine:
                        targets = {*targets, *mine}
        else:
            targets = presence.group_targets(msg.dstid)
        if targets:
            deliver = Deliver(msg)
            for port in targets:
                self._emit(port, deliver)

    def _remember(self, event: Event) -> None:
        recent = self._recent
        recent.append(event)
        if len(recent) > RECENT_EVENTS:
            self._recent_floor = recent.popleft().id

    # --- placing users that come online ----------------------------------------------------

    async def _answer_onlines(self) -> None:
        pending, self._lookups = self._lookups[:LOOKUP_BATCH], self._lookups[LOOKUP_BATCH:]
        try:
            at, groups = await self.store.group_ids_at({uid for _, uid in pending})
        except StoreError as exc:
            log.error("reading the groups of %d users failed: %s; retrying", len(pending), exc)
            self._lookups[:0] = pending
            await asyncio.sleep(0.1)
            return
        for port_id, uid in pending:
            if port_id in self._ports:
                self._deferred.append((at, port_id, uid, groups.get(uid, frozenset())))
        self._place_deferred()
        self._flush()

    def _place_deferred(self) -> None:
        """Place the users whose groups were read at or below the release point.

        A user read at ``at`` below the release point missed the routing
        changes released since: they are applied to its groups from the recent
        ones (or its groups are read again, if those do not reach back)."""
        w = self.chain.w
        presence = self.presence
        waiting: list[tuple[int, int, int, frozenset[int]]] = []
        for item in self._deferred:
            at, port_id, uid, groups = item
            if at > w:
                waiting.append(item)
                continue
            if port_id not in self._ports:
                continue
            if presence.known(uid):
                mine = presence.add(uid, port_id)
            else:
                if at < w:
                    caught_up = self._catch_up(uid, groups, at)
                    if caught_up is None:
                        self._lookups.append((port_id, uid))
                        self._kick()
                        continue
                    groups = caught_up
                mine = presence.add(uid, port_id, groups)
            self._emit(port_id, Here(uid, sorted(mine), self.hw))
        self._deferred = waiting

    def _catch_up(self, uid: int, groups: frozenset[int], at: int) -> frozenset[int] | None:
        if at < self._recent_floor:
            return None
        mine = set(groups)
        for event in self._recent:
            if event.id > at and event.uid == uid:
                if event.kind == EVENT_JOIN:
                    mine.add(event.gid)
                elif event.kind == EVENT_LEAVE:
                    mine.discard(event.gid)
        return frozenset(mine)

    # --- what the bus did not bring ----------------------------------------------------------

    def _check(self, w0: int) -> None:
        """The timer: has the chain been stuck on the same thing long enough?"""
        self._timer = None
        chain = self.chain
        if not len(chain):
            return
        if chain.w != w0:
            self._pump()  # progress: watch the next wait
            return
        blocked = chain.blocked()
        if blocked is None:
            return  # payloads whose header has not come: the poll sees to them
        kind, after, upto = blocked
        if kind == "payload":
            self._read_later(after, upto)
            return
        now = time.monotonic()
        if self._gap_seen is None or self._gap_seen[0] != after:
            self._gap_seen = (after, now)
        elif now - self._gap_seen[1] >= self.gap_wait_s:
            self._gap_seen = None
            self._read_later(after, upto)
            return
        if self._loop is not None:
            self._timer = self._loop.call_later(self.payload_wait_s, self._check, chain.w)

    def _read_later(self, after: int, upto: int) -> None:
        self._enqueue(lambda: self._read(after, upto))

    def _enqueue(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Run ``op`` in the writer, between two of its steps (so never while
        this node's own commit is between the store and the chain)."""
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(_consume)
        self._ops.append((op, future))
        self._kick()

    async def _read(self, after: int, upto: int) -> None:
        chain = self.chain
        if after == chain.w:
            upto = chain.gap_end(upto)
        while after < upto and upto > chain.w:
            try:
                rows = await self.store.chain_range(after, upto, READ_PAGE)
            except StoreError as exc:
                log.warning("reading the chain (%d, %d] from the store failed: %s; retrying",
                            after, upto, exc)
                if self._timer is None and self._loop is not None:
                    self._timer = self._loop.call_later(RETRY_S, self._check, chain.w)
                return
            self.store_reads += 1
            end = rows[-1].id if len(rows) == READ_PAGE else upto
            replaced = chain.stored(after, end, rows)
            for own in replaced:
                if own != _OWN_EVENTS:
                    self._answer_late(*own)
            self._pump()
            after = end

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self._enqueue(self._look_at_head)

    async def _look_at_head(self) -> None:
        """Read what the store has above the release point that nobody announced:
        at once after NATS was away, else when it is still missing one poll later."""
        try:
            head = await self.store.head()
        except StoreError:
            self.store_ok = False
            raise
        self.store_ok = True
        w = self.chain.w
        if head <= w:
            self._head_seen = None
            return
        if self._suspect or (self._head_seen is not None and self._head_seen[0] == w):
            self._suspect = False
            self._head_seen = None
            await self._read(w, self.chain.gap_end(head))
        else:
            self._head_seen = (w, head)

    def _on_lost(self) -> None:
        self._suspect = True

    def _on_back(self) -> None:
        self._suspect = True
        if self._loop is not None:
            self._enqueue(self._look_at_head)

    def figures(self) -> dict[str, Any]:
        out = super().figures()
        out.update(
            {
                "chain_w": self.chain.w,
                "chain_pending": len(self.chain),
                "remote_units": self.remote_units,
                "store_reads": self.store_reads,
                "bus_up": self.bus.up,
                "bus_published": self.bus.published,
                "bus_dropped": self.bus.dropped,
                "bus_subscriptions": self.bus.subscriptions,
            }
        )
        return out


def _add(
    payloads: dict[str, list[Message]],
    keys: set[int],
    key: int,
    subject: Callable[[int], str],
    msg: Message,
) -> None:
    if key in keys:
        payloads[subject(key)].append(msg)
    else:
        keys.add(key)
        payloads[subject(key)] = [msg]


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a read of the chain failed: %s", future.exception())
