"""Many writers, one SQLite file: the node's log against shards writing it themselves.

    python -m chatd_bench.writers --procs 2 --duration 8 [--window 256] [--pin 0]

Two ways for P shard processes to store their messages (design decision in
docs/design.md, "one ordered log per node"):

- ``log``: each process hands its messages to one log process over its Unix
  socket (``bus.unix``, the code chatd runs) and waits for the acks; the log
  commits one batch at a time (``chatd.log.Log``);
- ``shared``: each process appends its own batches to the same database file
  (``SqliteStore.append``); SQLite serialises the writers with its file lock,
  and a writer that finds it taken sleeps in its busy handler (1-100 ms steps).

Each producer keeps ``--window`` messages in flight (a closed loop). Printed
per mode: messages/s, CPU µs per message summed over every process, and the
latency of a round (submit to ack) p50/p99. Run both in one go, alternating
(``--rounds``): only ratios taken side by side mean anything on a noisy box.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from chatd.bus.frames import Acked, AnyItem, Refused, Welcome
from chatd.bus.unix import LogServer, UnixLogLink
from chatd.log import Log
from chatd.store.sqlite import SqliteStore
from chatd.wire import Message

USERS = 1000


def _pin(cpus: list[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


async def _make_users(db: Path) -> None:
    store = await SqliteStore.open(db)
    for i in range(USERS):
        await store.create_user(f"w{i}", "x")
    await store.close()


def _message(p: int, n: int) -> Message:
    return Message(userid=1 + (n * 7 + p) % USERS, cmd=10, dstid=1 + (n * 13 + p) % USERS,
                   media=1, content="x" * 100, cid=f"p{p}-{n}")


# --- the log mode ----------------------------------------------------------------


def _log_process(db: str, sock: str, ready: Connection, cpus: list[int] | None) -> None:
    _pin(cpus)

    async def main() -> None:
        store = await SqliteStore.open(Path(db))
        log = Log(store)
        await log.start()
        server = LogServer(log, Path(sock))
        await server.start()
        ready.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, ready.recv)
        await log.close()
        await server.close()
        await store.close()

    import uvloop

    uvloop.run(main())


class _Counter:
    """A shard's ``LogListener`` that counts acks and round latencies."""

    def __init__(self) -> None:
        self.welcomed = asyncio.Event()
        self.sent_at: dict[int, float] = {}
        self.acked = 0
        self.latencies: list[float] = []
        self.freed = asyncio.Event()

    def on_welcome(self, welcome: Welcome) -> None:
        self.welcomed.set()

    def on_batch(self, items: list[AnyItem], hw: int) -> None:
        now = time.perf_counter()
        for item in items:
            if isinstance(item, Acked | Refused):
                t = self.sent_at.pop(item.seq, None)
                if t is not None:
                    self.latencies.append(now - t)
                    self.acked += isinstance(item, Acked)
        self.freed.set()

    def on_lost(self) -> None:
        pass


def _producer(mode: str, p: int, db: str, sock: str, window: int, duration: float,
              out: Connection, cpus: list[int] | None) -> None:
    _pin(cpus)

    async def via_log() -> dict[str, Any]:
        counter = _Counter()
        link = UnixLogLink(Path(sock), p, counter)
        link.start()
        await counter.welcomed.wait()
        seq = 0
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            while len(counter.sent_at) < window:
                seq += 1
                counter.sent_at[seq] = time.perf_counter()
                link.submit(seq, _message(p, seq))
            counter.freed.clear()
            await counter.freed.wait()
        await link.close()
        return {"acked": counter.acked, "lat": counter.latencies}

    async def shared() -> dict[str, Any]:
        store = await SqliteStore.open(Path(db))
        n = acked = 0
        latencies: list[float] = []
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            batch = [_message(p, n + i) for i in range(window)]
            n += window
            t = time.perf_counter()
            await store.append(batch)
            latencies.append(time.perf_counter() - t)
            acked += window
        await store.close()
        return {"acked": acked, "lat": latencies}

    import uvloop

    out.send(uvloop.run(via_log() if mode == "log" else shared()))


def run(mode: str, procs: int, duration: float, window: int,
        cpus: list[int] | None) -> dict[str, Any]:
    """One measured run of ``mode``; its figures."""
    ctx = multiprocessing.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="chatd-writers-"))
    db = tmp / "chatd.db"
    asyncio.run(_make_users(db))
    sock = str(tmp / "log.sock")
    children = []
    log_end = None
    if mode == "log":
        log_end, theirs = ctx.Pipe()
        writer = ctx.Process(target=_log_process, args=(str(db), sock, theirs, cpus))
        writer.start()
        log_end.recv()
        children.append(writer)
    pipes = []
    for p in range(procs):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_producer,
                           args=(mode, p, str(db), sock, window, duration, theirs, cpus))
        proc.start()
        children.append(proc)
        pipes.append(mine)
    ps = [psutil.Process(c.pid) for c in children]
    cpu0 = sum(sum(x.cpu_times()[:2]) for x in ps)
    t0 = time.perf_counter()
    results = [pipe.recv() for pipe in pipes]
    elapsed = time.perf_counter() - t0
    cpu = sum(sum(x.cpu_times()[:2]) for x in ps) - cpu0
    if log_end is not None:
        log_end.send("stop")
    for c in children:
        c.join()
    acked = sum(r["acked"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    return {
        "mode": mode,
        "msgs_per_s": acked / elapsed,
        "cpu_us_per_msg": 1e6 * cpu / max(1, acked),
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else 0.0,
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m chatd_bench.writers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="shard processes (default 2)")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--window", type=int, default=256, help="messages in flight per process")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pin", help="CPUs for every process, e.g. 0 or 0-1")
    args = p.parse_args()
    cpus = None
    if args.pin:
        from chatd_bench.cli import parse_cpus

        cpus = parse_cpus(args.pin)
    print(f"{'mode':6}  {'msgs/s':>9}  {'µs CPU/msg':>10}  {'p50 ms':>7}  {'p99 ms':>7}")
    for _ in range(args.rounds):
        for mode in ("log", "shared"):
            r = run(mode, args.procs, args.duration, args.window, cpus)
            print(f"{r['mode']:6}  {r['msgs_per_s']:9,.0f}  {r['cpu_us_per_msg']:10.1f}  "
                  f"{r['p50_ms']:7.2f}  {r['p99_ms']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
