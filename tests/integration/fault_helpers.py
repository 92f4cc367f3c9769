"""Tools for the fault tests: a node whose every process can be killed at once,
clients that keep the state a real client keeps (highest id, unacked sends by
cid) and count every message, the store's own view of a user, a
fault-injecting TCP proxy, and a small tmpfs.

Nothing here retries until a check passes: a ``Device`` records every frame
it gets; the tests compare those records with the database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import UNIT, run_cli
from picows import WSError, WSListener, WSMsgType, ws_connect

from chatd import auth

# --- a node in its own process group -----------------------------------------------


class NodeProcess:
    """``chatd serve`` in a session of its own, its output read all along.

    Unlike ``conftest.ServerProcess`` the output is pumped by a thread for the
    whole run (a server that logs a lot never blocks on a full pipe) and tests
    wait for log lines; ``kill_all`` sends SIGKILL to every process of the node
    at the same instant (its process group), as a crash or the OOM killer does.
    """

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 chat_port: int = 0, api_port: int = 0) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1",
             "--chat-port", str(chat_port), "--api-port", str(api_port),
             "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self.lines: list[str] = []
        self.eof = False
        self._cond = threading.Condition()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        self.port = 0
        self.api_port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def _wait_line(self, pattern: re.Pattern[str], start: int, timeout_s: float
                   ) -> tuple[int, re.Match[str]]:
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = pattern.search(self.lines[i])
                    if m:
                        return i, m
                    i += 1
                if self.eof:
                    raise AssertionError(
                        f"the node ended before logging {pattern.pattern!r}:\n" + self.output)
                if not self._cond.wait(timeout_s):
                    raise AssertionError(
                        f"{pattern.pattern!r} not logged in {timeout_s} s:\n" + self.output)

    async def logged(self, pattern: str, start: int = 0,
                     timeout: float = 20.0) -> tuple[int, re.Match[str]]:
        """Wait for a line at index >= ``start`` that matches ``pattern``;
        (its index, the match)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, self._wait_line, re.compile(pattern), start, timeout * UNIT)

    async def started(self, timeout: float = 30.0) -> int:
        _, m = await self.logged(r"listening .*?\bport=(\d+) api_port=(\d+)", timeout=timeout)
        self.port, self.api_port = int(m.group(1)), int(m.group(2))
        return self.port

    def admin(self, *args: str) -> Any:
        done = run_cli("admin", *args, "--json", data_dir=self.data_dir)
        return json.loads(done.stdout)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the node to exit by itself; its exit status."""
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout * UNIT)

    def shards(self) -> list[dict[str, Any]]:
        return list(self.admin("shards", "list"))

    def kill_all(self) -> None:
        """SIGKILL every process of the node at once (its process group) and reap them."""
        if self.proc.poll() is not None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # first: not one more frame is answered
        self.proc.wait()
        deadline = time.monotonic() + 10
        while True:
            left = []
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p)
            if not left:
                return
            assert time.monotonic() < deadline, f"processes outlived SIGKILL: {left}"
            time.sleep(0.01)

    def close(self) -> None:
        self.kill_all()
        self._pump.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def node_procs() -> Iterator[list[NodeProcess]]:
    """A list to put ``NodeProcess``es in; every process of each is killed at teardown."""
    procs: list[NodeProcess] = []
    yield procs
    for p in procs:
        p.close()
        # shown by pytest when the test failed
        print(f"--- output of chatd serve (pid {p.proc.pid}), last lines ---")
        print("".join(p.lines[-80:]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- users and tokens ---------------------------------------------------------------


async def make_users(data_dir: Path, n: int, *, group_of: int = 0) -> tuple[list[int], int]:
    """``n`` users in a new database at ``data_dir``; with ``group_of`` > 0, a
    group (id returned, else 0) of the first ``group_of`` users."""
    from conftest import TEST_PASSWORD_HASH

    from chatd.store import open_store

    store = await open_store(data_dir / "chatd.db")
    try:
        uids = [await store.create_user(f"1360{i:07d}", TEST_PASSWORD_HASH) for i in range(n)]
        gid = 0
        if group_of:
            gid = await store.create_group("faults", uids[0])
            for uid in uids[1:group_of]:
                await store.join_group(gid, uid)
        return uids, gid
    finally:
        await store.close()


def token(data_dir: Path, uid: int, ttl_s: int = 3600) -> str:
    return auth.issue_token(auth.load_or_create_secret(data_dir), uid, 0, ttl_s)


def devices_for(node: NodeProcess, data: Path, uids: list[int], **kw: Any) -> list[Device]:
    """One ``Device`` per user, connecting to ``node`` with a token valid for an hour."""
    def url_of(uid: int) -> Callable[[], str]:
        tok = token(data, uid)
        return lambda: f"ws://127.0.0.1:{node.port}/chat?id={uid}&token={tok}"

    return [Device(f"d{uid}", uid, url_of(uid), **kw) for uid in uids]


# --- the store's view -----------------------------------------------------------------


class Snapshot:
    """What a store holds, read with SQL of the test's own: every message row
    (id, userid, cmd, dstid, cid, ts) by id, and every membership
    (gid, uid, joined_id). From a SQLite file or a PostgreSQL database."""

    def __init__(self, rows: list[tuple[int, int, int, int, str | None, int]],
                 members: list[tuple[int, int, int]]) -> None:
        self.rows = rows
        self.members = members

    @classmethod
    def of_sqlite(cls, db: Path) -> Snapshot:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = list(conn.execute(
                "SELECT id, userid, cmd, dstid, cid, ts FROM messages ORDER BY id"))
            members = list(conn.execute("SELECT gid, uid, joined_id FROM members"))
        return cls(rows, members)

    @classmethod
    async def of_postgres(cls, dsn: str) -> Snapshot:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            rows = [tuple(r) for r in await conn.fetch(
                "SELECT id, userid, cmd, dstid, cid, ts FROM messages ORDER BY id")]
            members = [tuple(r) for r in await conn.fetch(
                "SELECT gid, uid, joined_id FROM members")]
        finally:
            await conn.close()
        return cls(rows, members)  # type: ignore[arg-type]

    def view(self, uid: int) -> set[int]:
        """The ids a user is entitled to: private messages to or from it, and
        group messages of its groups after it joined."""
        joined = {gid: since for gid, member, since in self.members if member == uid}
        return {
            mid for mid, userid, cmd, dstid, _, _ in self.rows
            if (cmd == 10 and uid in (dstid, userid))
            or (cmd == 11 and dstid in joined and mid > joined[dstid])
        }

    def cids(self) -> dict[tuple[int, str], list[int]]:
        """(userid, cid) -> ids of the rows stored under it (one, if dedupe works)."""
        found: dict[tuple[int, str], list[int]] = {}
        for mid, userid, _, _, cid, _ in self.rows:
            if cid is not None:
                found.setdefault((userid, cid), []).append(mid)
        return found


def store_rows(db: Path) -> list[tuple[int, int, int, int, str | None, int]]:
    """Every message row: (id, userid, cmd, dstid, cid, ts), by id."""
    return Snapshot.of_sqlite(db).rows


def store_view(db: Path, uid: int) -> set[int]:
    """The ids a user is entitled to (``Snapshot.view``) in a SQLite file."""
    return Snapshot.of_sqlite(db).view(uid)


def cids_stored(db: Path) -> dict[tuple[int, str], list[int]]:
    """(userid, cid) -> ids of the rows stored under it (one, if dedupe works)."""
    return Snapshot.of_sqlite(db).cids()


# --- a client device ------------------------------------------------------------------


class _Conn(WSListener):  # type: ignore[misc]
    """One websocket connection of a ``Device``."""

    def __init__(self, device: Device, gen: int) -> None:
        self.device = device
        self.gen = gen
        self.tr: Any = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.synced = asyncio.Event()
        #: the highest id received on this connection (copies and new acks)
        self.last = 0

    def on_ws_connected(self, transport: Any) -> None:
        self.tr = transport
        # at once: the replay's frames may be read before ws_connect returns
        self.device.conn = self

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            self.device.on_frame(self, json.loads(frame.get_payload_as_bytes()))
        elif kind == WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = int(getattr(code, "value", code))

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed.set()
        self.device.on_disconnected(self)


class Device:
    """One device of a user, with a real client's state and a record of every frame.

    - ``top``: the highest id it holds; each (re)connection passes it as ``last=``;
    - ``pending``: its messages without an ack, by cid; resent with the same
      cid once a new connection has caught up (cmd 4), and after an error 503/500;
    - ``acked``: cid -> id; ``copies``: id -> the copy received; ``dups`` and
      ``disorder``: copies received twice, ids that went backwards on a connection.

    It reconnects by itself while ``keep`` is set (after a close or a failed
    connect), which is how every fault test's clients behave.
    """

    _ids = itertools.count(1)

    def __init__(self, name: str, uid: int, url: Callable[[], str], *,
                 rcvbuf: int = 0) -> None:
        self.name = name
        self.uid = uid
        self._url = url
        self.rcvbuf = rcvbuf
        self.top = 0
        self.pending: dict[str, dict[str, Any]] = {}
        self.acked: dict[str, int] = {}
        #: cid -> the ts its ack carried
        self.ack_ts: dict[str, int] = {}
        self.copies: dict[int, dict[str, Any]] = {}
        self.own_copies: set[int] = set()
        self.delivered = 0
        self.dups: list[int] = []
        self.disorder: list[tuple[int, int]] = []
        self.errors: list[dict[str, Any]] = []
        self.retryable = 0
        #: the error frames 500/503 it got (it resends those messages by itself)
        self.refusals: list[dict[str, Any]] = []
        self.closes: list[int | None] = []
        self.connects = 0
        self.conn: _Conn | None = None
        self.keep = True
        self.progress = asyncio.Event()
        self.caught_up = asyncio.Event()
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._gen = 0
        self._sent_on: dict[str, int] = {}

    # --- the view it holds --------------------------------------------------

    @property
    def view(self) -> set[int]:
        """Every id this device holds: copies received and acks of its own."""
        return set(self.copies) | set(self.acked.values())

    @property
    def live(self) -> bool:
        conn = self.conn
        return conn is not None and conn.synced.is_set() and not conn.closed.is_set()

    # --- connections --------------------------------------------------------

    def start(self) -> None:
        self.keep = True
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop reconnecting and close the connection (1000)."""
        self.keep = False
        conn = self.conn
        if conn is not None and not conn.closed.is_set():
            conn.tr.send_close()
            conn.tr.disconnect()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10 * UNIT)
            except TimeoutError:
                # a peer that never answers the close: cut the socket
                conn = self.conn
                if conn is not None:
                    conn.tr.disconnect(False)
                await asyncio.wait_for(self._task, 10 * UNIT)
            self._task = None

    def _socket(self, _parsed: Any) -> socket.socket | None:
        if not self.rcvbuf:
            return None
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.setblocking(False)
        return s

    async def _run(self) -> None:
        delay = 0.02
        while self.keep:
            self._gen += 1
            url = self._url() + f"&last={self.top}"
            try:
                _, conn = await ws_connect(
                    lambda: _Conn(self, self._gen), url, use_aiofastnet=False,
                    socket_factory=self._socket if self.rcvbuf else None,
                    websocket_handshake_timeout=5 * UNIT)
            except (TimeoutError, OSError, WSError):
                await asyncio.sleep(delay)
                delay = min(0.5, delay * 2)
                continue
            if conn is None:  # picows gives no listener for a connection lost in the handshake
                await asyncio.sleep(delay)
                continue
            delay = 0.02
            self.connects += 1
            if not self.keep:  # stop() came while this connection was being made
                conn.tr.send_close()
                conn.tr.disconnect()
            await conn.closed.wait()
            self.closes.append(conn.close_code)

    async def synced(self, timeout: float = 20.0) -> None:
        """Wait until a connection has caught up (its replay's cmd 4 came)."""
        async def go() -> None:
            while not self.live:
                self.progress.clear()
                await self.progress.wait()
        await asyncio.wait_for(go(), timeout * UNIT)

    def drop(self) -> None:
        """Cut the current connection without a closing handshake (a lost network)."""
        conn = self.conn
        if conn is not None and not conn.closed.is_set():
            conn.tr.disconnect(False)

    # --- frames -----------------------------------------------------------------

    def on_frame(self, conn: _Conn, frame: dict[str, Any]) -> None:
        cmd = frame.get("cmd", 0)
        fid = int(frame.get("id", 0))
        if cmd in (10, 11):
            self.delivered += 1
            if fid <= conn.last:
                self.disorder.append((conn.last, fid))
            conn.last = max(conn.last, fid)
            cid = frame.get("cid", "")
            if frame.get("userid") == self.uid and cid.startswith(self.name + "-"):
                # its own message, as a copy: the connection that sent it was gone
                # before the ack (stored all the same); for the client it is the ack
                if fid in self.own_copies:
                    self.dups.append(fid)
                self.own_copies.add(fid)
                if cid in self.pending:
                    self.pending.pop(cid)
                    self.acked[cid] = fid
                elif self.acked.get(cid) != fid:
                    self.errors.append({"copy of an own message": frame,
                                        "acked": self.acked.get(cid)})
            else:
                if fid in self.copies:
                    self.dups.append(fid)
                self.copies[fid] = frame
            self.top = max(self.top, fid)
        elif cmd == 1:
            cid = frame.get("cid", "")
            if cid in self.acked:
                if self.acked[cid] != fid:
                    self.errors.append({"two ids for one cid": cid, "ids": (self.acked[cid], fid)})
            else:
                if fid <= conn.last:
                    self.disorder.append((conn.last, fid))
                conn.last = max(conn.last, fid)
                self.acked[cid] = fid
                self.ack_ts[cid] = int(frame.get("ts", 0))
                self.top = max(self.top, fid)
            self.pending.pop(cid, None)
        elif cmd == 4:
            self.top = max(self.top, fid)
            if not conn.synced.is_set():
                conn.synced.set()
                self._resend_all(conn)
        elif cmd == 5:
            code = frame.get("amount")
            cid = frame.get("cid", "")
            if code in (500, 503) and cid:
                self.retryable += 1
                self.refusals.append(frame)
                self._sent_on.pop(cid, None)
                if cid in self.pending:
                    asyncio.get_running_loop().call_later(0.05 * UNIT, self._resend, cid)
            else:
                self.errors.append(frame)
        self.progress.set()
        if not self.pending:
            self.caught_up.set()

    async def until(self, pred: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait until ``pred()`` holds, checking after each frame this device gets."""
        async def go() -> None:
            while not pred():
                self.progress.clear()
                await self.progress.wait()
        await asyncio.wait_for(go(), timeout * UNIT)

    def on_disconnected(self, conn: _Conn) -> None:
        self.progress.set()

    # --- sending ----------------------------------------------------------------

    def send(self, dstid: int, *, cmd: int = 10, content: str = "") -> str:
        """Queue a new message (sent now if a connection is live); its cid."""
        self._seq += 1
        cid = f"{self.name}-{self._seq}"
        self.pending[cid] = {"cmd": cmd, "dstid": dstid, "media": 1,
                             "content": content or f"{self.name} {self._seq}", "cid": cid}
        self.caught_up.clear()
        if self.live:
            self._transmit(cid)
        return cid

    def _transmit(self, cid: str) -> None:
        conn = self.conn
        assert conn is not None
        self._sent_on[cid] = conn.gen
        conn.tr.send(WSMsgType.TEXT, json.dumps(self.pending[cid]).encode())

    def _resend(self, cid: str) -> None:
        if cid in self.pending and self.live and cid not in self._sent_on:
            self._transmit(cid)

    def _resend_all(self, conn: _Conn) -> None:
        for cid in list(self.pending):
            if self._sent_on.get(cid) != conn.gen:
                self._transmit(cid)

    async def all_acked(self, timeout: float = 30.0) -> None:
        """Wait until every message it sent has its ack (resending as needed)."""
        async def go() -> None:
            while self.pending:
                self.caught_up.clear()
                # a message sent on a connection that died is resent on the next
                if self.live:
                    conn = self.conn
                    assert conn is not None
                    for cid in list(self.pending):
                        if self._sent_on.get(cid) not in (conn.gen,):
                            self._transmit(cid)
                await asyncio.wait({asyncio.ensure_future(self.caught_up.wait()),
                                    asyncio.ensure_future(self.progress.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
                self.progress.clear()
        await asyncio.wait_for(go(), timeout * UNIT)

    async def pump(self, targets: Callable[[], tuple[int, int]], count: int,
                   window: int = 16, pace_s: float = 0.0) -> None:
        """Send ``count`` messages, at most ``window`` unacked at a time, only
        while a connection is live; ``targets()`` gives each one's (cmd, dstid)."""
        sent = 0
        while sent < count:
            if not self.live or len(self.pending) >= window:
                self.progress.clear()
                await self.progress.wait()
                continue
            cmd, dst = targets()
            self.send(dst, cmd=cmd)
            sent += 1
            if pace_s:
                await asyncio.sleep(pace_s)

    async def final_sync(self, timeout: float = 20.0) -> None:
        """Reconnect once with ``last=top`` and wait for the replay's cmd 4."""
        conn = self.conn
        if conn is not None and not conn.closed.is_set():
            conn.tr.send_close()
            conn.tr.disconnect()
            await asyncio.wait_for(conn.closed.wait(), timeout * UNIT)
        await self.synced(timeout)


def check_devices(devices: list[Device], db: Path | Snapshot) -> dict[str, int]:
    """Compare every device's view with the store's view of its user and every
    ack with the rows stored; the counts (the test asserts on them)."""
    snap = db if isinstance(db, Snapshot) else Snapshot.of_sqlite(db)
    rows = snap.cids()
    sent = sum(d._seq for d in devices)
    acked = sum(len(d.acked) for d in devices)
    stored = 0
    twice = 0
    acked_not_stored = 0
    for d in devices:
        for cid, mid in d.acked.items():
            ids = rows.get((d.uid, cid), [])
            if len(ids) > 1:
                twice += 1
            if mid not in ids:
                acked_not_stored += 1
                print(f"ACKED NOT STORED on {d.name}: {cid} -> {mid}, rows {ids}")
    own = {(d.uid, f"{d.name}-") for d in devices}
    for (uid, cid), ids in rows.items():
        if any(uid == u and cid.startswith(prefix) for u, prefix in own):
            stored += len(ids)
    lost = 0
    foreign = 0
    by_id = {r[0]: r for r in snap.rows}
    for d in devices:
        want = snap.view(d.uid)
        missing = want - d.view
        lost += len(missing)
        foreign += len(d.view - want)
        for mid in sorted(missing):
            # shown when a test fails: which device, which row, what it saw around it
            print(f"LOST on {d.name} (uid {d.uid}): row {by_id.get(mid)}; "
                  f"top {d.top}, closes {d.closes}, connects {d.connects}")
    return {
        "sent": sent,
        "acked": acked,
        "stored": stored,
        "delivered": sum(d.delivered for d in devices),
        "duplicates": sum(len(d.dups) for d in devices) + twice,
        "lost": lost + acked_not_stored,
        "foreign": foreign,
        "disorder": sum(len(d.disorder) for d in devices),
        "unacked": sum(len(d.pending) for d in devices),
        "errors": sum(len(d.errors) for d in devices),
        "retryable_errors": sum(d.retryable for d in devices),
        "connects": sum(d.connects for d in devices),
    }


# --- a fault-injecting TCP proxy --------------------------------------------------------


class _Pair:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []
        #: the server closed its side (EOF or reset), seen even while frozen
        self.server_closed = asyncio.Event()


class FaultProxy:
    """A TCP proxy on loopback between clients and ``target_port`` that can
    delay, cut (reset both sides) or freeze (forward nothing either way, close
    nothing: a half-open path) its connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.frozen = False
        self.pairs: list[_Pair] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
                      ) -> None:
        pair = _Pair()
        self.pairs.append(pair)
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pair.writers = [c_writer, s_writer]
        loop = asyncio.get_running_loop()
        pair.tasks = [loop.create_task(self._pipe(c_reader, s_writer, pair, upstream=False)),
                      loop.create_task(self._pipe(s_reader, c_writer, pair, upstream=True))]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: _Pair, upstream: bool) -> None:
        try:
            while True:
                if self.frozen and not upstream:
                    # a frozen path does not read the client at all
                    await asyncio.sleep(0.01)
                    continue
                data = await reader.read(65536)
                if not data:
                    break
                if self.frozen:
                    continue  # held back: nothing reaches the client
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if upstream:
                pair.server_closed.set()
            if not self.frozen:
                writer.close()

    def cut(self) -> None:
        """Reset every connection both ways, at once (a broken path)."""
        for pair in self.pairs:
            for w in pair.writers:
                w.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in self.pairs:
            for t in pair.tasks:
                t.cancel()
            for w in pair.writers:
                w.transport.abort()
        await asyncio.gather(*(t for p in self.pairs for t in p.tasks), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


# --- a small disk ------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted after,
    even on failure. Fails (never skips) when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs at {path} (the disk-full tests need root "
                    f"and mount(8)): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; the bytes written."""
    chunk = b"\0" * 65536
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # the last, partial pages too
        small = b"\0" * 512
        while True:
            try:
                written += os.write(fd, small)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return written
