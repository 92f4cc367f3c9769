"""Reliability under faults, with real ``chatd serve`` processes, real
websocket clients and the real database file: kill -9 of the whole node
under load, a full disk under the store, a lock held by another SQLite
connection past the busy timeout.

Every message is counted: each device records every ack and copy, and the
checks compare those records with the rows in the file (``fault_helpers``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from conftest import UNIT
from fault_helpers import (
    Device,
    NodeProcess,
    check_devices,
    cids_stored,
    devices_for,
    fill,
    free_port,
    make_users,
    node_procs,
    tmpfs,
    token,
)
from picows import WSListener, WSMsgType, ws_connect

__all__ = ["node_procs"]  # the fixture


_devices = devices_for


@pytest.mark.slow
async def test_kill_9_of_the_whole_node_under_load_loses_nothing_acked(
        tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    data = tmp_path / "data"
    uids, gid = await make_users(data, 6, group_of=6)
    chat, api = free_port(), free_port()
    ports = {"chat_port": chat, "api_port": api}
    first = NodeProcess(data, "--shards", "2", **ports)
    node_procs.append(first)
    await first.started()
    devices = _devices(first, data, uids)
    for d in devices:
        d.start()
    for d in devices:
        await d.synced()
    rng = random.Random(8)

    def target(me: int) -> object:
        def pick() -> tuple[int, int]:
            if rng.random() < 0.25:
                return 11, gid
            return 10, rng.choice([u for u in uids if u != me])
        return pick

    pumps = [asyncio.ensure_future(d.pump(target(d.uid), 10_000, window=16))  # type: ignore[arg-type]
             for d in devices]

    async def enough_acked() -> None:
        while sum(len(d.acked) for d in devices) < 600:
            await asyncio.wait([asyncio.ensure_future(d.progress.wait()) for d in devices],
                               return_when=asyncio.FIRST_COMPLETED)
            for d in devices:
                d.progress.clear()

    async def in_flight() -> None:
        # acks come a commit at a time: let the pumps send the next ones first
        while sum(len(d.pending) for d in devices) < 32:
            await asyncio.sleep(0)

    await asyncio.wait_for(enough_acked(), 60 * UNIT)
    await asyncio.wait_for(in_flight(), 10 * UNIT)
    first.kill_all()  # under load: every device has messages in flight
    # counted before the loop runs again: acks the node wrote just before it
    # died are still in the sockets, and reading them may empty every queue
    in_flight_at_kill = sum(len(d.pending) for d in devices)
    for p in pumps:
        p.cancel()
    await asyncio.gather(*pumps, return_exceptions=True)
    acked_before = {d.name: dict(d.acked) for d in devices}
    assert in_flight_at_kill >= 32, "nothing was in flight when the node died"

    # at once, on the same ports; the devices reconnect by themselves with last=
    second = NodeProcess(data, "--shards", "2", **ports)
    node_procs.append(second)
    await second.started()
    for d in devices:
        await d.all_acked()
    for d in devices:
        await d.final_sync()
    counts = check_devices(devices, data / "chatd.db")
    for d in devices:
        await d.stop()
    print("kill -9 of the node:", counts)
    # every ack seen before the crash still names the same stored row
    rows = cids_stored(data / "chatd.db")
    for d in devices:
        for cid, mid in acked_before[d.name].items():
            assert rows.get((d.uid, cid)) == [mid], (d.name, cid, mid, rows.get((d.uid, cid)))
    assert counts["acked"] == counts["sent"] == counts["stored"], counts
    assert counts["duplicates"] == counts["lost"] == counts["foreign"] == 0, counts
    assert counts["disorder"] == counts["errors"] == counts["unacked"] == 0, counts
    assert all(d.connects >= 3 for d in devices), [d.connects for d in devices]


@pytest.mark.slow
async def test_a_full_disk_is_answered_503_and_recovers_by_itself(
        tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        data = disk / "data"
        (alice, bob), _ = await make_users(data, 2)
        node = NodeProcess(data, "--shards", "1")
        node_procs.append(node)
        await node.started()
        a, b = _devices(node, data, [alice, bob])
        a.start()
        b.start()
        await a.synced()
        await b.synced()
        for _ in range(20):
            a.send(bob)
        await a.all_acked(timeout=10)
        filler = disk / "filler"
        assert fill(filler) > 0
        # the disk is full: each message gets error 503 (the device resends it
        # with the same cid after each one), none gets an ack
        mark = len(node.lines)
        full = [a.send(bob) for _ in range(30)]
        await a.until(lambda: {str(f["cid"]) for f in a.refusals} >= set(full))
        await node.logged(r"not stored: database or disk is full", start=mark)
        assert all(f["amount"] == 503 and "retry" in str(f["memo"]) for f in a.refusals), \
            a.refusals[:3]
        assert not [c for c in full if c in a.acked], "acked while the disk is full"
        stored = cids_stored(data / "chatd.db")
        assert not [c for c in full if (alice, c) in stored], "refused but stored"
        assert node.proc.poll() is None and a.live and b.live, "the node did not stay up"
        # space returns: the resent messages and new ones are acked and stored
        filler.unlink()
        after = [a.send(bob) for _ in range(10)]
        await a.all_acked(timeout=20)
        rows = cids_stored(data / "chatd.db")
        for cid in full + after:
            assert rows.get((alice, cid)) == [a.acked[cid]], cid
        await b.final_sync()
        counts = check_devices([a, b], data / "chatd.db")
        await a.stop()
        await b.stop()
        node.close()
    print("disk full:", counts)
    assert counts["lost"] == counts["duplicates"] == counts["disorder"] == 0, counts
    assert counts["acked"] == counts["sent"] == counts["stored"] == 60, counts
    assert counts["errors"] == 0 and (a.connects, b.connects) == (1, 2), counts


@pytest.mark.slow
async def test_a_lock_held_past_the_busy_timeout_is_answered_503_and_recovers(
        tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    data = tmp_path / "data"
    (alice, bob), _ = await make_users(data, 2)
    node = NodeProcess(data, "--shards", "1", env={"CHATD_DB_BUSY_TIMEOUT_MS": "200"})
    node_procs.append(node)
    await node.started()
    a, b = _devices(node, data, [alice, bob])
    a.start()
    b.start()
    await a.synced()
    await b.synced()
    for _ in range(5):
        a.send(bob)
    await a.all_acked()
    holder = sqlite3.connect(data / "chatd.db", isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer, as a sqlite3 shell would be
        mark = len(node.lines)
        locked = [a.send(bob) for _ in range(10)]
        # each is refused (and resent by the device) while the lock is held
        await a.until(lambda: {str(f["cid"]) for f in a.refusals} >= set(locked))
        await node.logged(r"not stored: database is locked", start=mark)
        assert all(f["amount"] == 503 and "retry" in str(f["memo"]) for f in a.refusals)
        assert not [c for c in locked if c in a.acked], "acked while locked out"
        stored = {r[0] for r in holder.execute(
            "SELECT cid FROM messages WHERE userid = ?", (alice,))}
        assert not stored & set(locked), "refused but stored"
        assert node.proc.poll() is None and a.live
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await a.all_acked()
    await b.final_sync()
    counts = check_devices([a, b], data / "chatd.db")
    await a.stop()
    await b.stop()
    print("busy:", counts)
    assert counts["acked"] == counts["sent"] == counts["stored"] == 15, counts
    assert counts["lost"] == counts["duplicates"] == counts["disorder"] == 0, counts
    assert counts["errors"] == 0 and (a.connects, b.connects) == (1, 2), counts


class _Head(msgspec.Struct):
    """The fields of a frame that a ``Member`` keeps (the rest is skipped)."""

    cmd: int = 0
    id: int = 0


_read_head = msgspec.msgpack.Decoder(_Head).decode


class Member(WSListener):  # type: ignore[misc]
    """A group member online, light enough for hundreds in one test: it reads
    every frame at once (in MessagePack, which it asks for with its first
    frame) and keeps the ids of the group's messages, in the order they came."""

    def __init__(self, moved: asyncio.Event) -> None:
        self.tr: Any = None
        #: set at each copy (shared by the members: the test waits on it)
        self.moved = moved
        self.ids: list[int] = []
        #: frames it did not expect (anything but copies and its sync's answer)
        self.others: list[_Head] = []
        self.synced = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    def on_ws_connected(self, transport: Any) -> None:
        self.tr = transport
        transport.send(WSMsgType.BINARY, msgspec.msgpack.encode({"cmd": 4, "id": 0}))

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.BINARY:
            head = _read_head(frame.get_payload_as_memoryview())
        elif kind == WSMsgType.TEXT:
            head = msgspec.json.decode(frame.get_payload_as_bytes(), type=_Head)
        else:
            if kind == WSMsgType.CLOSE:
                self.close_code = int(frame.get_close_code())
            return
        if head.cmd == 11:
            self.ids.append(head.id)
            self.moved.set()
        elif head.cmd == 4 and not self.synced.is_set():
            self.synced.set()
        else:
            self.others.append(head)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed.set()
        self.moved.set()


#: members of the group online besides the sender and the slow one
MEMBERS_ONLINE = 500
#: the slow one's unsent bytes that close it (the default, named for the bound)
SLOW_CONSUMER_BYTES = 256 * 1024
#: group messages in flight from the sender (one commit holds at most these)
WINDOW = 16
#: what the shard's memory may grow by beyond the slow consumer's own buffer:
#: a commit's copies encoded (JSON and MessagePack), its writes to the members
#: that the kernel has not taken yet, the allocator's slack. Measured: the
#: whole growth is 0.5-0.6 MB (the slow one's ~0.4 MB included; the same with
#: two busy loops beside the test on this 2-core box), and 5.6 MB with the slow
#: consumer's limit lifted (the rest of its 8 MB waits in the kernel)
MARGIN_BYTES = 2**20


@pytest.mark.slow
async def test_a_slow_consumer_in_a_1000_member_group_is_closed_4009_in_bounded_memory(
        tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    """One member of a 1,000-member group, 502 of them online, stops reading
    while 8 MB of group messages go out to each: it is closed with 4009 and
    the shard's memory grows by no more than its ``slow_consumer_bytes``, one
    commit's write past it and a margin (far below the 8 MB it would hold for
    it unbounded); every other member online gets every message, in order,
    and stays connected; the slow one catches up by resuming with ``last=``."""
    data = tmp_path / "data"
    uids, gid = await make_users(data, 1000, group_of=1000)
    # the log in its own process: the shard's memory is the connections' alone
    node = NodeProcess(data, "--shards", "1",
                       env={"CHATD_RATE_LIMIT": "false", "CHATD_LOG_PROCESS": "own",
                            "CHATD_SLOW_CONSUMER_BYTES": str(SLOW_CONSUMER_BYTES)})
    node_procs.append(node)
    await node.started()
    sender, slow = _devices(node, data, uids[:2])
    # a small receive window: the server's buffer fills, not the kernel's
    slow.rcvbuf = 4096
    for d in (sender, slow):
        d.start()
    moved = asyncio.Event()
    members = [Member(moved) for _ in range(MEMBERS_ONLINE)]

    async def members_have(n: int, timeout: float) -> None:
        """Until every member online has ``n`` copies (or is gone)."""
        async def go() -> None:
            while min(len(m.ids) if not m.closed.is_set() else n for m in members) < n:
                moved.clear()
                await moved.wait()
        await asyncio.wait_for(go(), timeout * UNIT)

    async def join(uid: int, member: Member) -> None:
        url = f"ws://127.0.0.1:{node.port}/chat?id={uid}&token={token(data, uid)}"
        await ws_connect(lambda: member, url, use_aiofastnet=False)
        await asyncio.wait_for(member.synced.wait(), 20 * UNIT)

    online = list(zip(uids[2:], members, strict=False))
    for i in range(0, len(online), 50):  # not all handshakes at one instant
        await asyncio.gather(*(join(uid, m) for uid, m in online[i:i + 50]))
    for d in (sender, slow):
        await d.synced()
    body = "x" * 8000
    sent = 0

    async def send(n: int) -> None:
        """``n`` group messages: at most WINDOW unacked, and the members that
        read no more than WINDOW behind (members that keep up: what the shard
        writes for them waits in their sockets, not in its memory)."""
        nonlocal sent
        for _ in range(n):
            await sender.until(lambda: len(sender.pending) < WINDOW, timeout=30)
            await members_have(sent - WINDOW, timeout=30)
            sender.send(gid, cmd=11, content=body)
            sent += 1

    # a first round that everyone reads (the slow one too): the shard's
    # memory for a commit's copies is in use before its size is taken
    await send(4 * WINDOW)
    await sender.all_acked(timeout=30)
    await members_have(sent, timeout=30)
    await slow.until(lambda: len(slow.copies) == sent, timeout=30)
    [shard] = node.shards()
    proc = psutil.Process(int(shard["pid"]))
    base_rss = proc.memory_info().rss
    assert slow.conn is not None
    slow.conn.tr.underlying_transport.pause_reading()  # it stops reading
    count = 1024  # 8 MB of content to each member
    peak = base_rss

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    await send(count)
    await sender.all_acked(timeout=60)
    acked = sorted(sender.acked.values())
    await members_have(sent, timeout=30)
    watcher.cancel()
    # the bound: the slow one's buffer (it is closed once it passes
    # slow_consumer_bytes, by the write that crossed it: one commit's copies,
    # at most WINDOW frames) and the margin
    frame_bytes = len(body) + 200
    bound = SLOW_CONSUMER_BYTES + WINDOW * frame_bytes + MARGIN_BYTES
    growth = peak - base_rss
    print(f"{MEMBERS_ONLINE + 2} online; shard RSS {base_rss / 2**20:.1f} MB, peak growth "
          f"{growth / 2**20:.1f} MB (bound {bound / 2**20:.1f} MB)")
    assert growth < bound, f"the shard grew {growth / 2**20:.1f} MB for one slow consumer"
    assert bound < count * len(body) / 2  # what it would hold for it unbounded: 8 MB
    for m in members:  # every one, in order, and still connected
        assert (m.ids, m.others, m.closed.is_set()) == (acked, [], False)
    # the slow one reads again: what was queued, then the close 4009 (and it
    # reconnects on a socket of the usual size)
    slow.rcvbuf = 0
    slow.conn.tr.underlying_transport.resume_reading()
    await slow.until(lambda: 4009 in slow.closes, timeout=30)
    # it resumed with last= on its own: everything, once, in order
    await slow.until(lambda: acked[-1] in slow.copies, timeout=60)
    assert slow.closes[0] == 4009 and slow.connects == 2, (slow.closes, slow.connects)
    assert sorted(slow.copies) == acked and not slow.dups and not slow.disorder
    for d in (sender, slow):
        await d.stop()
    for m in members:
        m.tr.send_close()
        m.tr.disconnect()
    await asyncio.wait_for(asyncio.gather(*(m.closed.wait() for m in members)), 10 * UNIT)


@pytest.mark.slow
async def test_a_child_that_crashes_in_a_loop_backs_off_and_the_supervisor_stays_up(
        tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    data = tmp_path / "data"
    (alice,), _ = await make_users(data, 1)
    node = NodeProcess(data, "--shards", "1")
    node_procs.append(node)
    await node.started()
    delays = []
    mark, started = await node.logged(r"started shard-0 \(pid (\d+)\)")
    for _ in range(3):
        # each new shard-0 is killed as soon as it has started
        os.kill(int(started.group(1)), signal.SIGKILL)
        i, m = await node.logged(
            r"shard-0 exited with status -9 after [\d.]+ s; restarting in ([\d.]+) s", mark)
        delays.append(float(m.group(1)))
        mark, started = await node.logged(r"started shard-0 \(pid (\d+)\)", i)
    assert delays == [0.5, 1.0, 2.0], delays  # doubling, from BACKOFF_MIN_S
    assert node.proc.poll() is None
    # left alone, it serves again
    await node.logged(r"shard 0 serving on port", mark)
    (d,) = _devices(node, data, [alice])
    d.start()
    await d.synced()
    d.send(alice)
    await d.all_acked()
    await d.stop()
    assert node.proc.poll() is None


async def test_a_full_queue_refuses_with_503_and_acks_only_what_it_stored(node_factory) -> None:
    """The writer waits on a lock; the log's queue fills to ``queue_max``: the
    messages past it are refused at once with 503, those it holds are acked
    once the lock goes, and each is stored once."""
    node = await node_factory(queue_max=5, db_busy_timeout_ms=int(5000 * UNIT),
                              rate_limit=False)
    alice, bob = await node.user(), await node.user()
    a = Device("a", alice, lambda: node.url(alice))
    b = Device("b", bob, lambda: node.url(bob))
    for d in (a, b):
        d.start()
        await d.synced()
    holder = sqlite3.connect(node.cfg.db_path, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        first = a.send(bob)

        async def writer_waits() -> None:  # the writer took it and waits for the lock
            while not (node.log.busy and node.log.queued == 0):
                await asyncio.sleep(0.001)

        await asyncio.wait_for(writer_waits(), 5 * UNIT)
        more = [a.send(bob) for _ in range(10)]
        await a.until(lambda: {str(f["cid"]) for f in a.refusals} >= set(more[5:]))
        assert {str(f["cid"]) for f in a.refusals} == set(more[5:])
        assert all(f["amount"] == 503 and "retry" in str(f["memo"]) for f in a.refusals)
        assert not a.acked.keys() & {first, *more}, "acked before it was stored"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await a.all_acked()  # the refused ones are resent by the device, and stored
    await b.until(lambda: set(a.acked.values()) <= set(b.copies))
    rows = cids_stored(node.cfg.db_path)
    assert all(rows.get((alice, c)) == [a.acked[c]] for c in [first, *more])
    assert not b.dups and not b.disorder and not a.errors
    for d in (a, b):
        await d.stop()
