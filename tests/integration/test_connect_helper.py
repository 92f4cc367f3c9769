"""The tests' own ``connect`` helper (conftest): a connection lost before the
websocket upgrade completes is an error, not a client that is not there."""

from __future__ import annotations

import asyncio

import pytest
from conftest import connect


async def test_a_connection_lost_during_the_handshake_raises() -> None:
    """picows' ws_connect returns no listener (None) when the peer goes away
    before answering the upgrade, as a shard killed with connections in its
    accept queue does; ``connect`` must raise then, so that the reconnect
    loops of the fault tests try again."""
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the upgrade request, never answered
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectionResetError):
            await connect(f"ws://127.0.0.1:{port}/chat?id=1&token=x")
    finally:
        server.close()
        await server.wait_closed()
