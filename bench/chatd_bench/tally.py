"""Accounting of a run: what was sent, acked, expected and delivered.

Each load process keeps a ``Tally``; the parent adds them up (``merge``) and
asks for the ``problems``. Senders count ``sent`` and, from the plan, how many
copies each message should reach (``expected``); receivers count unique
``delivered`` copies, ``dups`` (a copy whose sender sequence number is not above
the last one this connection saw from that sender: a duplicate or a reordering,
both broken promises), and ``misroutes`` (a copy that the plan says this
connection should not get, or whose fields disagree with it). ``own`` counts
copies of a user's own messages (sync replays them; not a delivery).

Loss is ``expected - delivered`` once the run has drained. Against a peer relay
there are no acks (``acks_expected=False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

FIELDS = ("sent", "acked", "unknown_acks", "errors", "expected", "delivered", "synced",
          "dups", "misroutes", "own", "heartbeats", "reconnects", "connect_failures",
          "disconnects")


@dataclasses.dataclass
class Tally:
    sent: int = 0
    acked: int = 0
    #: acks whose cid this process never sent (or acked twice)
    unknown_acks: int = 0
    #: cmd-5 error frames received
    errors: int = 0
    expected: int = 0
    delivered: int = 0
    #: deliveries that came through a sync replay (counted in ``delivered`` too)
    synced: int = 0
    dups: int = 0
    misroutes: int = 0
    own: int = 0
    heartbeats: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    #: connections the server closed (or that broke) while the bench wanted them open
    disconnects: int = 0

    def merge(self, other: Tally) -> Tally:
        for f in FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        return cls(**{f: int(data.get(f, 0)) for f in FIELDS})

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.delivered)

    @property
    def unacked(self) -> int:
        return max(0, self.sent - self.acked)

    def problems(self, acks_expected: bool) -> list[str]:
        """What went wrong, one line each; empty when the run was clean."""
        out = []
        if self.lost:
            out.append(f"LOST {self.lost} of {self.expected} expected deliveries")
        if self.delivered > self.expected:
            out.append(f"EXTRA {self.delivered - self.expected} deliveries beyond the "
                       f"{self.expected} expected")
        if self.dups:
            out.append(f"DUPLICATED or REORDERED {self.dups} deliveries")
        if self.misroutes:
            out.append(f"MISROUTED {self.misroutes} deliveries")
        if acks_expected and self.unacked:
            out.append(f"UNACKED {self.unacked} of {self.sent} sent messages")
        if self.unknown_acks:
            out.append(f"{self.unknown_acks} acks for messages not sent (or acked twice)")
        if self.errors:
            out.append(f"{self.errors} error frames (cmd 5) from the server")
        if self.connect_failures:
            out.append(f"{self.connect_failures} connections failed")
        if self.disconnects:
            out.append(f"{self.disconnects} connections dropped by the server")
        return out
