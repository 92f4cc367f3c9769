"""The supervisor's pipes to its children (``Link``).

Each child process has one pipe to the supervisor: it reports ``ready`` and
its ``status``; the supervisor sends ``drain``, ``log_level`` and the admin
socket's requests (``ask``, answered by ``answer``). Routing changes do not
travel here: they go through the node's log (``chatd.bus``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


class Link:
    """One end of a supervisor <-> child pipe, driven by the event loop.

    Messages are small tuples ``(verb, payload)``. ``on_message`` is called for
    each one received; ``on_eof`` once when the other side is gone (a child
    treats that as "the supervisor died": it drains and exits).
    """

    def __init__(self, conn: Connection, on_message: Callable[[str, Any], None],
                 on_eof: Callable[[], None]) -> None:
        self._conn = conn
        self._on_message = on_message
        self._on_eof = on_eof
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                verb, payload = self._conn.recv()
                self._on_message(verb, payload)
        except (EOFError, OSError):
            self.close()
            self._on_eof()

    def send(self, verb: str, payload: Any = None) -> bool:
        """Send one message; False if the other side is gone."""
        if self.closed:
            return False
        try:
            self._conn.send((verb, payload))
        except (BrokenPipeError, EOFError, OSError):
            return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
