"""The stores side by side: CPU per message and commits/s of ``append``.

    python -m chatd_bench.stores --engine sqlite|postgres --batch 20,500 --n 60000
        [--users 10000] [--sqlite-sync NORMAL] [--pg-sync on] [--dsn DSN --pg-pid PID]
        [--floor]

A micro-benchmark, not a test. For each batch size: a fresh database with
``--users`` users, then ``--n`` private messages (100 bytes of content,
random sender and receiver, each with its own cid, as clients send them)
appended by one writer in batches of that size, back to back (the node's log
does the same: one batch in flight). Reported per batch size: µs of CPU per
message — this process (the store's client side, aiosqlite's thread
included) plus, for PostgreSQL, the server's processes (the postmaster and
all its children, via psutil) — commits/s, messages/s, and p50/p99 of one
``append`` call.

PostgreSQL: without ``--dsn`` the bench runs a throwaway cluster
(``chatd_bench.engines.Postgres``: Debian's ``initdb`` / ``pg_ctl`` as the
``postgres`` user, in a temp folder, with
``fsync=on`` and ``synchronous_commit`` = ``--pg-sync``); with ``--dsn`` it
uses that server (each run in a new database it creates and drops) and
counts the server's CPU only when ``--pg-pid`` names its postmaster.
Background workers that exit during a run (autovacuum) take their CPU with
them: the server figure is a slight underestimate.

``--floor`` (SQLite): after chatd's store, the same rows go into the same
schema (a fresh file migrated by chatd) straight through ``sqlite3``: one
``executemany`` of chatd's INSERT per batch in a transaction, nothing else —
no look-ups, no thread, no Python per message but the row tuples. Once with
every index, once without ``messages_cid`` (what the dedupe index costs).
This is what SQLite itself asks per message for the rows chatd stores: the
floor under the store's figure.

SQLite's ``NORMAL`` (chatd's default) does not fsync at each commit, and
PostgreSQL's ``synchronous_commit=on`` does: compare like with like
(``--sqlite-sync FULL`` or ``--pg-sync off``) when durability matters.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import uvloop

from chatd.store import sqlite as sqlite_store
from chatd.store.postgres import PostgresStore
from chatd.store.sqlite import SqliteStore
from chatd.wire import Message
from chatd_bench.engines import Postgres

CONTENT = "x" * 100


def _cpu_snapshot(pid: int | None) -> dict[int, tuple[psutil.Process, float]]:
    """pid -> (process, user + system seconds) for ``pid`` and all its children."""
    if pid is None:
        return {}
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[p.pid] = (p, t.user + t.system)
    return out


def _cpu_since(before: dict[int, tuple[psutil.Process, float]], pid: int | None) -> float:
    """CPU seconds that ``pid``'s tree spent since ``before`` (a process that exited
    meanwhile counts for nothing; one that started counts whole)."""
    now = _cpu_snapshot(pid)
    return sum(cpu - before.get(p, (None, 0.0))[1] for p, (_, cpu) in now.items())


def _messages(n: int, users: list[int], seed: int) -> list[Message]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        src, dst = rng.sample(users, 2)
        out.append(
            Message(userid=src, cmd=10, dstid=dst, media=1, content=CONTENT, cid=f"b{seed}-{i}")
        )
    return out


async def _run_one(
    store: Any, batch: int, n: int, users: int, server_pid: int | None
) -> dict[str, float]:
    uids = [await store.create_user(f"bench{i}", "x") for i in range(users)]
    msgs = _messages(n, uids, batch)
    me = os.getpid()
    lat: list[float] = []
    c0, s0, t0 = _cpu_snapshot(me), _cpu_snapshot(server_pid), time.perf_counter()
    for i in range(0, n, batch):
        t = time.perf_counter()
        await store.append(msgs[i : i + batch])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    client, srv = _cpu_since(c0, me), _cpu_since(s0, server_pid)
    assert store.committed == n, store.committed
    lat.sort()
    return {
        "client_us": 1e6 * client / n,
        "server_us": 1e6 * srv / n,
        "us_per_msg": 1e6 * (client + srv) / n,
        "commits_s": len(lat) / wall,
        "msgs_s": n / wall,
        "p50_ms": 1e3 * lat[len(lat) // 2],
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


async def _floor(batch: int, n: int, users: int, sync: str, drop_cid: bool) -> float:
    """µs of CPU per message that SQLite alone takes for chatd's rows (``--floor``)."""
    folder = Path(tempfile.mkdtemp(prefix="chatd-bench-floor-"))
    try:
        path = folder / "chatd.db"
        store = await SqliteStore.open(path, synchronous=sync)
        try:
            uids = [await store.create_user(f"bench{i}", "x") for i in range(users)]
        finally:
            await store.close()
        msgs = _messages(n, uids, batch)
        ts = int(time.time() * 1000)
        bits = sqlite_store.PARTITION_BITS
        rows = [
            (i, m.userid, m.cmd, m.dstid, i >> bits, m.media, m.content, m.pic, m.url, m.memo,
             m.amount, m.cid, ts)
            for i, m in enumerate(msgs, 1)
        ]
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={sync}")
            db.execute(f"PRAGMA cache_size=-{sqlite_store.WRITER_CACHE_KIB}")
            db.execute(f"PRAGMA wal_autocheckpoint={sqlite_store.WAL_CHECKPOINT_PAGES}")
            if drop_cid:
                db.execute("DROP INDEX messages_cid")
            sql = sqlite_store.INSERT_MESSAGE_SQL
            c0 = time.process_time()
            for i in range(0, n, batch):
                db.execute("BEGIN IMMEDIATE")
                db.executemany(sql, rows[i : i + batch])
                db.execute("COMMIT")
            cpu = time.process_time() - c0
            stored = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            assert stored == n, stored
        finally:
            db.close()
        return 1e6 * cpu / n
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _main(args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batch.split(",")]
    cluster = None
    server_pid = args.pg_pid
    if args.engine == "postgres" and args.dsn is None:
        cluster = Postgres(sync=args.pg_sync)
        server_pid = cluster.pid
    try:
        print(
            f"engine={args.engine} n={args.n} users={args.users} "
            + (
                f"sqlite-sync={args.sqlite_sync}"
                if args.engine == "sqlite"
                else f"pg-sync={args.pg_sync if cluster else '(server)'}"
            )
        )
        print(
            f"{'batch':>6} {'µs/msg':>8} {'client':>8} {'server':>8} {'commits/s':>10} "
            f"{'msgs/s':>9} {'p50 ms':>7} {'p99 ms':>7}"
        )
        for k, batch in enumerate(batches):
            if args.engine == "sqlite":
                folder = Path(tempfile.mkdtemp(prefix="chatd-bench-sqlite-"))
                store: Any = await SqliteStore.open(
                    folder / "chatd.db", synchronous=args.sqlite_sync
                )
            else:
                base = args.dsn or (cluster.dsn() if cluster else "")
                admin = await _admin(base)
                db = f"chatd_bench_{os.getpid()}_{k}"
                await admin.execute(f"CREATE DATABASE {db}")
                store = await PostgresStore.open(
                    base.rsplit("/", 1)[0] + "/" + db, min_size=1, max_size=1
                )
            try:
                r = await _run_one(store, batch, args.n, args.users, server_pid)
            finally:
                await store.close()
                if args.engine == "sqlite":
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    await admin.execute(f"DROP DATABASE {db} WITH (FORCE)")
                    await admin.close()
            print(
                f"{batch:>6} {r['us_per_msg']:>8.1f} {r['client_us']:>8.1f} "
                f"{r['server_us']:>8.1f} {r['commits_s']:>10.0f} {r['msgs_s']:>9.0f} "
                f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
            )
            if args.floor and args.engine == "sqlite":
                every = await _floor(batch, args.n, args.users, args.sqlite_sync, False)
                no_cid = await _floor(batch, args.n, args.users, args.sqlite_sync, True)
                print(
                    f"{'':>6} floor, sqlite3 alone: {every:.1f} µs/msg; "
                    f"without messages_cid: {no_cid:.1f}"
                )
    finally:
        if cluster is not None:
            cluster.close()


async def _admin(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(dsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--batch", default="20,500", help="batch sizes, comma-separated")
    parser.add_argument("--n", type=int, default=60_000, help="messages per batch size")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--sqlite-sync", default="NORMAL", help="PRAGMA synchronous")
    parser.add_argument("--pg-sync", default="on", help="synchronous_commit of the cluster")
    parser.add_argument("--dsn", help="an existing server (a database to connect to first)")
    parser.add_argument("--pg-pid", type=int, help="its postmaster's pid, to count its CPU")
    parser.add_argument("--floor", action="store_true",
                        help="sqlite: also SQLite alone, for the same rows and schema")
    # chatd runs on uvloop: so does the store's client side here
    uvloop.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
