"""Presence: which shards (ports) hold which users, and so which shards a
message must reach. Pure bookkeeping, owned by the node's log.

A shard reports a user when it gets the user's first connection and again
when it loses the last one; the log keeps, per user, the set of ports that
hold it and the user's groups (read once, when the user first comes online
anywhere on the node, and kept right by the routing changes that go through
the log), and per group a reference count of members per port. A private
message then goes to the ports of its receiver and of its sender (the
sender's other devices), a group message to the ports with online members —
each port once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

#: told when the node starts or stops serving a subject: ("u", uid, True), ("g", gid, False)…
Watch = Callable[[str, int, bool], None]

_NO_PORTS: frozenset[int] = frozenset()
_NO_GROUPS: frozenset[int] = frozenset()


class Presence:
    """uid → ports, uid → groups (online users only), gid → {port: members}.

    A user's ports are a frozenset shared by every user on the same ports
    (``_ports``: there are few shards, so few distinct sets), and users in no
    group share one empty set: an online user costs its dict entries, not two
    sets of its own (~430 bytes each at 10k connections).
    """

    def __init__(self, watch: Watch | None = None) -> None:
        #: told when a user gets its first port here or loses its last, and when
        #: a group gets its first online member here or loses its last (the
        #: node's subscriptions in a cluster)
        self.watch = watch
        self.users: dict[int, frozenset[int]] = {}
        self.groups_of: dict[int, frozenset[int]] = {}
        self.group_ports: dict[int, dict[int, int]] = {}
        #: the one instance of each set of ports in use
        self._ports: dict[frozenset[int], frozenset[int]] = {}

    def _interned(self, ports: frozenset[int]) -> frozenset[int]:
        return self._ports.setdefault(ports, ports)

    def known(self, uid: int) -> bool:
        """Whether the groups of ``uid`` are known (it is online somewhere)."""
        return uid in self.groups_of

    def add(self, uid: int, port: int, groups: Collection[int] | None = None) -> frozenset[int]:
        """``port`` holds ``uid`` now; ``groups`` is needed unless it is ``known``.

        Returns the user's groups. Adding a port twice changes nothing.
        """
        current = self.groups_of.get(uid)
        if current is None:
            if groups is None:
                raise ValueError(f"the groups of user {uid} are not known")
            current = self.groups_of[uid] = frozenset(groups) if groups else _NO_GROUPS
        ports = self.users.get(uid, _NO_PORTS)
        if port not in ports:
            self.users[uid] = self._interned(ports | {port})
            if not ports and self.watch is not None:
                self.watch("u", uid, True)
            for gid in current:
                self._count(gid, port, 1)
        return current

    def remove(self, uid: int, port: int) -> None:
        """``port`` holds no connection of ``uid`` any more."""
        ports = self.users.get(uid)
        if ports is None or port not in ports:
            return
        ports = ports - {port}
        for gid in self.groups_of.get(uid, ()):
            self._count(gid, port, -1)
        if ports:
            self.users[uid] = self._interned(ports)
        else:
            del self.users[uid]
            self.groups_of.pop(uid, None)
            if self.watch is not None:
                self.watch("u", uid, False)

    def drop_port(self, port: int) -> None:
        """``port`` is gone (its shard died or disconnected): forget what it held."""
        for uid in [u for u, ports in self.users.items() if port in ports]:
            self.remove(uid, port)
        # port ids are not reused: the sets with this one are never needed again
        self._ports = {k: v for k, v in self._ports.items() if port not in k}

    def join(self, uid: int, gid: int) -> frozenset[int]:
        """``uid`` joined ``gid``: the ports that hold ``uid`` (they must learn it)."""
        groups = self.groups_of.get(uid)
        if groups is None:
            return _NO_PORTS
        if gid not in groups:
            self.groups_of[uid] = groups | {gid}
            for port in self.users.get(uid, ()):
                self._count(gid, port, 1)
        return self.users.get(uid, _NO_PORTS)

    def leave(self, uid: int, gid: int) -> frozenset[int]:
        """``uid`` left ``gid``: the ports that hold ``uid``."""
        groups = self.groups_of.get(uid)
        if groups is None:
            return _NO_PORTS
        if gid in groups:
            self.groups_of[uid] = groups - {gid}
            for port in self.users.get(uid, ()):
                self._count(gid, port, -1)
        return self.users.get(uid, _NO_PORTS)

    def ports_of(self, uid: int) -> Collection[int]:
        """The ports that hold a connection of ``uid``."""
        return self.users.get(uid, _NO_PORTS)

    def group_targets(self, gid: int) -> Iterable[int]:
        """The ports with an online member of ``gid``."""
        return self.group_ports.get(gid, {}).keys()

    def _count(self, gid: int, port: int, delta: int) -> None:
        counts = self.group_ports.get(gid)
        if counts is None:
            counts = self.group_ports[gid] = {}
            if self.watch is not None:
                self.watch("g", gid, True)
        n = counts.get(port, 0) + delta
        if n > 0:
            counts[port] = n
        else:
            counts.pop(port, None)
            if not counts:
                del self.group_ports[gid]
                if self.watch is not None:
                    self.watch("g", gid, False)
