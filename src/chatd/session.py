"""Per-connection protocol rules that need no I/O: flood control and the
reassembly of fragmented websocket messages.

Their state lives on the connection object (``shard.Conn``, which has
``__slots__`` to keep idle connections small), so these helpers take the
connection and mutate named attributes instead of holding state of their own:

- ``tokens``, ``stamp``: the token bucket (float tokens, monotonic seconds)
- ``frag``: the bytes of a fragmented message being reassembled, or None
"""

from __future__ import annotations

from typing import Any

from chatd.errors import FrameError
from chatd.wire import ERR_TOO_LARGE


class RateLimiter:
    """A token bucket per connection: ``rate_per_s`` frames, bursts of ``burst``.

    ``allow`` spends one token and says whether there was one; a connection
    that runs dry is flooding (close 4008). Defaults are far above what any
    real client sends; the bench switches the limiter off.
    """

    __slots__ = ("rate", "burst")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)

    def start(self, conn: Any, now: float) -> None:
        conn.tokens = self.burst
        conn.stamp = now

    def allow(self, conn: Any, now: float) -> bool:
        tokens = conn.tokens + (now - conn.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        conn.stamp = now
        if tokens < 1.0:
            conn.tokens = tokens
            return False
        conn.tokens = tokens - 1.0
        return True


def add_fragment(conn: Any, payload: bytes, fin: bool, first: bool, max_bytes: int) -> bytes | None:
    """Feed one frame of a fragmented message; the whole message once ``fin``.

    ``first`` is true for the opening (text/binary, fin=0) frame. Raises
    ``FrameError`` (ERR_TOO_LARGE) when the message grows past ``max_bytes``:
    the caller closes with 1009. A continuation without an opening frame is a
    protocol error (``ValueError``).
    """
    if first:
        if conn.frag is not None:
            raise ValueError("new message started inside a fragmented one")
        conn.frag = bytearray()
    elif conn.frag is None:
        raise ValueError("continuation frame without a message to continue")
    buf: bytearray = conn.frag
    buf += payload
    if len(buf) > max_bytes:
        conn.frag = None
        raise FrameError(ERR_TOO_LARGE, f"message larger than {max_bytes} bytes")
    if not fin:
        return None
    conn.frag = None
    return bytes(buf)
