"""The in-process bus: a shard and the node's log in one event loop.

Nothing is encoded: the log hands its item lists to the shard's
``on_batch`` as they are, and the shard's submissions go straight into the
log's queue. This is the embedded node (``chatd.server.open_node``) and what
most tests run; ``chatd serve`` runs the log in its own process and uses
``bus.unix``.
"""

from __future__ import annotations

from chatd.bus import LogListener
from chatd.bus.frames import AnyItem
from chatd.log import Log
from chatd.wire import Message


class LocalLink:
    """A shard's ``LogLink`` to a ``Log`` in the same loop (and the log's ``Port``)."""

    def __init__(self, log: Log, listener: LogListener) -> None:
        self._log = log
        self._listener = listener
        self._port = 0

    def connect(self) -> None:
        """Attach to the log; the listener hears ``on_welcome`` at once."""
        self._port, welcome = self._log.attach(self)
        self._listener.on_welcome(welcome)

    @property
    def up(self) -> bool:
        return self._port != 0

    def submit(self, seq: int, msg: Message) -> bool:
        return self._port != 0 and self._log.submit(self._port, seq, msg)

    def online(self, uid: int) -> None:
        if self._port:
            self._log.online(self._port, uid)

    def offline(self, uid: int) -> None:
        if self._port:
            self._log.offline(self._port, uid)

    def send(self, items: list[AnyItem], hw: int) -> None:
        """``Port``: the log's batch for this shard."""
        self._listener.on_batch(items, hw)

    async def close(self) -> None:
        if self._port:
            self._log.detach(self._port)
            self._port = 0
            self._listener.on_lost()
