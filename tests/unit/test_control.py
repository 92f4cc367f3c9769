"""The supervisor's pipes (``control.Link``): never blocking, whole messages only."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import struct
from typing import Any

from chatd.control import SEND_BUFFER_MAX, Link


def _pipe() -> tuple[Any, Any]:
    return multiprocessing.get_context("spawn").Pipe()


async def test_a_peer_that_does_not_read_cannot_block_the_sender() -> None:
    mine, theirs = _pipe()
    link = Link(mine, lambda verb, payload: None, lambda: None)
    link.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    payload = b"x" * 10_000
    accepted = []
    for i in range(2_000):  # 20 MB for a peer that reads nothing
        if link.send("status", (i, payload)):
            accepted.append(i)
        if i % 100 == 0:
            await asyncio.sleep(0)
    assert ticks > 0  # the loop kept running
    assert 0 < len(accepted) < 2_000  # bounded: the rest was refused, not queued
    assert len(accepted) * len(payload) < 2 * SEND_BUFFER_MAX + (1 << 20)
    # once the peer reads, what was accepted arrives whole and in order
    loop = asyncio.get_running_loop()
    got = []
    for _ in accepted:
        got.append(await loop.run_in_executor(None, theirs.recv))
    assert [g[1][0] for g in got] == accepted and all(g[1][1] == payload for g in got)
    task.cancel()
    link.close()
    theirs.close()


async def test_a_message_that_arrives_in_pieces_is_delivered_once_whole() -> None:
    mine, theirs = _pipe()
    received: list[tuple[str, Any]] = []
    arrived = asyncio.Event()

    def on_message(verb: str, payload: Any) -> None:
        received.append((verb, payload))
        arrived.set()

    link = Link(mine, on_message, lambda: None)
    link.start()
    data = pickle.dumps(("status", {"connections": 3}))
    frame = struct.pack("!i", len(data)) + data
    fd = theirs.fileno()
    os.write(fd, frame[:5])
    await asyncio.sleep(0.05)  # a reader that acted on half a message would have by now
    assert received == []
    os.write(fd, frame[5:] + frame)  # the rest, and a second message
    await asyncio.wait_for(arrived.wait(), 5)
    while len(received) < 2:
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), 5)
    assert received == [("status", {"connections": 3})] * 2
    link.close()
    theirs.close()


async def test_the_other_end_going_away_is_eof() -> None:
    mine, theirs = _pipe()
    gone = asyncio.Event()
    link = Link(mine, lambda verb, payload: None, gone.set)
    link.start()
    theirs.close()
    await asyncio.wait_for(gone.wait(), 5)
    assert link.closed and not link.send("drain")
