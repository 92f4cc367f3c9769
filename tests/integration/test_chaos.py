"""A chaos soak: mixed load on a real two-shard node while faults are injected
one after another — kill -9 of a shard, kill -9 of the log process, a slow
consumer, a flood, a full disk for a few seconds, kill -9 of the whole node
and a restart at once. Afterwards every acked
message is in the store exactly once, and every device's view after a final
resume equals the store's view of its user. The counts are printed:

    scripts/test tests/integration/test_chaos.py -s
    CHATD_CHAOS_LOAD_S=60 scripts/test tests/integration/test_chaos.py -s   # a longer soak
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import pytest
from fault_helpers import (
    Device,
    NodeProcess,
    check_devices,
    fill,
    make_users,
    node_procs,
    tmpfs,
    token,
)

__all__ = ["node_procs"]

#: seconds of plain load between two faults (longer soaks: CHATD_CHAOS_LOAD_S=60)
LOAD_S = float(os.environ.get("CHATD_CHAOS_LOAD_S", "8"))


@pytest.mark.slow
@pytest.mark.timeout(300 + 8 * LOAD_S)
async def test_chaos_soak(tmp_path: Path, node_procs: list[NodeProcess]) -> None:
    with tmpfs(tmp_path / "disk", "256m") as disk:
        data = disk / "data"
        uids, everyone = await make_users(data, 8, group_of=8)
        from chatd.store import open_store

        store = await open_store(data / "chatd.db")
        try:
            few = await store.create_group("few", uids[0])
            for uid in uids[1:4]:
                await store.join_group(few, uid)
        finally:
            await store.close()
        groups = {uid: [everyone, few] if uid in uids[:4] else [everyone] for uid in uids}
        env = {"CHATD_SLOW_CONSUMER_BYTES": "65536"}
        node = NodeProcess(data, "--shards", "2", env=env)
        node_procs.append(node)
        await node.started()
        #: the node that runs now (the last fault starts another on the same ports)
        current = [node]

        def url_of(uid: int):  # type: ignore[no-untyped-def]
            tok = token(data, uid, ttl_s=3600)
            return lambda: f"ws://127.0.0.1:{current[0].port}/chat?id={uid}&token={tok}"

        # users 0 and 1 have two devices each
        devices = [Device(f"u{uid}d{k}", uid, url_of(uid))
                   for uid in uids for k in range(2 if uid in uids[:2] else 1)]
        *regular, slow = devices  # the last user's only device reads slowly later
        flooder = regular[-1]
        for d in devices:
            d.start()
        for d in devices:
            await d.synced()
        rng = random.Random(2024)

        def targets(me: int):  # type: ignore[no-untyped-def]
            def pick() -> tuple[int, int]:
                if rng.random() < 0.4:
                    return 11, rng.choice(groups[me])
                return 10, rng.choice([u for u in uids if u != me])
            return pick

        pumps = [asyncio.ensure_future(d.pump(targets(d.uid), 1_000_000, window=8,
                                              pace_s=0.02))
                 for d in devices]

        def acked() -> int:
            return sum(len(d.acked) for d in devices)

        async def more_acked(n: int = 200) -> None:
            """Load goes on and is acked again (the node recovered)."""
            goal = acked() + n
            await regular[0].until(lambda: acked() >= goal, timeout=60)

        def pid_of(child: str) -> int:
            """The pid of the running ``child`` (its latest start line)."""
            last = [line for line in node.lines if f"started {child} (pid " in line][-1]
            return int(last.rsplit("pid ", 1)[1].split(")")[0])

        faults: list[str] = []
        await asyncio.sleep(LOAD_S)

        # 1. kill -9 of one shard: its clients reconnect (to the other) and resume
        mark = len(node.lines)
        os.kill(pid_of("shard-0"), signal.SIGKILL)
        await node.logged(r"shard-0 exited with status -9", mark)
        await node.logged(r"shard 0 serving on port", mark)
        await more_acked()
        faults.append("kill -9 shard-0")
        await asyncio.sleep(LOAD_S)

        # 2. kill -9 of the log: shards answer 503 until it is back, then catch up
        mark = len(node.lines)
        os.kill(pid_of("log-0"), signal.SIGKILL)
        await node.logged(r"log-0 exited with status -9", mark)
        await node.logged(r"log serving on", mark)
        await more_acked()
        faults.append("kill -9 log-0")
        await asyncio.sleep(LOAD_S)

        # 3. a slow consumer: its next connection has a tiny receive window and
        # stops reading while 8 MB are sent to it (more than the kernel's buffers
        # hold: the rest piles up in the shard past slow_consumer_bytes)
        slow.rcvbuf = 4096
        slow.drop()
        await slow.until(lambda: slow.live and slow.connects >= 2)
        assert slow.conn is not None
        slow.conn.tr.underlying_transport.pause_reading()
        bigs = regular[:4]
        for big in bigs:  # 250 each: within every sender's burst of the rate limit
            for _ in range(250):
                big.send(slow.uid, content="s" * 8000)
        for big in bigs:
            await big.until(lambda big=big: not any(
                p["content"].startswith("sss") for p in big.pending.values()), timeout=60)
        slow.rcvbuf = 0
        slow.conn.tr.underlying_transport.resume_reading()
        await slow.until(lambda: 4009 in slow.closes, timeout=30)
        await slow.until(lambda: slow.live)
        faults.append("slow consumer (4009)")
        await asyncio.sleep(LOAD_S)

        # 4. a flood: 900 frames at once, past the burst of 600: closed 4008
        for _ in range(900):
            flooder.send(uids[0])
        await flooder.until(lambda: 4008 in flooder.closes, timeout=30)
        await flooder.until(lambda: flooder.live)
        await more_acked()
        faults.append("flood (4008)")
        await asyncio.sleep(LOAD_S)

        # 5. the disk is full for a few seconds: the batches SQLite cannot write
        # reach their senders as 503 "retry", then the node recovers. Some
        # commits may still succeed meanwhile: the WAL restarts from its start
        # after a checkpoint, into space the file already holds, so those acks
        # are for stored rows (the final count checks every ack against the
        # store), not a promise broken.
        mark = len(node.lines)
        retried = sum(d.retryable for d in devices)
        filler = disk / "filler"
        fill(filler)
        await node.logged(r"not stored: database or disk is full", mark, timeout=30)
        await regular[0].until(lambda: sum(d.retryable for d in devices) > retried,
                               timeout=30)
        await asyncio.sleep(3)
        filler.unlink()
        await more_acked()
        faults.append("disk full for 3 s")
        await asyncio.sleep(LOAD_S)

        # 6. kill -9 of the whole node (every process at once), started again at
        # once on the same ports: the clients reconnect and resume
        ports = {"chat_port": node.port, "api_port": node.api_port}
        node.kill_all()
        node = NodeProcess(data, "--shards", "2", env=env, **ports)
        node_procs.append(node)
        await node.started()
        current[0] = node
        await more_acked()
        faults.append("kill -9 of the whole node, restarted at once")
        await asyncio.sleep(LOAD_S)

        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for d in devices:
            await d.all_acked(timeout=60)
        for d in devices:
            await d.final_sync()
        counts = check_devices(devices, data / "chatd.db")
        for d in devices:
            await d.stop()
        closes: dict[str, int] = {}
        for d in devices:
            for code in d.closes:
                closes[str(code)] = closes.get(str(code), 0) + 1
        node.close()
    print("chaos soak faults:", ", ".join(faults))
    print("chaos soak counts:", counts)
    print("chaos soak closes seen by clients:", closes)
    assert counts["acked"] == counts["sent"] == counts["stored"], counts
    assert counts["duplicates"] == counts["lost"] == counts["foreign"] == 0, counts
    assert counts["disorder"] == counts["errors"] == counts["unacked"] == 0, counts
    assert counts["retryable_errors"] > 0, "no fault reached a client as error 503"
