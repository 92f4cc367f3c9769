"""The cluster's order as one node sees it: which committed units may go to
the node's shards now. Pure bookkeeping, owned by the node's log.

Every write to a shared store (``store.ChainStore``) — a batch of messages,
or one routing change — occupies the positions ``(prev, last]``: ``prev`` is
the head it found under the store's chain lock, ``last`` the head it left.
So the units of all the nodes tile the positions without overlap, in commit
order, and a node that has released everything up to ``w`` may release the
unit whose ``prev`` is ``w``, and only that one (docs/design.md, "Many
nodes"). Ids inside a unit are its positions, so releasing units in this
order releases messages in id order.

Units reach a node from three places:

- its own log, right after the commit (``own``): complete;
- the other nodes, over the bus: a ``header`` that every node gets (the
  unit's positions, the users and groups it concerns, its routing changes
  and broadcasts inline) and ``payload``s, one per subject (a user, a
  group), that only the nodes subscribed to that subject get;
- the store (``stored``): a read of a range of positions, complete.

A node needs a unit's payload for a subject when it serves that subject at
the moment the unit is released (``wants``): an online user, a group with
online members. A header whose needed payload has not come (the node
subscribed after it was published, or the bus lost it) blocks the chain:
``blocked`` says so, and the caller reads the unit from the store after a
short wait. A header that never comes (its node died between its commit and
its publish, or the bus dropped it) leaves a gap below the next header: the
caller reads the gap from the store after a wait, too. The bus is a fast
hint; the store is the truth.

Nothing here does I/O or keeps time: the caller owns the timers and the
reads, and feeds their results back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from chatd.store import Event
from chatd.wire import Message

#: the most units a node keeps waiting (headers or payloads ahead of its
#: release point) before it drops what comes and reads it from the store later
MAX_PENDING_UNITS: Final = 20_000

Wants = Callable[[int], bool]


class Unit:
    """One unit of the chain, as far as this node has it."""

    __slots__ = (
        "prev",
        "last",
        "users",
        "groups",
        "msgs",
        "events",
        "got_users",
        "got_groups",
        "complete",
        "own",
        "missing",
    )

    def __init__(self, prev: int) -> None:
        self.prev = prev
        #: None until the header (or the node's own commit, or a store read) says
        self.last: int | None = None
        #: the subjects the unit concerns (from its header)
        self.users: Sequence[int] = ()
        self.groups: Sequence[int] = ()
        #: id -> message, what this node has of the unit's messages
        self.msgs: dict[int, Message] = {}
        self.events: list[Event] = []
        self.got_users: set[int] = set()
        self.got_groups: set[int] = set()
        #: every message and event of the unit is here (own unit, store read)
        self.complete = False
        #: the node's own commit: what the log needs to answer its shards
        self.own: Any = None
        #: (users, groups) still needed, computed when the unit is next in line
        self.missing: tuple[set[int], set[int]] | None = None

    def rows(self) -> list[Message | Event]:
        """The unit's messages and routing changes, in id order."""
        rows: list[Message | Event] = [*self.msgs.values(), *self.events]
        rows.sort(key=_row_id)
        return rows


def _row_id(row: Message | Event) -> int:
    return row.id


class Chain:
    """The units ahead of this node's release point ``w``, and what they lack.

    ``wants_user(uid)`` / ``wants_group(gid)``: whether the node serves that
    subject now (its log's presence).
    """

    def __init__(self, w: int, wants_user: Wants, wants_group: Wants) -> None:
        #: everything up to here is released
        self.w = w
        self._wants_user = wants_user
        self._wants_group = wants_group
        self._units: dict[int, Unit] = {}
        #: units dropped for want of room (their content is read from the store)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._units)

    def _unit(self, prev: int) -> Unit | None:
        """The unit starting at ``prev``, made if there is room; None if stale or full."""
        if prev < self.w:
            return None
        unit = self._units.get(prev)
        if unit is None:
            if len(self._units) >= MAX_PENDING_UNITS:
                self.dropped += 1
                return None
            unit = self._units[prev] = Unit(prev)
        return unit

    # --- what arrives ---------------------------------------------------------------

    def header(
        self,
        prev: int,
        last: int,
        users: Sequence[int] = (),
        groups: Sequence[int] = (),
        events: Iterable[Event] = (),
        everyone: Iterable[Message] = (),
    ) -> None:
        """Another node committed ``(prev, last]``; ``everyone``: its messages for
        every user (broadcasts), carried in the header itself."""
        if last <= self.w:
            return
        unit = self._unit(prev)
        if unit is None or unit.last is not None:
            return
        unit.last = last
        unit.users = users
        unit.groups = groups
        unit.events.extend(events)
        for msg in everyone:
            unit.msgs[msg.id] = msg

    def payload(self, prev: int, kind: str, key: int, msgs: Iterable[Message]) -> None:
        """Messages of the unit at ``prev`` for user (``kind`` "u") or group ("g") ``key``."""
        unit = self._unit(prev)
        if unit is None:
            return
        for msg in msgs:
            unit.msgs[msg.id] = msg
        got, missing = (
            (unit.got_users, 0) if kind == "u" else (unit.got_groups, 1)
        )
        got.add(key)
        if unit.missing is not None:
            unit.missing[missing].discard(key)

    def own(self, prev: int, last: int, own: Any, msgs: Iterable[Message] = (),
            events: Iterable[Event] = ()) -> bool:
        """This node committed ``(prev, last]``; ``own`` is what its log routes.

        False if the release point is past the unit's start (a store read
        covered it, or part of it: the caller must not lose what ``own``
        answers)."""
        if prev < self.w:
            return False
        unit = self._units.get(prev)
        if unit is None:
            unit = self._units[prev] = Unit(prev)
        unit.last = last
        unit.complete = True
        unit.own = own
        unit.msgs = {m.id: m for m in msgs}
        unit.events = list(events)
        unit.missing = None
        return True

    def stored(self, after: int, upto: int, rows: Iterable[Message | Event]) -> list[Any]:
        """A read of positions ``(after, upto]`` from the store: every message
        and routing change committed there.

        It becomes one complete unit in place of whatever was known of that
        range. Returns the ``own`` values of the node's own units it replaced
        (normally none: the log never reads a range its own commit is in).
        """
        replaced: list[Any] = []
        if upto <= self.w:
            return replaced
        if after < self.w:
            # units were released while the read ran: keep what lies above them
            after = self.w
            rows = [r for r in rows if r.id > after]
        for prev in [p for p in self._units if after <= p < upto]:
            old = self._units.pop(prev)
            if old.own is not None:
                replaced.append(old.own)
        unit = self._units[after] = Unit(after)
        unit.last = upto
        unit.complete = True
        for row in rows:
            if isinstance(row, Message):
                unit.msgs[row.id] = row
            else:
                unit.events.append(row)
        return replaced

    def interest_added(self, kind: str, key: int) -> None:
        """The node now serves user (``kind`` "u") or group ("g") ``key``: the
        unit next in line needs its payload too, if it concerns it."""
        unit = self._units.get(self.w)
        if unit is None or unit.missing is None or unit.complete:
            return
        if kind == "u":
            if key in unit.users and key not in unit.got_users:
                unit.missing[0].add(key)
        elif key in unit.groups and key not in unit.got_groups:
            unit.missing[1].add(key)

    # --- what goes out ----------------------------------------------------------------

    def next(self) -> Unit | None:
        """The unit to release now (the release point moves past it), or None."""
        unit = self._units.get(self.w)
        if unit is None or unit.last is None:
            return None
        if not unit.complete:
            missing = unit.missing
            if missing is None:
                missing = unit.missing = self._missing(unit)
            if missing[0] or missing[1]:
                return None
        del self._units[self.w]
        self.w = unit.last
        if len(self._units) and min(self._units) < self.w:
            for prev in [p for p in self._units if p < self.w]:
                del self._units[prev]
        return unit

    def _missing(self, unit: Unit) -> tuple[set[int], set[int]]:
        wants_user, wants_group = self._wants_user, self._wants_group
        return (
            {u for u in unit.users if u not in unit.got_users and wants_user(u)},
            {g for g in unit.groups if g not in unit.got_groups and wants_group(g)},
        )

    def gap_end(self, upto: int) -> int:
        """Where a read of a gap from ``w`` should stop: ``upto`` (a committed
        head), or the first unit above ``w`` this node knows the positions of,
        if that comes first (the node's own units are never read back)."""
        for prev, unit in self._units.items():
            if unit.last is not None and self.w < prev < upto:
                upto = prev
        return upto

    def blocked(self) -> tuple[str, int, int] | None:
        """Why nothing can be released now, if something waits:

        - ``("payload", prev, last)``: the next unit lacks payloads this node needs;
        - ``("gap", w, upto)``: no header for the positions from ``w`` up to the
          next unit this node has a header of (``upto``);
        - None: nothing waits (or only payloads whose header has not come,
          with nothing after them: nothing says a gap yet).
        """
        unit = self._units.get(self.w)
        if unit is not None and unit.last is not None:
            if unit.complete:
                return None
            if unit.missing is None:
                unit.missing = self._missing(unit)
            if unit.missing[0] or unit.missing[1]:
                return ("payload", unit.prev, unit.last)
            return None
        heads = [p for p, u in self._units.items() if u.last is not None and p > self.w]
        if heads:
            return ("gap", self.w, min(heads))
        return None
