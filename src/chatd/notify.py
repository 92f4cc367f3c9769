"""systemd's notify protocol (sd_notify), for ``Type=notify`` units.

``notify("READY=1")`` once the shards listen, ``STATUS=...`` with connection
counts, ``WATCHDOG=1`` every half watchdog interval, ``STOPPING=1`` on drain.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` to systemd; False when not running under systemd, or
    when the message could not go out at once.

    The send never waits: it runs on the supervisor's loop, and a datagram
    socket whose reader has fallen behind (its queue holds
    ``net.unix.max_dgram_qlen`` messages, 10 by default) would otherwise
    block that loop until the reader catches up — the admin socket, the
    children's reports and the watchdog with it. A message that does not fit
    is dropped; the next STATUS or WATCHDOG says the same again.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, kind) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:  # BlockingIOError included: the reader is behind
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for, or None if it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
