"""The router: what happens to a message once the store has committed it.

The sender's connection gets the ack (cmd 1 with id, cid, ts), or an error
frame when the message was not stored. A stored message is encoded once per
encoding in use (JSON, MessagePack) and the same bytes are written to every
recipient connection on this shard:

- cmd 10: every connection of ``dstid`` and the sender's other devices;
- cmd 11: every local connection in the group index of ``dstid`` except the
  sending connection.

A recipient that is syncing holds live copies until its replay ends, and each
connection remembers the first id it was sent live (``live_from``): every later
message for it went out live or was held, so a replay stops there (see
``shard.Conn``). The client sees everything in id order without duplicates. A
connection that is closing gets nothing (it will sync on reconnect).
"""

from __future__ import annotations

from typing import Any, Final

from picows import WSMsgType

from chatd.registry import Registry
from chatd.store import DUPLICATE, NO_RECEIVER, STORED
from chatd.wire import (
    CMD_ACK,
    CMD_PRIVATE,
    ERR_NOT_FOUND,
    ERR_SERVER,
    Message,
    encode_json,
    encode_msgpack,
)

TEXT: Final = WSMsgType.TEXT
BINARY: Final = WSMsgType.BINARY

# connection states (``Conn.state``)
LIVE: Final = 0
SYNCING: Final = 1
CLOSING: Final = 2


class Router:
    """Acks senders and fans committed messages out to local connections."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.delivered = 0

    def on_commit(self, outcomes: list[tuple[Message, Any, int]]) -> None:
        """Store callback: one (message, sending connection, outcome) per message."""
        fanout = self.fanout
        for msg, src, status in outcomes:
            if status == STORED:
                if src.state != CLOSING:
                    src.send_msg(Message(cmd=CMD_ACK, id=msg.id, cid=msg.cid, ts=msg.ts))
                    if not src.live_from:
                        src.live_from = msg.id
                fanout(msg, src)
            elif status == DUPLICATE:
                src.send_msg(Message(cmd=CMD_ACK, id=msg.id, cid=msg.cid, ts=msg.ts))
            elif status == NO_RECEIVER:
                src.send_error(ERR_NOT_FOUND, f"no user {msg.dstid}", msg.cid)
            else:
                src.send_error(ERR_SERVER, "message not stored, retry", msg.cid)

    def fanout(self, msg: Message, src: Any) -> None:
        """Write ``msg`` to each recipient but ``src``, encoding at most twice."""
        registry = self.registry
        if msg.cmd == CMD_PRIVATE:
            conns: Any = registry.get(msg.dstid)
            mine = registry.get(msg.userid) if msg.dstid != msg.userid else None
            if mine is not None and len(mine) > 1:
                conns = [*(conns or ()), *mine]
            if conns is None:
                return
        else:
            conns = registry.groups.get(msg.dstid)
            if conns is None:
                return
        js = mp = None
        sent = 0
        for conn in conns:
            if conn is src:
                continue
            state = conn.state
            if state == LIVE:
                if conn.binary:
                    if mp is None:
                        mp = encode_msgpack(msg)
                    conn.tr.send(BINARY, mp)
                else:
                    if js is None:
                        js = encode_json(msg)
                    conn.tr.send(TEXT, js)
                if not conn.live_from:
                    conn.live_from = msg.id
                sent += 1
            elif state == SYNCING:
                conn.held.append(msg)
        self.delivered += sent
