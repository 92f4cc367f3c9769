"""One measured run: one scenario against one server, with N load processes.

``run_once`` builds the plan, starts the workers, connects them, samples the
server (CPU, RSS, fds, store size) once a second and at the edges of the
measured window, lets the load drain, and turns what the workers report into
one result dict (a JSON line; see bench/README.md for the fields).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import resource
import secrets
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from chatd_bench.hist import Histogram
from chatd_bench.plan import Plan, pairs, split
from chatd_bench.servers import ProcTree
from chatd_bench.setup import Users, layout_key
from chatd_bench.tally import Tally
from chatd_bench.worker import worker_entry

#: fds a load process needs besides its connections
FD_MARGIN = 64
#: a generator process busier than this was probably the limit
CLIENT_BUSY = 0.85


class BenchError(Exception):
    """The run cannot be done as asked (limits, crashed worker, dead server)."""


def generator_bound(client_util_max: float | None, side_util: float | None) -> bool:
    """Whether the load generator, not the server, was the limit of a run: its
    busiest load process was at least ``CLIENT_BUSY`` of a CPU while the server
    side (chatd or the peer, with its engines) was below that. The run and
    ``chatd-bench report`` both decide with this."""
    if client_util_max is None or side_util is None:
        return False
    return client_util_max >= CLIENT_BUSY and side_util < CLIENT_BUSY


@dataclasses.dataclass
class Options:
    scenario: str
    procs: int = 1
    duration_s: float = 10.0
    users: int = 200
    window: int = 10
    rate: float = 0.0  # offered messages/s in all; 0 = closed loop
    members: int = 10
    groups: int = 2
    senders: int = 2
    conns: int = 1000
    conn_rate: float = 2000.0
    hold_s: float = 3.0
    group_share: float = 0.1
    image_share: float = 0.1
    churn_share: float = 0.1
    churn_per_s: float = 5.0
    hb_interval_s: float = 30.0
    offline_s: float = 0.5
    drain_s: float = 10.0
    binary: bool = False
    gen_cpus: list[int] | None = None
    spread_sources: bool = True
    sample_s: float = 1.0
    #: where users connect on a many-shard chatd: "kernel" (the chat port;
    #: SO_REUSEPORT spreads them), "same" (a pair / a group's members on one
    #: shard), "cross" (every private message crosses shards; a group's
    #: members dealt over the shards)
    placement: str = "kernel"


@dataclasses.dataclass
class Target:
    name: str
    url: str  # ws://host:port/chat
    peer: bool
    pid: int | None = None
    store_bytes: Callable[[], int] | None = None
    alive: Callable[[], bool] | None = None
    #: each shard's own url (chatd's shard_base_port), or each node's of a
    #: cluster: the slots ``placement`` puts users in
    shard_urls: list[str] | None = None
    #: the slots share no port the kernel spreads users over (a cluster's
    #: nodes): ``kernel`` placement deals users round-robin over them instead
    round_robin: bool = False
    #: every chatd process tree the server figures sum over (default: ``pid``'s)
    pids: list[int] | None = None
    #: the engines beside chatd, measured apart: name -> root pid of its tree
    #: (``nats``: nats-server; ``postgres``: the postmaster and its backends)
    engines: dict[str, int] = dataclasses.field(default_factory=dict)


def placement_urls(opts: Options, n: int, target: Target, plan: Plan) -> list[str] | None:
    """The url each user connects to, by ``opts.placement`` (None: the target's).

    ``same``: a private pair, or a group's members, in one slot; ``cross``: a
    pair's sender in slot k and receiver in slot k+1 (every private message
    crosses), a group's members dealt over the slots; ``kernel``: the target's
    one url (SO_REUSEPORT spreads them), or where the slots share no port
    (``round_robin``: a cluster's nodes) users dealt over them round-robin, a
    group's members as with ``cross``.
    """
    shards = target.shard_urls
    if not shards or (opts.placement == "kernel" and not target.round_robin):
        return None
    k = len(shards)
    # round-robin by user index; mixed, soak and connect keep it
    where = [i % k for i in range(n)]
    if opts.scenario == "private" and opts.placement != "kernel":
        for pair, (s, r) in enumerate(pairs(n)):
            where[s] = pair % k
            where[r] = (pair + (1 if opts.placement == "cross" else 0)) % k
    elif opts.scenario == "group":
        for g in range(len(plan.gids)):
            # cross: deal each group's members over the slots by their place in
            # the group (by user index, group g's members g, g+G, ... would all
            # land on one slot whenever G and the slot count share a factor)
            for j, i in enumerate(plan.members(g)):
                where[i] = g % k if opts.placement == "same" else (g + j) % k
    return [shards[w] for w in where]


def layouts_for(opts: Options) -> list[tuple[int, int]]:
    """The group layouts (G, L) a scenario needs from the set-up."""
    if opts.scenario == "group":
        return [(opts.groups, opts.groups * opts.members)]
    if opts.scenario in ("mixed", "soak"):
        return [(opts.groups, opts.users)]
    return []


def users_needed(opts: Options) -> int:
    if opts.scenario == "connect":
        return opts.conns
    if opts.scenario == "group":
        return opts.groups * opts.members
    return opts.users


def splittable(opts: Options) -> int:
    """How many load processes the scenario's load can be split over: private
    pairs, whole groups, connections, or users (mixed, soak). More processes
    than this would have nothing to do."""
    if opts.scenario == "private":
        return max(1, opts.users // 2)
    if opts.scenario == "group":
        return max(1, opts.groups)
    if opts.scenario == "connect":
        return max(1, opts.conns)
    return max(1, opts.users)


def build_specs(opts: Options, users: Users, target: Target) -> tuple[Plan, list[dict[str, Any]]]:
    """The plan and one spec per load process."""
    n = users_needed(opts)
    procs = opts.procs
    layouts = layouts_for(opts)
    if layouts:
        g, limit = layouts[0]
        gids = list(range(g)) if target.peer else users.groups[layout_key(g, limit)]
    else:
        gids, limit = [], 0
    plan = Plan(uids=users.uids[:n], gids=gids, group_limit=limit)
    closed = opts.rate <= 0 and opts.scenario in ("private", "group")
    base: dict[str, Any] = {
        "scenario": opts.scenario, "peer": target.peer, "plan": plan, "url": target.url,
        "tokens": None if target.peer else users.tokens[:n], "closed": closed,
        "window": opts.window, "binary": opts.binary and not target.peer,
        "track_last": opts.scenario == "group", "offline_s": opts.offline_s,
        "cpus": opts.gen_cpus, "pairs": [], "conn_rate": 0.0,
        "nonce": secrets.token_hex(4),
        "urls": placement_urls(opts, n, target, plan),
    }
    if opts.spread_sources and ("//127." in target.url or "//localhost" in target.url):
        base["source_addrs"] = [f"127.0.{b}.{a}" for b in range(0, 4) for a in range(2, 250)]
    specs = []
    for w in range(procs):
        spec = dict(base, wid=w)
        if opts.scenario == "connect":
            spec["mine"] = list(range(n))[w::procs]
            spec["conn_rate"] = opts.conn_rate / procs
            spec["conn_concurrency"] = 1024
        elif opts.scenario == "private":
            my_pairs = pairs(n)[w::procs]
            spec["pairs"] = my_pairs
            spec["mine"] = [u for p in my_pairs for u in p]
            spec["rate"] = opts.rate / procs
        elif opts.scenario == "group":
            my_groups = list(range(len(gids)))[w::procs]
            spec["mine"] = [i for g in my_groups for i in plan.members(g)]
            spec["group_senders"] = {g: list(plan.members(g))[:opts.senders] for g in my_groups}
            spec["rate"] = opts.rate / procs
        else:  # mixed, soak
            mine = split(list(range(n)), procs)[w]
            n_churn = int(len(mine) * opts.churn_share) if not target.peer else 0
            spec["mine"] = mine
            spec["churners"] = mine[len(mine) - n_churn:] if n_churn else []
            spec["senders"] = mine[:len(mine) - n_churn]
            spec["rate"] = (opts.rate or 100.0 * procs) / procs
            spec["group_share"] = opts.group_share
            spec["image_share"] = opts.image_share
            spec["hb_every_ns"] = int(opts.hb_interval_s * 1e9 / max(1, len(mine)))
            spec["churn_every_ns"] = (int(1e9 * procs / opts.churn_per_s)
                                      if opts.churn_per_s > 0 and n_churn else 0)
        specs.append(spec)
    return plan, specs


def check_fd_limits(specs: list[dict[str, Any]], server_pid: int | None) -> None:
    """Refuse, with the reason, a connection count the open-file limit blocks."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    most = max(len(s["mine"]) for s in specs)
    if most + FD_MARGIN > hard:
        need = -(-sum(len(s["mine"]) for s in specs) // (hard - FD_MARGIN))
        raise BenchError(
            f"open-file limit: a load process would hold {most} connections but may open "
            f"only {hard} files (ulimit -Hn); use --procs {need} or more")
    if server_pid is not None:
        try:
            import psutil

            soft, _ = psutil.Process(server_pid).rlimit(resource.RLIMIT_NOFILE)
        except Exception:  # noqa: BLE001 - not every platform tells
            return
        total = sum(len(s["mine"]) for s in specs)
        if 0 < soft < total + FD_MARGIN:
            raise BenchError(
                f"open-file limit: the server may open {soft} files but {total} connections "
                f"were asked for; raise its LimitNOFILE / ulimit -n or ask for fewer")


class _Trees:
    """Several process trees summed (a cluster's nodes)."""

    def __init__(self, pids: list[int]) -> None:
        self.trees = [ProcTree(pid) for pid in pids]

    def cpu_s(self) -> float:
        return sum(t.cpu_s() for t in self.trees)

    def rss(self) -> int:
        return sum(t.rss() for t in self.trees)

    def thread_cpu_s(self) -> dict[str, float]:
        out: collections.Counter[str] = collections.Counter()
        for t in self.trees:
            out.update(t.thread_cpu_s())
        return dict(out)

    def fds(self) -> int:
        return sum(t.fds() for t in self.trees)


class _Sampler:
    def __init__(self, target: Target) -> None:
        pids = target.pids or ([target.pid] if target.pid else [])
        self.tree = _Trees(pids) if pids else None
        self.engines = {name: ProcTree(pid) for name, pid in target.engines.items()}
        self.target = target
        self.series: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._last_t = self.t0
        self._last_cpu = self.cpu()
        self._last_engines = self.engines_cpu()
        self._last_delivered = 0
        self._last_sent = 0
        self._last_client = 0.0

    def cpu(self) -> float:
        return self.tree.cpu_s() if self.tree else 0.0

    def engines_cpu(self) -> dict[str, float]:
        """CPU seconds so far of each engine's process tree."""
        return {name: tree.cpu_s() for name, tree in self.engines.items()}

    def rss(self) -> int:
        return self.tree.rss() if self.tree else 0

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds so far of the server's threads, by name (``ProcTree``)."""
        return self.tree.thread_cpu_s() if self.tree else {}

    def sample(self, ticks: dict[int, dict[str, Any]], lat: Histogram) -> dict[str, Any]:
        now = time.monotonic()
        cpu = self.cpu()
        dt = max(1e-6, now - self._last_t)
        tally = Tally()
        client = 0.0
        for t in ticks.values():
            tally.merge(Tally.from_dict(t["tally"]))
            client += t["cpu_s"]
        row = {
            "t": round(now - self.t0, 3),
            "delivered_per_s": (tally.delivered - self._last_delivered) / dt,
            "sent_per_s": (tally.sent - self._last_sent) / dt,
            "p50_ms": lat.percentile(50) / 1e6, "p99_ms": lat.percentile(99) / 1e6,
            "server_cpu_pct": 100 * (cpu - self._last_cpu) / dt,
            "client_cpu_pct": 100 * (client - self._last_client) / dt if self._last_client else 0,
            "server_rss_mib": self.rss() / 2**20,
            "server_fds": self.tree.fds() if self.tree else 0,
            "conns": sum(t["conns"] for t in ticks.values()),
            "delivered": tally.delivered, "sent": tally.sent,
        }
        if self.target.store_bytes:
            row["store_mib"] = self.target.store_bytes() / 2**20
        engines = self.engines_cpu()
        for name, spent in engines.items():
            row[f"{name}_cpu_pct"] = 100 * (spent - self._last_engines[name]) / dt
        self._last_engines = engines
        self._last_t, self._last_cpu = now, cpu
        self._last_delivered, self._last_sent, self._last_client = (
            tally.delivered, tally.sent, client)
        self.series.append(row)
        return row


def _progress(label: str, row: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    line = (f"\r[{label}] {row['t']:6.1f}s conns {row['conns']:>6} "
            f"sent {row['sent']:>9} deliv {row['delivered']:>9} "
            f"{row['delivered_per_s']:>9.0f}/s p50 {row['p50_ms']:7.2f}ms "
            f"p99 {row['p99_ms']:7.2f}ms srv {row['server_cpu_pct']:4.0f}% "
            f"cli {row['client_cpu_pct']:4.0f}%"
            + "".join(f" {name[:4]} {row[f'{name}_cpu_pct']:3.0f}%"
                      for name in ("nats", "postgres") if f"{name}_cpu_pct" in row)
            + "  ")
    sys.stderr.write(line)
    sys.stderr.flush()


def run_once(opts: Options, users: Users, target: Target, label: str = "",
             quiet: bool = False) -> dict[str, Any]:
    """Run ``opts.scenario`` once against ``target``; the result dict."""
    label = label or f"{target.name} {opts.scenario}"
    plan, specs = build_specs(opts, users, target)
    check_fd_limits(specs, target.pid)
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for spec in specs:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker_entry, args=(spec, child), daemon=True)
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    try:
        return _drive(opts, plan, specs, target, pipes, label, quiet)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        if not quiet:
            sys.stderr.write("\n")


def _recv_all(pipes: list[Any], kind: str, timeout_s: float,
              on_tick: Callable[[int, dict[str, Any]], None] | None = None,
              idle: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(pipes):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"load processes did not answer {kind!r} in {timeout_s:.0f}s")
        for conn in wait([p for i, p in enumerate(pipes) if i not in got], min(left, 0.5)):
            assert isinstance(conn, Connection)
            w = pipes.index(conn)
            try:
                msg = conn.recv()
            except EOFError:
                raise BenchError(f"load process {w} died") from None
            if msg[0] == "crash":
                raise BenchError(f"load process {w} crashed:\n{msg[1]}")
            if msg[0] == kind:
                got[w] = msg[1]
            elif msg[0] == "tick" and on_tick:
                on_tick(w, msg[1])
        if idle:
            idle()
    return [got[i] for i in range(len(pipes))]


def by_thread(before: dict[str, float], after: dict[str, float], units: int
              ) -> dict[str, float]:
    """µs of CPU per unit of each thread name between two readings, biggest
    first; names that took nothing are left out."""
    per = {name: 1e6 * (cpu - before.get(name, 0.0)) / units for name, cpu in after.items()}
    return {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0}


def _drive(opts: Options, plan: Plan, specs: list[dict[str, Any]], target: Target,
           pipes: list[Any], label: str, quiet: bool) -> dict[str, Any]:
    _recv_all(pipes, "hello", 60)
    sampler = _Sampler(target)
    rss0 = sampler.rss()
    ticks: dict[int, dict[str, Any]] = {}
    tick_lat = Histogram()

    def on_tick(w: int, stats: dict[str, Any]) -> None:
        ticks[w] = stats
        tick_lat.merge(Histogram.from_dict(stats["tick_lat"]))

    next_sample = [time.monotonic() + opts.sample_s]

    def idle() -> None:
        nonlocal tick_lat
        if time.monotonic() >= next_sample[0]:
            next_sample[0] += opts.sample_s
            row = sampler.sample(ticks, tick_lat)
            tick_lat = Histogram()
            _progress(label, row, quiet)
            if target.alive is not None and not target.alive():
                raise BenchError(f"{target.name} died during the run")

    n_conns = sum(len(s["mine"]) for s in specs)
    t_conn = time.monotonic_ns() + 200_000_000
    cpu_c0 = sampler.cpu()
    eng_c0 = sampler.engines_cpu()
    threads0 = sampler.thread_cpu()
    w0 = time.monotonic()
    for p in pipes:
        p.send(("connect", t_conn))
    connected = _recv_all(pipes, "connected", 120 + n_conns / 200, idle=idle)
    ramp_s = time.monotonic() - w0 - 0.2
    cpu_c1 = sampler.cpu()
    eng_c1 = sampler.engines_cpu()
    threads1 = sampler.thread_cpu()
    rss1 = sampler.rss()
    hs = Histogram()
    conn_tally = Tally()
    errors: list[str] = []
    for c in connected:
        hs.merge(Histogram.from_dict(c["hs_lat"]))
        conn_tally.merge(Tally.from_dict(c["tally"]))
        errors += c["errors"]
    ok_conns = sum(c["conns"] for c in connected)
    result: dict[str, Any] = {
        "target": target.name, "scenario": opts.scenario, "label": label,
        "procs": opts.procs, "conns": ok_conns, "conns_asked": n_conns,
        # the shape of the load, which ``chatd-bench report`` groups runs by
        "users": n_conns, "rate": opts.rate,
        "window": opts.window if opts.rate <= 0 and opts.scenario in ("private", "group")
        else None,
        "gen_cpus": opts.gen_cpus,
        **({"groups": opts.groups} if opts.scenario in ("group", "mixed", "soak") else {}),
        **({"senders": opts.senders} if opts.scenario == "group" else {}),
        **({"conn_rate": opts.conn_rate} if opts.scenario == "connect" else {}),
        "handshake_ms": hs.summary_ms(),
        "rss_kib_per_conn": (rss1 - rss0) / 1024 / ok_conns if ok_conns and rss0 else None,
        "server_rss_mib": rss1 / 2**20,
    }
    placed = specs[0].get("urls")
    if placed and target.shard_urls:
        # where placement put the users: connections planned per shard or node
        result["conns_per_slot"] = [placed.count(u) for u in target.shard_urls]
    if opts.scenario == "connect":
        ramp_s = max(ramp_s, 1e-3)
        # each load process's own CPU over the ramp: was the generator the limit?
        ramp_cpu = [float(c.get("cpu_s", 0.0)) for c in connected]
        result.update(unit="handshake", units=ok_conns, duration_s=ramp_s,
                      throughput_per_s=ok_conns / ramp_s,
                      server_cpu_s=cpu_c1 - cpu_c0,
                      engines_cpu_s={k: eng_c1[k] - eng_c0[k] for k in eng_c1},
                      client_cpu_s=sum(ramp_cpu),
                      client_util_max=max(ramp_cpu, default=0.0) / ramp_s,
                      latency_ms=hs.summary_ms())
        t_hold = time.monotonic()
        cpu_h0 = sampler.cpu()
        while time.monotonic() - t_hold < opts.hold_s:
            time.sleep(min(0.2, opts.sample_s))
            idle()
        hold = time.monotonic() - t_hold
        result["hold_server_cpu_pct"] = 100 * (sampler.cpu() - cpu_h0) / max(hold, 1e-3)
        result["rss_kib_per_conn_after_hold"] = (
            (sampler.rss() - rss0) / 1024 / ok_conns if ok_conns and rss0 else None)
        for p in pipes:
            p.send(("finish",))
        finals = _recv_all(pipes, "result", 60)
        tally = conn_tally
        client_cpu = result["client_cpu_s"]
        problems = tally.problems(acks_expected=False)
        lost_conns = ok_conns - sum(f["conns"] for f in finals)
        if lost_conns > 0:
            problems.append(f"{lost_conns} connections dropped while held")
    else:
        t_start = time.monotonic_ns() + 300_000_000
        t_stop = t_start + int(opts.duration_s * 1e9)
        for p in pipes:
            p.send(("go", t_start, t_stop))
        while time.monotonic_ns() < t_start:
            time.sleep(0.001)
        def pump(timeout_s: float) -> None:
            """Take the load processes' reports for up to ``timeout_s``."""
            for conn in wait(pipes, timeout_s):
                assert isinstance(conn, Connection)
                msg = conn.recv()
                if msg[0] == "tick":
                    on_tick(pipes.index(conn), msg[1])
                elif msg[0] == "crash":
                    raise BenchError(f"load process crashed:\n{msg[1]}")
            idle()

        cpu0 = sampler.cpu()
        eng0 = sampler.engines_cpu()
        threads0 = sampler.thread_cpu()
        store0 = target.store_bytes() if target.store_bytes else 0
        # the measured window
        while time.monotonic_ns() < t_stop:
            pump(min(0.05, max(0, (t_stop - time.monotonic_ns()) / 1e9)))
        cpu1 = sampler.cpu()
        eng1 = sampler.engines_cpu()
        threads1 = sampler.thread_cpu()
        window_s = opts.duration_s
        # the drain: until every expected copy (and ack) is in, or drain_s
        drain_end = time.monotonic() + opts.drain_s
        while time.monotonic() < drain_end:
            pump(0.1)
            if len(ticks) == len(pipes) and ticks_settled(ticks, target.peer):
                break
        for p in pipes:
            p.send(("finish",))
        finals = _recv_all(pipes, "result", 60, on_tick=lambda w, s: None)
        tally = Tally()
        lat, ack_lat, last_lat = Histogram(), Histogram(), Histogram()
        delivered_w = sent_w = 0
        client_cpu = 0.0
        client_max = 0.0
        for f in finals:
            tally.merge(Tally.from_dict(f["tally"]))
            lat.merge(Histogram.from_dict(f["lat"]))
            ack_lat.merge(Histogram.from_dict(f["ack_lat"]))
            last_lat.merge(Histogram.from_dict(f["last_lat"]))
            delivered_w += f["delivered_at_stop"]
            sent_w += f["sent_at_stop"]
            client_cpu += f["cpu_window_s"]
            client_max = max(client_max, f["cpu_window_s"] / window_s)
            errors += f["errors"]
        tally.connect_failures += conn_tally.connect_failures
        server_cpu = cpu1 - cpu0
        if opts.scenario == "private":
            unit, units = "message", delivered_w
        elif opts.scenario == "group":
            unit, units = "delivery", delivered_w
        else:
            unit, units = "message", sent_w
        result.update(
            unit=unit, units=units, duration_s=window_s,
            throughput_per_s=units / window_s,
            deliveries_per_s=delivered_w / window_s, messages_per_s=sent_w / window_s,
            server_cpu_s=server_cpu,
            engines_cpu_s={k: eng1[k] - eng0[k] for k in eng1},
            latency_ms=lat.summary_ms(), ack_latency_ms=ack_lat.summary_ms(),
            client_cpu_s=client_cpu, client_util_max=client_max,
        )
        if opts.scenario == "group":
            result["last_member_latency_ms"] = last_lat.summary_ms()
            result["members"] = opts.members
            result["messages_per_s"] = sent_w / window_s
        if units and opts.scenario in ("mixed", "soak"):
            result["server_cpu_us_per_delivery"] = 1e6 * server_cpu / max(1, delivered_w)
        if target.store_bytes:
            grown = target.store_bytes() - store0
            result["store_bytes_per_message"] = grown / max(1, tally.sent)
        problems = tally.problems(acks_expected=not target.peer)
        if tally.unacked and not target.peer:
            problems.append(f"{sum(f.get('pending_acks', 0) for f in finals)} acks still "
                            "pending at the end")
    result["server_cpu_us_per_unit"] = (
        1e6 * result["server_cpu_s"] / result["units"] if result["units"] and target.pid
        else None)
    result["server_util"] = result["server_cpu_s"] / max(1e-9, result["duration_s"])
    # where the server's CPU went, by thread name (the shards' loops, the
    # SQLite writer, ...), per unit, over the same window
    if result["units"] and target.pid:
        result["server_cpu_us_per_unit_by_thread"] = by_thread(
            threads0, threads1, result["units"])
    # the engines (nats-server, PostgreSQL) apart from chatd, per unit too; and
    # everything the server side spent, which decides who was the limit
    engines_s = result["engines_cpu_s"]
    for name, spent in engines_s.items():
        result[f"{name}_cpu_s"] = spent
        result[f"{name}_cpu_us_per_unit"] = (1e6 * spent / result["units"]
                                             if result["units"] else None)
    # (without engines: the server's own; SQLite works inside chatd's processes,
    # so this is the figure that compares the stores)
    total = result["server_cpu_s"] + sum(engines_s.values())
    result["total_cpu_us_per_unit"] = (1e6 * total / result["units"]
                                       if result["units"] and target.pid else None)
    side_util = (result["server_cpu_s"] + sum(engines_s.values())) / max(
        1e-9, result["duration_s"])
    result["server_side_util"] = side_util
    if client_cpu is not None:
        # the load processes' own CPU together (1.0: one CPU's worth), beside
        # the busiest one's (client_util_max), which decides the limit
        result["client_util"] = client_cpu / max(1e-9, result["duration_s"])
        result["client_bound"] = generator_bound(result.get("client_util_max", 0), side_util)
        if result["client_bound"]:
            result.setdefault("warnings", []).append(
                f"the load generator was the limit (a load process at "
                f"{100 * result['client_util_max']:.0f}% CPU, server side at "
                f"{100 * side_util:.0f}%): throughput is a lower bound; "
                "compare server CPU per unit")
    if not target.pid:
        result.setdefault("warnings", []).append(
            "server process unknown: no server CPU or memory figures")
    result["tally"] = tally.to_dict()
    result["problems"] = problems
    result["ok"] = not problems
    result["errors"] = errors[:10]
    result["timeseries"] = sampler.series
    if opts.scenario == "soak":
        result["leaks"] = leak_flags(sampler.series)
        if result["leaks"]:
            result.setdefault("warnings", []).extend(result["leaks"])
    return result


def ticks_settled(ticks: dict[int, dict[str, Any]], peer: bool) -> bool:
    """Whether the drain is over: everything expected arrived, no ack pending,
    nobody is offline."""
    tally = Tally()
    for t in ticks.values():
        tally.merge(Tally.from_dict(t["tally"]))
    offline = sum(t["offline"] for t in ticks.values())
    pending = sum(t["pending_acks"] for t in ticks.values())
    return (tally.delivered + tally.misroutes >= tally.expected and offline == 0
            and (peer or pending == 0))


def leak_flags(series: list[dict[str, Any]]) -> list[str]:
    """Growth that looks like a leak: RSS or fds of the second half's last
    quarter well above its first quarter (the first half is warm-up)."""
    body = series[len(series) // 2:]
    if len(body) < 8:
        return []
    q = len(body) // 4
    out = []
    for key, rel, absolute, unit in (("server_rss_mib", 0.10, 8.0, "MiB"),
                                     ("server_fds", 0.10, 20, "fds")):
        first = sorted(r[key] for r in body[:q])[q // 2]
        last = sorted(r[key] for r in body[-q:])[q // 2]
        if last - first > max(absolute, rel * first):
            out.append(f"possible leak: server {key} grew from {first:.1f} to {last:.1f} "
                       f"{unit} in the second half of the soak")
    return out
