"""What travels between a node's log and its shards and API workers.

Pure: msgspec structs and their MessagePack codecs, nothing else. On the
in-process bus the same objects are handed over as they are; on the Unix
socket bus each frame is one length-prefixed MessagePack value.

Up (shard → log), in the order the shard produced them, gathered in one
``Burst`` per pass of the shard's event loop:

- ``Hello(shard)`` once, first: the port is shard ``shard``;
- ``Submit(seq, msg)``: a validated client message (``seq`` is the shard's
  own number for it, echoed in the answer);
- ``Online(uid)`` / ``Offline(uid)``: the shard now holds its first / no
  longer holds any connection of ``uid`` (the shard sends ``Offline`` only
  after the log answered the ``Online`` with ``Here``).

Down (log → shard): ``Welcome`` once after ``Hello``, then ``Batch``es, each
with the node's high-water id (the highest id committed and routed) and
items in the order the log decided them, so in id order:

- ``Acked(seq, id, ts, stored)``: the shard's message ``seq`` is stored as
  ``id`` (``stored`` false: it was a retry of a stored one, do not deliver);
- ``Refused(seq, code, reason)``: not stored (error frame, code as cmd 5's);
- ``Deliver(msg)``: a stored message for connections of this shard (the
  shard that submitted it gets ``Acked`` instead and delivers from its copy);
- ``Here(uid, groups, hw)``: the answer to ``Online``: from this point on
  the shard gets everything for ``uid`` above ``hw``; ``groups`` is the
  user's membership at that point;
- ``Joined`` / ``Left`` / ``Revoked`` / ``Banned`` / ``Unbanned``: routing
  changes at their place in the order.

Control (API worker or admin → log): ``Call(req, op, args)`` answered by
``Result(req, ...)``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from chatd.wire import Message


class Up(msgspec.Struct, array_like=True, tag_field="t"):
    """Base of what a shard sends to the log."""


class Hello(Up, tag="h"):
    shard: int


class Submit(Up, tag="s"):
    seq: int
    msg: Message


class Online(Up, tag="on"):
    uid: int


class Offline(Up, tag="off"):
    uid: int


class Burst(Up, tag="u"):
    """What a shard sent in one pass of its event loop: submissions and
    presence, in order (one frame, one decode, whatever their number)."""

    items: list[Submit | Online | Offline]


class Call(Up, tag="call"):
    """A control operation (API worker, admin); answered by ``Result``."""

    req: int
    op: str
    args: list[Any]


class Item(msgspec.Struct, array_like=True, tag_field="t"):
    """Base of the items of a ``Batch``."""


class Acked(Item, tag="a"):
    seq: int
    id: int
    ts: int
    stored: bool


class Refused(Item, tag="r"):
    seq: int
    code: int
    reason: str


class Deliver(Item, tag="d"):
    msg: Message


class Here(Item, tag="here"):
    uid: int
    groups: list[int]
    hw: int


class Joined(Item, tag="j"):
    uid: int
    gid: int


class Left(Item, tag="l"):
    uid: int
    gid: int


class Revoked(Item, tag="rv"):
    uid: int
    version: int


class Banned(Item, tag="b"):
    uid: int


class Unbanned(Item, tag="ub"):
    uid: int


AnyItem = Acked | Refused | Deliver | Here | Joined | Left | Revoked | Banned | Unbanned


class Down(msgspec.Struct, array_like=True, tag_field="t"):
    """Base of what the log sends to a shard or a control client."""


class Welcome(Down, tag="w"):
    """The log's answer to ``Hello``: where the node is, and who may not connect."""

    hw: int
    versions: dict[int, int]
    banned: list[int]


class Batch(Down, tag="B"):
    hw: int
    items: list[AnyItem]


class Result(Down, tag="res"):
    req: int
    ok: bool
    value: Any = None
    #: when not ok: "not_found", "unavailable" or "error", and why
    kind: str = ""
    error: str = ""


AnyUp = Hello | Submit | Online | Offline | Burst | Call
AnyDown = Welcome | Batch | Result

encode = msgspec.msgpack.Encoder().encode
decode_up = msgspec.msgpack.Decoder(AnyUp).decode
decode_down = msgspec.msgpack.Decoder(AnyDown).decode
