"""The client registry of one shard: who is online here, and in which groups.

``uid -> connections`` lives in striped dicts (stripe = uid & mask), each
stripe with its own lock, as the seed's read-mostly RW map. On the event loop
reads take no lock (a dict read is atomic under the GIL and nothing on the
loop can interleave with it); writers take the stripe's lock so that threads
off the loop (the admin channel, metrics) can take a consistent snapshot of a
stripe. Striping also lets the idle sweep walk the registry a stripe at a time
without stalling the loop.

The group index maps gid -> the local connections of online members, kept
right on connect, disconnect, join and leave, so a group send touches only
those connections and never scans all clients.

Connections are opaque here: any object with ``uid`` and ``groups`` attributes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Final

STRIPES: Final = 64
_MASK: Final = STRIPES - 1


class Registry:
    """uid -> connections, gid -> local member connections, and a cap."""

    def __init__(self, max_conns: int) -> None:
        self.max_conns = max_conns
        self._stripes: list[dict[int, list[Any]]] = [{} for _ in range(STRIPES)]
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        self.groups: dict[int, set[Any]] = {}
        #: connections upgraded on this shard (registered or still loading)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.max_conns

    @property
    def users(self) -> int:
        return sum(len(s) for s in self._stripes)

    def get(self, uid: int) -> list[Any] | None:
        """The live connections of ``uid`` on this shard, or None."""
        return self._stripes[uid & _MASK].get(uid)

    def reserve(self) -> None:
        """Count a connection from its upgrade on, before it is registered, so
        that handshakes arriving together cannot pass the cap together."""
        self.count += 1

    def release(self) -> None:
        """Uncount a connection that is gone (registered or not)."""
        self.count -= 1

    def add(self, conn: Any) -> None:
        """Register ``conn`` under its uid (another device of the user is kept)."""
        uid = conn.uid
        with self._locks[uid & _MASK]:
            stripe = self._stripes[uid & _MASK]
            conns = stripe.get(uid)
            if conns is None:
                stripe[uid] = [conn]
            else:
                conns.append(conn)

    def remove(self, conn: Any) -> bool:
        """Forget ``conn`` and take it out of its groups; False if unknown."""
        uid = conn.uid
        with self._locks[uid & _MASK]:
            stripe = self._stripes[uid & _MASK]
            conns = stripe.get(uid)
            if conns is None or conn not in conns:
                return False
            conns.remove(conn)
            if not conns:
                del stripe[uid]
        for gid in conn.groups:
            self.leave(conn, gid)
        return True

    def join(self, conn: Any, gid: int) -> None:
        """Put ``conn`` in the group index of ``gid``."""
        members = self.groups.get(gid)
        if members is None:
            self.groups[gid] = {conn}
        else:
            members.add(conn)

    def leave(self, conn: Any, gid: int) -> None:
        """Take ``conn`` out of the group index of ``gid``."""
        members = self.groups.get(gid)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.groups[gid]

    def stripe(self, index: int) -> list[Any]:
        """A snapshot of the connections in stripe ``index``."""
        with self._locks[index]:
            return [c for conns in self._stripes[index].values() for c in conns]

    def __iter__(self) -> Iterator[Any]:
        for i in range(STRIPES):
            yield from self.stripe(i)
