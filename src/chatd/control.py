"""The supervisor's pipes to its children (``Link``).

Each child process has one pipe to the supervisor: it reports ``ready`` and
its ``status``; the supervisor sends ``drain``, ``log_level`` and the admin
socket's requests (``ask``, answered by ``answer``). Routing changes do not
travel here: they go through the node's log (``chatd.bus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

log = logging.getLogger("chatd.control")

#: unsent bytes one link holds for a peer that does not read, past which new
#: messages are dropped (status, metrics and answers are periodic or retried)
SEND_BUFFER_MAX: Final = 1 << 20
#: largest message accepted from the other end
MAX_MESSAGE_BYTES: Final = 16 << 20
_header = struct.Struct("!i")  # multiprocessing.Connection's own framing


class Link:
    """One end of a supervisor <-> child pipe, driven by the event loop.

    Messages are small tuples ``(verb, payload)``. ``on_message`` is called for
    each one received; ``on_eof`` once when the other side is gone (a child
    treats that as "the supervisor died": it drains and exits).

    Neither end ever blocks its loop on the pipe: the file descriptor is
    non-blocking, what cannot be written at once waits in a buffer written
    when the pipe drains (``SEND_BUFFER_MAX`` bounds it: a stalled child
    cannot stall the supervisor), and what is read is split into messages
    only once each is whole.
    """

    def __init__(self, conn: Connection, on_message: Callable[[str, Any], None],
                 on_eof: Callable[[], None]) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        self._on_message = on_message
        self._on_eof = on_eof
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._writing = False
        self._dropped = 0
        self.closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self._on_eof()
            return
        buf = self._in
        buf += data
        while len(buf) >= 4:
            (n,) = _header.unpack_from(buf)
            if n < 0 or n > MAX_MESSAGE_BYTES:
                log.error("a message of %d bytes on a supervisor pipe: closing it", n)
                self.close()
                self._on_eof()
                return
            if len(buf) < 4 + n:
                break
            verb, payload = pickle.loads(bytes(buf[4 : 4 + n]))
            del buf[: 4 + n]
            self._on_message(verb, payload)
            if self.closed:
                return

    def send(self, verb: str, payload: Any = None) -> bool:
        """Queue one message; False if the other side is gone or does not read."""
        if self.closed:
            return False
        data = pickle.dumps((verb, payload), protocol=pickle.HIGHEST_PROTOCOL)
        if len(self._out) + len(data) > SEND_BUFFER_MAX:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("the other end of a pipe does not read: %d messages dropped",
                            self._dropped)
            return False
        self._out += _header.pack(len(data))
        self._out += data
        if self._loop is None:
            # not started (a child before its loop runs): write it all now
            os.write(self._fd, bytes(self._out))
            self._out.clear()
            return True
        return self._write()

    def _write(self) -> bool:
        try:
            n = os.write(self._fd, self._out)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            return False
        del self._out[:n]
        assert self._loop is not None
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)
        return True

    def _writable(self) -> None:
        self._write()
        if not self._out and self._writing and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._out:
            # what still fits goes; the rest is for a peer that is gone or stuck
            with contextlib.suppress(OSError):
                os.write(self._fd, self._out)
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._conn.close()
