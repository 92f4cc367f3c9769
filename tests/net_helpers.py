"""Ports for tests that restart a node on the same ones, or reach each shard alone."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick), for ``--chat-port``/``--api-port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int) -> int:
    """The first of ``n`` consecutive ports free now (probed, not held), for
    ``shard_base_port``: shard i then listens alone on it + i."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise OSError(f"no {n} consecutive free ports")
