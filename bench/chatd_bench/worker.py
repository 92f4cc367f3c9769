"""One load process: picows connections on uvloop, driven by the parent.

The parent sends commands over a pipe and the worker answers:

- ``("connect", t0_ns)``: open this worker's connections (at ``conn_rate`` per
  second from ``t0_ns`` for the connect scenario, as fast as allowed otherwise);
  answer ``("connected", stats)``;
- ``("go", t_start_ns, t_stop_ns)``: run the scenario's load until ``t_stop_ns``,
  sending ``("tick", stats)`` every second (and on through the drain);
- ``("finish",)``: answer ``("result", stats)`` and exit.

Latency is measured from the *intended* send time (open loop: the schedule;
closed loop: the moment the window allowed the send), so a stall shows up in
the figures instead of silently slowing the sender down.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
import traceback
from typing import Any, TypeAlias

import msgspec
from picows import WSListener, WSMsgType, ws_connect

from chatd.wire import Message
from chatd_bench.hist import Histogram
from chatd_bench.plan import CMD_GROUP, CMD_PRIVATE, Plan, make_content, parse_content
from chatd_bench.tally import Tally

TEXT = WSMsgType.TEXT
BINARY = WSMsgType.BINARY
CLOSE = WSMsgType.CLOSE
_now = time.monotonic_ns
TICK_NS = 1_000_000_000


# the protocol's own schema (chatd.wire), so the bench and the server agree
Frame: TypeAlias = Message
_decode_json = msgspec.json.Decoder(Frame).decode
_decode_mp = msgspec.msgpack.Decoder(Frame).decode


class Client(WSListener):
    """One bench connection of user ``i``."""

    def __init__(self, worker: Worker, i: int) -> None:
        self.w = worker
        self.i = i
        self.tr: Any = None
        self.last_seq: dict[int, int] = {}
        self.last_id = 0
        self.syncing = False
        self.leaving = False

    def on_ws_connected(self, transport: Any) -> None:
        self.tr = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        kind = frame.msg_type
        if kind is TEXT:
            self.w.on_frame(self, _decode_json(frame.get_payload_as_bytes()))
        elif kind is BINARY:
            self.w.on_frame(self, _decode_mp(frame.get_payload_as_bytes()))
        elif kind is CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.w.on_disconnect(self)


class Worker:
    def __init__(self, spec: dict[str, Any], pipe: Any) -> None:
        self.spec = spec
        self.pipe = pipe
        self.plan: Plan = spec["plan"]
        self.scenario: str = spec["scenario"]
        self.peer: bool = spec["peer"]
        self.mine: list[int] = spec["mine"]
        self.tally = Tally()
        self.lat = Histogram()        # per delivery (live), from intended send
        self.ack_lat = Histogram()    # sender: intended send -> ack
        self.last_lat = Histogram()   # group: intended send -> last member
        self.hs_lat = Histogram()     # handshake, from intended start
        self.tick_lat = Histogram()
        self.conns: dict[int, Client] = {}
        self.pending_acks: dict[str, int] = {}
        self.remaining: dict[tuple[int, int], int] = {}  # group msg -> members left
        self.seq: dict[int, int] = {}
        self.running = False
        self.finished = False
        self.errors: list[str] = []
        self.offline = 0
        self.rng = random.Random(spec["wid"] * 7919 + 1)
        self.cmd_queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.delivered_at_stop = -1
        self.sent_at_stop = -1
        self.cpu_at_go = 0.0
        self.cpu_at_stop = 0.0
        self.t_stop = 0
        plan = self.plan
        # closed loop: what the receiver of a message triggers
        self.partner: dict[int, int] = {}
        if self.scenario == "private":
            for s, r in spec["pairs"]:
                self.partner[r] = s
        self.group_senders: dict[int, list[int]] = spec.get("group_senders", {})
        self.base = spec["url"]
        # cids are deduped per user by chatd forever: unique per run, not just per process
        self.nonce = spec["nonce"]
        self.binary = bool(spec.get("binary"))
        self._fmt_user = {i: (plan.uids[i]) for i in self.mine}

    # --- frames in ------------------------------------------------------------------

    def on_frame(self, c: Client, m: Frame) -> None:
        cmd = m.cmd
        if cmd in (CMD_PRIVATE, CMD_GROUP):
            self.on_delivery(c, m)
        elif cmd == 1:
            t = self.pending_acks.pop(m.cid, None)
            if t is None:
                self.tally.unknown_acks += 1
            else:
                self.tally.acked += 1
                self.ack_lat.record(_now() - t)
            if m.id > c.last_id:
                c.last_id = m.id
        elif cmd == 4:
            c.syncing = False
            if m.id > c.last_id:
                c.last_id = m.id
        elif cmd == 5:
            self.tally.errors += 1
            if len(self.errors) < 5:
                self.errors.append(f"user {c.i}: error {m.amount} {m.memo} (cid {m.cid})")

    def on_delivery(self, c: Client, m: Frame) -> None:
        now = _now()
        tally = self.tally
        if m.id > c.last_id:
            c.last_id = m.id
        key = parse_content(m.content)
        if key is not None and key.sender == c.i:
            tally.own += 1  # a copy of this user's own message (sync replays them)
            return
        if not self.plan.check(c.i, m.cmd, m.dstid, m.userid, key):
            tally.misroutes += 1
            if len(self.errors) < 5:
                self.errors.append(f"user {c.i} got {m!r}")
            return
        assert key is not None
        last = c.last_seq.get(key.sender, -1)
        if key.seq <= last:
            tally.dups += 1
            if len(self.errors) < 5:
                self.errors.append(f"user {c.i}: seq {key.seq} from {key.sender} after {last}")
            return
        c.last_seq[key.sender] = key.seq
        tally.delivered += 1
        if c.syncing:
            tally.synced += 1
        else:
            lat = now - key.t_ns
            self.lat.record(lat)
            self.tick_lat.record(lat)
        if m.cmd == CMD_GROUP:
            k = (key.sender, key.seq)
            left = self.remaining.get(k)
            if left is not None:
                if left <= 1:
                    del self.remaining[k]
                    self.last_lat.record(now - key.t_ns)
                    if self.running and self.spec["closed"]:
                        self.send(key.sender, CMD_GROUP, key.target, now)
                else:
                    self.remaining[k] = left - 1
        elif self.running and self.spec["closed"]:
            s = self.partner.get(c.i)
            if s == key.sender:
                self.send(s, CMD_PRIVATE, c.i, now)

    def on_disconnect(self, c: Client) -> None:
        if self.conns.get(c.i) is c:
            del self.conns[c.i]
            if not c.leaving and not self.finished:
                self.tally.disconnects += 1
                if len(self.errors) < 5:
                    self.errors.append(f"user {c.i}: connection closed by the server")

    # --- frames out -----------------------------------------------------------------

    def send(self, s: int, cmd: int, target: int, t_ns: int, image: bool = False) -> None:
        c = self.conns.get(s)
        if c is None:
            return
        plan = self.plan
        seq = self.seq.get(s, 0) + 1
        self.seq[s] = seq
        content = make_content(s, seq, t_ns, target)
        dstid = plan.uids[target] if cmd == CMD_PRIVATE else plan.gids[target]
        msg: dict[str, Any] = {"cmd": cmd, "dstid": dstid, "media": 4 if image else 1,
                               "content": content}
        if image:
            msg["url"] = f"/files/{seq:x}.jpg"
            msg["pic"] = f"/files/{seq:x}.p.jpg"
        if self.peer:
            msg["userid"] = plan.uids[s]
        else:
            # the wall-clock ms first, as chatd's own clients do: a time-ordered
            # cid lands at the end of the server's cid index (docs/protocol.md)
            cid = f"{time.time_ns() // 1_000_000:012x}.{self.nonce}.{s}.{seq}"
            msg["cid"] = cid
            self.pending_acks[cid] = t_ns
        if self.binary:
            c.tr.send(BINARY, msgspec.msgpack.encode(msg))
        else:
            c.tr.send(TEXT, msgspec.json.encode(msg))
        self.tally.sent += 1
        if cmd == CMD_PRIVATE:
            self.tally.expected += 1
        else:
            n = plan.group_size(target) - 1
            self.tally.expected += n
            if self.spec["track_last"] and n > 0:
                self.remaining[(s, seq)] = n

    # --- connections ----------------------------------------------------------------

    async def open(self, i: int, prev: Client | None = None) -> Client | None:
        """Connect user ``i``; with ``prev`` (its last connection), resume:
        chatd replays what was missed (``last=`` in the handshake) before any
        live copy, and the new client starts where ``prev`` left off."""
        plan = self.plan
        tokens = self.spec["tokens"]
        urls = self.spec.get("urls")
        base = urls[i] if urls else self.base
        url = f"{base}?id={plan.uids[i]}&token={tokens[i] if tokens else 'bench'}"
        if prev is not None and not self.peer:
            url += f"&last={prev.last_id}"

        def make() -> Client:
            c = Client(self, i)
            if prev is not None:
                # before the handshake completes: replayed frames may come with it
                c.last_seq, c.last_id, c.syncing = prev.last_seq, prev.last_id, not self.peer
            return c

        kwargs: dict[str, Any] = {}
        addrs = self.spec.get("source_addrs")
        if addrs:
            kwargs["local_addr"] = (addrs[i % len(addrs)], 0)
        try:
            _, c = await ws_connect(make, url,
                                    websocket_handshake_timeout=30, read_buffer_init_size=4096,
                                    enable_auto_pong=True, use_aiofastnet=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            self.tally.connect_failures += 1
            if len(self.errors) < 5:
                self.errors.append(f"user {i}: connect failed: {type(exc).__name__}: {exc}")
            return None
        assert isinstance(c, Client)
        self.conns[i] = c
        return c

    async def connect_all(self, t0: int) -> None:
        rate = self.spec["conn_rate"]
        sem = asyncio.Semaphore(self.spec.get("conn_concurrency", 256))
        tasks = []

        async def one(i: int, intended: int) -> None:
            async with sem:
                c = await self.open(i)
                if c is not None:
                    self.hs_lat.record(_now() - intended)

        for k, i in enumerate(self.mine):
            intended = t0 + int(k * 1e9 / rate) if rate else _now()
            delay = intended - _now()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            tasks.append(asyncio.ensure_future(one(i, intended)))
            if len(tasks) >= 4096:
                await asyncio.gather(*tasks)
                tasks.clear()
        await asyncio.gather(*tasks)

    async def churn_one(self, i: int) -> None:
        c = self.conns.get(i)
        if c is None:
            return
        c.leaving = True
        self.offline += 1
        del self.conns[i]
        c.tr.send_close()
        c.tr.disconnect()
        await asyncio.sleep(self.spec["offline_s"])
        n = await self.open(i, prev=c)
        self.offline -= 1
        if n is None:
            return
        self.tally.reconnects += 1

    # --- load -----------------------------------------------------------------------

    async def load(self, t_start: int, t_stop: int) -> None:
        spec = self.spec
        self.t_stop = t_stop
        delay = t_start - _now()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        self.running = True
        self.cpu_at_go = _cpu()
        if spec["closed"]:
            now = _now()
            for _ in range(spec["window"]):
                for s, r in spec["pairs"]:
                    self.send(s, CMD_PRIVATE, r, now)
                for g, senders in self.group_senders.items():
                    for s in senders:
                        self.send(s, CMD_GROUP, g, now)
            await asyncio.sleep(max(0, t_stop - _now()) / 1e9)
        else:
            await self.open_loop(t_start, t_stop)
        self.running = False
        self.cpu_at_stop = _cpu()
        self.delivered_at_stop = self.tally.delivered
        self.sent_at_stop = self.tally.sent

    async def open_loop(self, t_start: int, t_stop: int) -> None:
        """Send on a fixed schedule: message k at t_start + k / rate."""
        spec = self.spec
        rate = spec["rate"]
        if rate <= 0:
            await asyncio.sleep(max(0, t_stop - _now()) / 1e9)
            return
        step = 1e9 / rate
        rng = self.rng
        mixed = self.scenario in ("mixed", "soak")
        jobs: list[tuple[int, int, int]] = [
            (s, CMD_PRIVATE, r) for s, r in spec["pairs"]
        ] + [(s, CMD_GROUP, g) for g, ss in self.group_senders.items() for s in ss]
        senders = spec.get("senders", [])
        n_users = len(self.plan.uids)
        group_share, image_share = spec.get("group_share", 0.0), spec.get("image_share", 0.0)
        hb_step = spec.get("hb_every_ns", 0)
        churn_step = spec.get("churn_every_ns", 0)
        churners = spec.get("churners", [])
        next_hb = t_start + (hb_step and rng.randrange(hb_step))
        next_churn = t_start + (churn_step and rng.randrange(churn_step))
        k = 0
        background: set[asyncio.Task[None]] = set()
        while True:
            now = _now()
            if now >= t_stop:
                break
            while True:
                intended = t_start + int(k * step)
                if intended > now or intended >= t_stop:
                    break
                if mixed:
                    s = senders[rng.randrange(len(senders))]
                    g = self.plan.group_of(s)
                    if g >= 0 and rng.random() < group_share:
                        self.send(s, CMD_GROUP, g, intended)
                    else:
                        d = rng.randrange(n_users - 1)
                        d += d >= s
                        self.send(s, CMD_PRIVATE, d, intended, rng.random() < image_share)
                else:
                    s, cmd, target = jobs[k % len(jobs)]
                    self.send(s, cmd, target, intended)
                k += 1
            if hb_step:
                while next_hb <= now:
                    next_hb += hb_step
                    c = self.conns.get(self.mine[rng.randrange(len(self.mine))])
                    if c is not None:
                        c.tr.send(TEXT, b'{"cmd":0}')
                        self.tally.heartbeats += 1
            if churn_step and churners:
                while next_churn <= now:
                    next_churn += churn_step
                    task = asyncio.ensure_future(
                        self.churn_one(churners[rng.randrange(len(churners))]))
                    background.add(task)
                    task.add_done_callback(background.discard)
            await asyncio.sleep(0.001)
        if background:
            await asyncio.gather(*background)

    # --- reporting ------------------------------------------------------------------

    def stats(self, final: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wid": self.spec["wid"],
            "tally": self.tally.to_dict(),
            "conns": len(self.conns),
            "offline": self.offline,
            "pending_acks": len(self.pending_acks),
            "tick_lat": self.tick_lat.to_dict(),
            "cpu_s": _cpu(),
        }
        self.tick_lat = Histogram()
        if final:
            out.update(
                lat=self.lat.to_dict(), ack_lat=self.ack_lat.to_dict(),
                last_lat=self.last_lat.to_dict(), hs_lat=self.hs_lat.to_dict(),
                delivered_at_stop=self.delivered_at_stop, sent_at_stop=self.sent_at_stop,
                cpu_window_s=self.cpu_at_stop - self.cpu_at_go, errors=self.errors,
                group_incomplete=len(self.remaining))
        return out

    async def ticker(self) -> None:
        while not self.finished:
            await asyncio.sleep(1.0)
            if not self.finished:
                self.pipe.send(("tick", self.stats()))

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        self.pipe.send(("hello", os.getpid()))
        ticker: asyncio.Task[None] | None = None
        load: asyncio.Task[None] | None = None
        while True:
            cmd = await self.cmd_queue.get()
            if cmd[0] == "connect":
                t0 = _now()
                cpu0 = time.process_time()
                await self.connect_all(cmd[1])
                self.pipe.send(("connected", {"hs_lat": self.hs_lat.to_dict(),
                                              "conns": len(self.conns),
                                              "took_s": (_now() - t0) / 1e9,
                                              "cpu_s": time.process_time() - cpu0,
                                              "tally": self.tally.to_dict(),
                                              "errors": self.errors}))
            elif cmd[0] == "go":
                ticker = asyncio.ensure_future(self.ticker())
                load = asyncio.ensure_future(self.load(cmd[1], cmd[2]))
            elif cmd[0] == "finish":
                if load is not None:
                    await load
                self.finished = True
                if ticker is not None:
                    ticker.cancel()
                self.pipe.send(("result", self.stats(final=True)))
                return

    def _on_pipe(self) -> None:
        while self.pipe.poll():
            try:
                self.cmd_queue.put_nowait(self.pipe.recv())
            except EOFError:
                self.cmd_queue.put_nowait(("finish",))
                asyncio.get_running_loop().remove_reader(self.pipe.fileno())
                return


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def worker_entry(spec: dict[str, Any], pipe: Any) -> None:
    """Process target: pin, raise the fd limit, run the worker on uvloop."""
    import uvloop

    cpus = spec.get("cpus")
    if cpus:
        os.sched_setaffinity(0, cpus)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(Worker(spec, pipe).main())
    except Exception:  # noqa: BLE001 - the parent must hear why
        pipe.send(("crash", traceback.format_exc()))
        raise
