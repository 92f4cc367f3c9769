"""Ports for tests that restart a node on the same ones, or reach each shard alone."""

from __future__ import annotations

import random
import socket

#: where test ports are picked: below the kernel's ephemeral range (32768-60999
#: by default), so that no outgoing connection takes one before its server binds it
_PORTS = range(20_000, 32_000)
#: ports handed out by this process already (probed free, not held)
_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port nothing holds now, never handed out before by this
    process, for servers the tests start (``--chat-port``, NATS, PostgreSQL)."""
    for _ in range(10_000):
        port = random.choice(_PORTS)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise OSError("no free port for a test server")


def free_port_range(n: int) -> int:
    """The first of ``n`` consecutive ports free now (probed, not held), for
    ``shard_base_port``: shard i then listens alone on it + i."""
    for _ in range(100):
        base = free_port()
        if base + n > _PORTS.stop:
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
        _GIVEN.update(range(base, base + n))
        return base
    raise OSError(f"no {n} consecutive free ports")
