"""Who sends what to whom, and what a receiver may accept: pure, no I/O.

Users have a logical index ``i`` (0..n-1) and a server id ``uids[i]``; groups
have a logical index ``g`` (0..G-1) and a server id ``gids[g]``. User ``i`` is a
member of group ``i % G`` when ``i < group_limit``: the peer relays' own rule
(user ``u`` in group ``u % GROUPS``), which the chatd set-up reproduces with
real groups in the store, so one plan drives both.

Every message carries its identity in ``content`` as ``S:SEQ:T:D``: sender
index, the sender's sequence number, the intended send time
(``time.monotonic_ns``, one clock for every process on the machine) and the
target (user index for cmd 10, group index for cmd 11). Peers keep only a few
fields, but they all keep ``content``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

CMD_PRIVATE = 10
CMD_GROUP = 11


class Key(NamedTuple):
    sender: int
    seq: int
    t_ns: int
    target: int


def make_content(sender: int, seq: int, t_ns: int, target: int) -> str:
    return f"{sender}:{seq}:{t_ns}:{target}"


def parse_content(content: str) -> Key | None:
    """The identity of a bench message, or None if ``content`` is not one."""
    parts = content.split(":")
    if len(parts) != 4:
        return None
    try:
        return Key(int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]))
    except ValueError:
        return None


@dataclasses.dataclass
class Plan:
    uids: list[int]
    gids: list[int]
    group_limit: int = 0

    @property
    def n_groups(self) -> int:
        return len(self.gids)

    def group_of(self, i: int) -> int:
        """The group of user ``i``, or -1 when ``i`` is in none."""
        if not self.gids or i >= self.group_limit:
            return -1
        return i % len(self.gids)

    def members(self, g: int) -> range:
        return range(g, self.group_limit, len(self.gids))

    def group_size(self, g: int) -> int:
        return len(self.members(g))

    def check(self, me: int, cmd: int, dstid: int, userid: int, key: Key | None) -> bool:
        """Whether user ``me`` may receive this copy (a False is a misroute).

        ``userid`` 0 means the server did not say (a peer that dropped it).
        """
        if key is None or not 0 <= key.sender < len(self.uids):
            return False
        if userid and userid != self.uids[key.sender]:
            return False
        if cmd == CMD_PRIVATE:
            return key.target == me and dstid == self.uids[me]
        if cmd == CMD_GROUP:
            g = key.target
            return (0 <= g < len(self.gids) and dstid == self.gids[g]
                    and self.group_of(me) == g and self.group_of(key.sender) == g)
        return False


def pairs(users: int) -> list[tuple[int, int]]:
    """Private-scenario pairs: user 2k sends to user 2k+1."""
    return [(2 * k, 2 * k + 1) for k in range(users // 2)]


def split(items: list[int], procs: int) -> list[list[int]]:
    """Deal ``items`` round-robin over ``procs`` processes."""
    return [items[w::procs] for w in range(procs)]
