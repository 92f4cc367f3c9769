"""Fan-out: a stored message to this shard's connections of its recipients.

A message is encoded at most once per encoding in use (JSON, MessagePack)
and framed once (``wire.ws_frame``); the same bytes go to every recipient.
Each session collects what it is sent in its ``out``; the shard writes each
touched session once when the log's batch is done, so a busy connection
costs one ``write()`` per batch, not one per frame.

- cmd 10: every connection of ``dstid``, and the sender's other devices;
- cmd 11: every local connection in the group index of ``dstid``;
- a system broadcast (cmd 10 to ``dstid`` 0, from the system user): every
  local connection;

never the connection that sent it (it gets the ack).
"""

from __future__ import annotations

from typing import Any

from chatd.protocol import DELIVERED, OVERFLOW, Session
from chatd.registry import Registry
from chatd.store import BROADCAST
from chatd.wire import (
    CMD_PRIVATE,
    OP_BINARY,
    OP_TEXT,
    Message,
    encode_json,
    encode_msgpack,
    ws_frame,
)


class Fanout:
    """Delivers stored messages to the local connections of their recipients."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.delivered = 0

    def deliver(
        self, msg: Message, src: Session | None, touched: list[Session], slow: list[Session]
    ) -> None:
        """Give ``msg`` to each local recipient but ``src``.

        Recipients go to ``touched`` (write them when the batch is done); one
        that cannot hold another copy goes to ``slow`` (close it, 4009).
        """
        registry = self.registry
        if msg.cmd == CMD_PRIVATE and msg.dstid == BROADCAST:
            recipients: Any = list(registry)  # a system message to everyone
        elif msg.cmd == CMD_PRIVATE:
            recipients = registry.get(msg.dstid)
            if msg.dstid != msg.userid:
                mine = registry.get(msg.userid)
                # the sender's other devices (the sender may be gone already)
                if mine and (len(mine) > 1 or mine[0] is not src):
                    recipients = [*(recipients or ()), *mine]
        else:
            recipients = registry.groups.get(msg.dstid)
        if not recipients:
            return
        js = mp = None
        sent = 0
        for sess in recipients:
            if sess is src:
                continue
            if sess.binary:
                if mp is None:
                    mp = ws_frame(OP_BINARY, encode_msgpack(msg))
                data = mp
            else:
                if js is None:
                    js = ws_frame(OP_TEXT, encode_json(msg))
                data = js
            done = sess.deliver(msg, data)
            if done == DELIVERED:
                touched.append(sess)
                sent += 1
            elif done == OVERFLOW:
                slow.append(sess)
        self.delivered += sent
