"""Clients that behave like real ones under faults, and count everything.

``Sender`` sends ``n`` private messages, each with its own cid, a window at a
time; a message answered with error 503 or left unanswered by a dropped
connection is sent again with the same cid after a reconnect (the server
stores it once and acks the original id). ``Receiver`` records every message
id it is given and, whenever its connection drops, reconnects with
``last=`` its highest id. Reconnecting during an outage is what real clients
do; the assertions afterwards count every message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from conftest import UNIT, Client, connect
from picows import WSError

#: how long a client keeps trying to reconnect during an outage
RECONNECT_FOR_S = 30.0


async def reconnect(url: str) -> Client:
    """Connect to ``url``, trying again while the node refuses (restarting shard,
    503 while draining)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECONNECT_FOR_S * UNIT
    while True:
        try:
            return await connect(url)
        except (OSError, WSError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _until(moved: asyncio.Event, pred: Callable[[], bool], timeout: float) -> None:
    """Wait until ``pred()`` holds, checking it each time ``moved`` is set (by
    the client whose count it reads), not on a timer."""
    async def go() -> None:
        while not pred():
            moved.clear()
            await moved.wait()
    await asyncio.wait_for(go(), timeout * UNIT)


class Receiver:
    """Records every message id; resumes with ``last=`` after every drop."""

    def __init__(self, url: Callable[[], str]) -> None:
        self.url = url
        self.ids: list[int] = []
        self.connections = 0
        self.close_codes: list[int | None] = []
        self.client: Client | None = None
        self._moved = asyncio.Event()  # set whenever an id arrives

    @property
    def high(self) -> int:
        return max(self.ids, default=0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            client = self.client = await reconnect(self.url() + f"&last={self.high}")
            self.connections += 1
            while True:
                frame_task = asyncio.ensure_future(client.frames.get())
                closed = asyncio.ensure_future(client.closed.wait())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({frame_task, closed, stopped},
                                   return_when=asyncio.FIRST_COMPLETED)
                for t in (closed, stopped):
                    t.cancel()
                if frame_task.done():
                    self._record(frame_task.result())
                    continue
                frame_task.cancel()
                # drain what arrived before the close
                while not client.frames.empty():
                    self._record(client.frames.get_nowait())
                if client.closed.is_set():
                    self.close_codes.append(client.close_code)
                    break
                if stop.is_set():
                    with contextlib.suppress(Exception):
                        client.tr.send_close()
                        client.tr.disconnect()
                    return

    def _record(self, frame: dict[str, Any]) -> None:
        if frame.get("cmd") in (10, 11):
            self.ids.append(frame["id"])
            self._moved.set()

    async def settle(self, want: int, timeout: float = 30.0) -> None:
        """Wait until ``want`` messages arrived (more would show as duplicates)."""
        await _until(self._moved, lambda: len(self.ids) >= want, timeout)


class Sender:
    """Sends ``n`` messages to ``dst`` with cids; retries refused and unanswered ones."""

    def __init__(self, url: Callable[[], str], dst: int, n: int, window: int = 20,
                 rate_per_s: float = 0.0) -> None:
        self.url = url
        self.dst = dst
        self.n = n
        self.window = window
        #: messages per second at most (0: as fast as the acks come)
        self.rate_per_s = rate_per_s
        self.acked: dict[str, int] = {}
        self.refused = 0
        self.connections = 0
        self.sent = 0
        self.failed: BaseException | None = None
        self._moved = asyncio.Event()  # set whenever an ack arrives, and at the end

    async def until_acked(self, more_than: int, timeout: float = 30.0) -> None:
        """Wait until more than ``more_than`` messages are acked."""
        await _until(self._moved, lambda: len(self.acked) > more_than or self.failed is not None,
                     timeout)
        if self.failed is not None:
            raise AssertionError(f"the sender failed after {len(self.acked)} acks") \
                from self.failed

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException as exc:
            self.failed = exc
            raise
        finally:
            self._moved.set()

    async def _run(self) -> None:
        todo = [f"c{i}" for i in range(self.n)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        while len(self.acked) < self.n:
            client = await reconnect(self.url())
            self.connections += 1
            inflight: set[str] = set()
            while len(self.acked) < self.n and not client.closed.is_set():
                while todo and len(inflight) < self.window:
                    if self.rate_per_s:
                        ahead = self.sent / self.rate_per_s - (loop.time() - started)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
                    cid = todo.pop(0)
                    client.send(cmd=10, dstid=self.dst, media=1, content=cid, cid=cid)
                    inflight.add(cid)
                    self.sent += 1
                frame = await self._next(client)
                if frame is None:
                    break
                cid = frame.get("cid", "")
                if frame.get("cmd") == 1 and cid in inflight:
                    inflight.discard(cid)
                    previous = self.acked.setdefault(cid, frame["id"])
                    assert previous == frame["id"], f"{cid} acked as {previous} and {frame['id']}"
                    self._moved.set()
                elif frame.get("cmd") == 5:
                    # the only refusal a fault may cause is 503 "retry" of a message
                    # in flight (500 is a store failure or our bug, which these
                    # tests do not make; the close that follows would hide it)
                    assert frame["amount"] == 503 and cid in inflight, frame
                    inflight.discard(cid)
                    self.refused += 1
                    todo.append(cid)
                    await asyncio.sleep(0.01)  # the node is busy: do not spin
            todo[:0] = sorted(inflight - self.acked.keys(), key=lambda c: int(c[1:]))
            with contextlib.suppress(Exception):
                client.tr.disconnect()

    @staticmethod
    async def _next(client: Client) -> dict[str, Any] | None:
        frame_task = asyncio.ensure_future(client.frames.get())
        closed = asyncio.ensure_future(client.closed.wait())
        await asyncio.wait({frame_task, closed}, timeout=10 * UNIT,
                           return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if frame_task.done():
            return frame_task.result()
        frame_task.cancel()
        if not client.frames.empty():
            return client.frames.get_nowait()
        return None  # closed, or nothing for 10 s: reconnect and resend
