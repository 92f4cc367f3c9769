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

Writes are coalesced per connection: everything one commit produces for a
connection (acks, copies, errors) is framed and handed to its transport in one
write, so a busy connection costs one send() per commit, not one per frame.
The bytes of a copy are framed once and shared by all recipients.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from chatd.errors import FrameError
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
    error_frame,
)

# connection states (``Conn.state``)
LIVE: Final = 0
SYNCING: Final = 1
CLOSING: Final = 2

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack
#: the 2-byte headers of short frames, built once (most chat frames are short)
_SHORT_HEADERS: Final = {
    op: [bytes((0x80 | op, n)) for n in range(126)] for op in (OP_TEXT, OP_BINARY)
}


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server-to-client websocket frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[opcode][n] + payload
    if n < 65536:
        return _pack_16(0x80 | opcode, 126, n) + payload
    return _pack_64(0x80 | opcode, 127, n) + payload


def framed(conn: Any, msg: Message) -> bytes:
    """``msg`` encoded and framed the way ``conn`` speaks (JSON or MessagePack)."""
    if conn.binary:
        return ws_frame(OP_BINARY, encode_msgpack(msg))
    return ws_frame(OP_TEXT, encode_json(msg))


class Router:
    """Acks senders and fans committed messages out to local connections."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.delivered = 0

    def on_commit(self, outcomes: list[tuple[Message, Any, int]]) -> None:
        """Store callback: one (message, sending connection, outcome) per message."""
        out: dict[Any, list[bytes]] = {}
        fanout = self.fanout
        for msg, src, status in outcomes:
            if status in (STORED, DUPLICATE):
                reply = Message(cmd=CMD_ACK, id=msg.id, cid=msg.cid, ts=msg.ts)
                if status == STORED:
                    src.top = msg.id
                    if not src.live_from:
                        src.live_from = msg.id
            elif status == NO_RECEIVER:
                reply = error_frame(FrameError(ERR_NOT_FOUND, f"no user {msg.dstid}", msg.cid))
            else:
                reply = error_frame(FrameError(ERR_SERVER, "message not stored, retry", msg.cid))
            state = src.state
            if state == SYNCING and status == STORED:
                # after the replay, like live copies: the connection's frames
                # stay in id order, so "the highest id I got" is a safe resume point
                # (a re-ack of a retry carries an old id: it goes out at once)
                src.hold(reply)
            elif state != CLOSING or src.close_pending is not None:
                # a closing connection still gets the answers to what it sent
                # before the close (then the close frame: ``Conn.on_outcome``)
                frames = out.get(src)
                if frames is None:
                    out[src] = [framed(src, reply)]
                else:
                    frames.append(framed(src, reply))
            if status == STORED:
                fanout(msg, src, out)
        for conn, frames in out.items():
            if conn.state != CLOSING or conn.close_pending is not None:
                conn.write(frames[0] if len(frames) == 1 else b"".join(frames))
        for _, src, _ in outcomes:
            src.on_outcome()  # after the writes: a pending close frame goes last

    def fanout(self, msg: Message, src: Any, out: dict[Any, list[bytes]]) -> None:
        """Queue ``msg`` in ``out`` for each recipient but ``src``, framed at most twice."""
        registry = self.registry
        if msg.cmd == CMD_PRIVATE:
            conns: Any = registry.get(msg.dstid)
            mine = registry.get(msg.userid) if msg.dstid != msg.userid else None
            # the sender's other devices (src may already be gone from the list)
            if mine and (len(mine) > 1 or mine[0] is not src):
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
                        mp = ws_frame(OP_BINARY, encode_msgpack(msg))
                    data = mp
                else:
                    if js is None:
                        js = ws_frame(OP_TEXT, encode_json(msg))
                    data = js
                frames = out.get(conn)
                if frames is None:
                    out[conn] = [data]
                else:
                    frames.append(data)
                conn.top = msg.id
                if not conn.live_from:
                    conn.live_from = msg.id
                sent += 1
            elif state == SYNCING:
                conn.hold(msg)
        self.delivered += sent
