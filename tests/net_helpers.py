"""Ports for tests that restart a node on the same ones."""

from __future__ import annotations

import asyncio
import errno
import socket


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick), for ``--chat-port``/``--api-port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def port_bindable(port: int, timeout: float) -> None:
    """Wait until a plain bind of 127.0.0.1:``port`` works (``OSError`` past ``timeout``).

    The supervisor proves a port free with a bind without SO_REUSEADDR, which
    the kernel refuses while connections the old node closed first linger in
    TIME_WAIT (60 s on Linux); a browser's idle keep-alive connections to the
    api port are such. Until that probe sets SO_REUSEADDR, a restart on the
    same ports has to wait for them.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or loop.time() > deadline:
                    raise
        await asyncio.sleep(0.5)
