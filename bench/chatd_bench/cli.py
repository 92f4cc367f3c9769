"""``chatd-bench``: load-test chatd (and, with ``--vs``, the peer relays).

Examples::

    chatd-bench private --duration 10 --pin 0:1
    chatd-bench upload --duration 10 --window 4     # HTTP API: 1 MB JPEG + preview
    chatd-bench login --duration 10 --window 8      # HTTP API: scrypt logins
    chatd-bench group --members 10,100,1000 --vs
    chatd-bench connect --conns 10000 --conn-rate 2000 --vs picows,node
    chatd-bench mixed --rate 2000 --users 2000 --json out.jsonl --plot out.png
    chatd-bench private --url ws://10.0.0.5:8080/chat --users-file users.json
    chatd-bench private --store sqlite,postgres --pin 0:1   # the stores side by side
    chatd-bench private --nodes 1,2,3 --placement cross --window 8 --pin 0:1   # a cluster
    chatd-bench private --pin 0:1 --vs --rounds 3 --json r.jsonl
    chatd-bench report r.jsonl [more.jsonl ...] [--base picows] [--plot r.png]

`chatd-bench report FILE...` reads the JSON lines of earlier runs and prints,
per load shape, a row per target (medians over its runs, min-max), the ratios
to a base target (default: the first chatd one), the generator's own CPU, and
a warning for every run the generator limited or that was not clean
(`chatd-bench report --help`).

Load processes (--procs): by default one per CPU the generator may use: the
CPUs of --pin's generator set if it has one; else the CPUs this process may
run on less the server's (--pin's server set; unpinned, the largest --shards
count, or all of them: chatd's default is a shard per CPU; all of them for a
--url on another host); at least 1, and never more than there is load to
split (private pairs, groups, connections, users).

Exit status: 0 when every run was clean; 1 when a run lost, duplicated or
misrouted messages (or missed acks, or dropped connections); 2 for bad usage;
3 when the bench could not run (a limit, a server that did not start).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chatd_bench import report, summary
from chatd_bench.api import API_SCENARIOS, run_api
from chatd_bench.engines import Nats, Postgres
from chatd_bench.run import (
    BenchError,
    Options,
    Target,
    layouts_for,
    run_once,
    splittable,
    users_needed,
)
from chatd_bench.servers import (
    PEERS,
    ChatdCluster,
    ChatdServer,
    PeerServer,
    ProcTree,
    ServerError,
    default_peers_dir,
    find_listener,
)
from chatd_bench.setup import (
    SetupError,
    Users,
    load_users_file,
    make_secret_file,
    peer_users,
    prepare_chatd,
)

SCENARIOS = ("connect", "private", "group", "mixed", "soak", *API_SCENARIOS)
STORES = ("sqlite", "postgres")


PLACEMENTS = ("kernel", "same", "cross")


@dataclasses.dataclass
class Variant:
    """One chatd set-up of a run: its name in the report, its store, shards per
    node, nodes (0: one plain node, no bus), and where users connect."""

    name: str
    store: str
    shards: int
    nodes: int
    placement: str = "kernel"
    #: the name without the placement (what ``report.placement_ratios`` pairs on)
    base: str = ""


class Engines:
    """The PostgreSQL and NATS the variants need, started once for every run."""

    def __init__(self) -> None:
        self.pg: Postgres | None = None
        self.nats: Nats | None = None
        self.dsn = ""
        self.secret_file: Path | None = None

    def start(self, variants: list[Variant], data_dir: Path, cpus: str | None, sync: str,
              log: Any) -> None:
        if any(v.store == "postgres" for v in variants):
            self.pg = Postgres(cpus, sync)
            self.dsn = self.pg.create_database("chatd_bench")
            # a secret file every node reads (a cluster's nodes must share one)
            data_dir.mkdir(parents=True, exist_ok=True)
            self.secret_file = make_secret_file(data_dir / "bench-secret")
            log(f"set-up: PostgreSQL {self.pg.bindir.parent.name} on port {self.pg.port} "
                f"(synchronous_commit={sync})")
        if any(v.nodes for v in variants):
            self.nats = Nats(cpus)
            log(f"set-up: nats-server on port {self.nats.port}")

    def close(self) -> None:
        if self.nats is not None:
            self.nats.close()
        if self.pg is not None:
            self.pg.close()


def parse_cpus(text: str) -> list[int]:
    """``"1"``, ``"1-3"``, ``"0,2-3"`` -> CPU numbers."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatd-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("scenario", choices=SCENARIOS)
    a = p.add_argument
    a("--procs", type=int,
      help="load processes (default: one per CPU the generator may use, at most one per "
           "pair, group, connection or user to split; see below)")
    a("--duration", type=float, help="measured seconds (default 10; soak 120)")
    a("--users", type=int, help="users (private: 200 = 100 pairs; mixed/soak: 1000)")
    a("--window", type=int, default=10, help="closed loop: messages in flight per sender")
    a("--rate", type=float, default=0.0,
      help="open loop: offered messages/s in all (private/group; mixed default 200)")
    a("--members", default="10,100,1000", help="group sizes, one run each (default 10,100,1000)")
    a("--groups", type=int, default=2, help="groups per size (mixed: groups in all; default 2)")
    a("--senders", type=int, default=2, help="senders per group (default 2)")
    a("--conns", type=int, default=1000, help="connect: connections to open (default 1000)")
    a("--conn-rate", type=float, default=2000.0, help="connect: target handshakes/s")
    a("--hold", type=float, default=3.0, help="connect: seconds to hold them idle")
    a("--group-share", type=float, default=0.1, help="mixed: share of group messages")
    a("--image-share", type=float, default=0.1, help="mixed: share of image messages")
    a("--churn", type=float, default=5.0, help="mixed: reconnects/s (chatd only; with sync)")
    a("--churn-share", type=float, default=0.1, help="mixed: share of users that reconnect")
    a("--heartbeat", type=float, default=30.0, help="mixed: seconds between heartbeats per user")
    a("--binary", action="store_true", help="MessagePack frames to chatd (peers: JSON)")
    a("--shards", metavar="LIST",
      help="chatd shard counts, one run each, side by side (e.g. 1,2; default: the CPUs "
           "of --pin's server set, else chatd's default)")
    a("--placement", metavar="LIST", default="kernel",
      help="with several shards or nodes: users on the chat port (kernel; on a cluster: "
           "round-robin over the nodes), a pair or group on one shard or node (same), or "
           "every private message across shards or nodes (cross); a list (same,cross) "
           "runs each side by side and reports cross / same")
    a("--store", metavar="LIST",
      help="chatd's store, one run each, side by side: sqlite (default), postgres (a "
           "throwaway PostgreSQL the bench starts, synchronous_commit=on), or sqlite,postgres")
    a("--nodes", metavar="LIST",
      help="chatd cluster node counts, one run each, side by side (e.g. 1,2,3): the bench "
           "starts nats-server and PostgreSQL, then N nodes of one shard each on them")
    a("--pg-sync", default="on", choices=("on", "off", "local", "remote_write", "remote_apply"),
      help="synchronous_commit of the bench's PostgreSQL (default on)")
    a("--drain", type=float, default=10.0, help="seconds to wait for stragglers after the load")
    a("--pin", metavar="SERVER:GEN", help="CPU sets, e.g. 0:1 or 0-1:2-7 (taskset syntax)")
    a("--no-spread", action="store_true",
      help="do not spread source addresses over 127.0.x.y")
    a("--vs", nargs="?", const=",".join(PEERS), metavar="PEERS",
      help=f"also run against peer relays (default all: {','.join(PEERS)})")
    a("--rounds", type=int, default=1, help="--vs: alternating rounds (ratios use medians)")
    a("--peers-dir", help="the peer relays (default ../shared/peers, env CHATD_BENCH_PEERS)")
    a("--url", help="an already running chatd, ws://HOST:PORT/chat")
    a("--server-pid", type=int, help="--url: its pid, for CPU and memory figures")
    a("--users-file", help="--url: ids, tokens and groups (bench-users.json format)")
    a("--data-dir", help="chatd data folder (default: a temporary one)")
    a("--json", metavar="FILE", help="write results as JSON lines ('-' = stdout)")
    a("--plot", metavar="PNG", help="write a plot of throughput, latency and CPU over time")
    a("--quiet", action="store_true", help="no progress line")
    return p


def generator_cpus(pin: str | None, usable: int, shards: list[int] | None = None,
                   remote: bool = False) -> int:
    """How many CPUs the load generator may use: the CPUs of ``pin``'s
    generator set (``SERVER:GEN``) if it has one; else ``usable`` (the CPUs
    this process may run on) less the server's: ``pin``'s server set, or
    unpinned the largest shard count asked (chatd's own default is a shard per
    CPU, so none asked means all of them), or none for a server on another
    host (``remote``). At least 1."""
    if pin and ":" in pin:
        return max(1, len(parse_cpus(pin.split(":", 1)[1])))
    if pin:
        server = len(parse_cpus(pin))
    elif remote:
        server = 0
    else:
        server = max(shards) if shards else usable
    return max(1, usable - server)


def default_procs(gen_cpus: int, phases: Sequence[Options]) -> int:
    """``--procs`` when not given: a load process per generator CPU, but no
    more than every phase has load to split (``run.splittable``), at least 1."""
    return max(1, min([gen_cpus, *(splittable(o) for o in phases)]))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _procs(args: argparse.Namespace, phases: list[Options]) -> int:
    """``--procs``, or its default (``generator_cpus``, ``default_procs``)."""
    if args.procs is not None:
        return int(args.procs)
    shards = None
    if args.shards:
        try:
            shards = _counts(args.shards, "--shards")
        except SetupError:
            shards = None  # _variants says what is wrong with it
    host = urlsplit(_chat_url(args.url)).hostname if args.url else None
    remote = bool(host) and host not in ("localhost", "::1") and not str(host).startswith(
        "127.")
    procs = default_procs(generator_cpus(args.pin, _usable_cpus(), shards, remote), phases)
    if not args.quiet:
        _log(f"chatd-bench: {procs} load process{'es' if procs > 1 else ''} "
             "(--procs default: the generator's CPUs, at most the load to split)")
    return procs


def _options(args: argparse.Namespace, members: int) -> Options:
    scen = args.scenario
    users = args.users or (200 if scen == "private" else 1000)
    if scen == "private" and users % 2:
        users += 1
    gen = None
    if args.pin:
        gen = parse_cpus(args.pin.split(":", 1)[1]) if ":" in args.pin else None
    return Options(
        scenario=scen, procs=args.procs or 1,
        duration_s=args.duration or (120.0 if scen == "soak" else 10.0),
        users=users, window=args.window,
        rate=args.rate or (200.0 if scen in ("mixed", "soak") else 0.0),
        members=members, groups=args.groups, senders=args.senders, conns=args.conns,
        conn_rate=args.conn_rate, hold_s=args.hold, group_share=args.group_share,
        image_share=args.image_share, churn_share=args.churn_share, churn_per_s=args.churn,
        hb_interval_s=args.heartbeat, drain_s=args.drain, binary=args.binary,
        gen_cpus=gen, spread_sources=not args.no_spread)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatd-bench report",
        description="Side by side, from the JSON lines of earlier runs (--json): per load "
                    "shape (scenario, group size, rate or window, users), a row per target "
                    "with the median of each figure over its runs and the spread (min-max), "
                    "the generator's own CPU (gen %: all load processes together, 100 = one "
                    "CPU; gen max %: the busiest), the ratio of each figure to the base "
                    "target's, and a warning line for every run where the load generator "
                    "was the limit or that was not clean.",
        epilog="Exit status: 0, also when runs were not clean (the warnings say so); 2 for "
               "bad usage or a file that is not chatd-bench JSON lines.")
    p.add_argument("files", nargs="+", metavar="FILE.jsonl")
    p.add_argument("--base", metavar="TARGET",
                   help="the target the ratios divide by (default: the first chatd one)")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw grouped bars of server CPU per unit and p99, per target")
    return p


def report_main(argv: Sequence[str]) -> int:
    """``chatd-bench report FILE... [--base TARGET] [--plot PNG]``: print the
    report of earlier runs' JSON lines (``summary.render``); 2 when a file is
    not chatd-bench JSON lines or ``--base`` names no target in them."""
    parser = _report_parser()
    args = parser.parse_args(argv)
    try:
        runs, skipped = summary.load(args.files)
    except summary.ReportError as exc:
        parser.error(str(exc))
    if not runs:
        parser.error("no runs in " + ", ".join(args.files))
    if args.base and not any(args.base in (r["target"], row.name)
                             for g in summary.group(runs) for row in g.rows for r in row.runs):
        names = sorted({r["target"] for r in runs})
        parser.error(f"--base: no target {args.base!r} (there are {', '.join(names)})")
    print(summary.render(runs, args.base))
    if skipped:
        _log(f"chatd-bench report: skipped {skipped} line(s) that are not JSON objects")
    if args.plot:
        summary.bar_plot(runs, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.procs is not None and args.procs < 1:
        _parser().error("--procs must be at least 1")
    server_cpus = args.pin.split(":", 1)[0] if args.pin else None
    sizes = [int(x) for x in args.members.split(",")] if args.scenario == "group" else [0]
    phases = [_options(args, m) for m in sizes]
    if args.scenario not in API_SCENARIOS:
        procs = _procs(args, phases)
        phases = [dataclasses.replace(o, procs=procs) for o in phases]
    peers = [p.strip() for p in args.vs.split(",")] if args.vs else []
    for p in peers:
        if p not in PEERS:
            _parser().error(f"--vs: unknown peer {p!r} (one of {', '.join(PEERS)})")
    if args.scenario in API_SCENARIOS:
        if peers or args.url:
            _parser().error(f"{args.scenario}: the peers have no HTTP API; --vs and --url "
                            "do not apply")
        if args.store or args.nodes:
            _parser().error(f"{args.scenario}: --store and --nodes apply to the chat "
                            "scenarios")
        api_result = _run_api(args, server_cpus)
        _emit(args, [api_result])
        return 0 if api_result["ok"] else 1
    if args.url and (args.store or args.nodes):
        _parser().error("--store and --nodes start chatd themselves; not with --url")
    try:
        variants = [] if args.url else _variants(args, server_cpus)
    except SetupError as exc:
        _parser().error(str(exc))
    tmp = None
    data_dir = ""
    results: list[dict[str, Any]] = []
    engines = Engines()
    try:
        users: dict[str, Users] = {}
        if args.url:
            users["url"] = _external_users(args, phases)
        else:
            data_dir = args.data_dir or (tmp := tempfile.mkdtemp(prefix="chatd-bench-"))
            need = max(users_needed(o) for o in phases)
            layouts = [lay for o in phases for lay in layouts_for(o)]
            engines.start(variants, Path(data_dir), server_cpus, args.pg_sync, _log)
            if any(v.store == "sqlite" for v in variants):
                users["sqlite"] = prepare_chatd(data_dir, need, layouts, log=_log)
            if engines.dsn:
                users["postgres"] = prepare_chatd(Path(data_dir) / "bench-pg", need, layouts,
                                                  log=_log, store_url=engines.dsn,
                                                  secret_file=engines.secret_file)
        peers_dir = Path(args.peers_dir) if args.peers_dir else default_peers_dir()
        chatds = [v.name for v in variants] if variants else ["chatd"]
        for rnd in range(args.rounds):
            for opts in phases:
                for name in [*chatds, *peers]:
                    tag = (f" M={opts.members}" if opts.scenario == "group" else "") + (
                        f" #{rnd + 1}" if args.rounds > 1 else "")
                    label = f"{name} {opts.scenario}{tag}"
                    if args.url and name == "chatd":
                        results.append(_run_url(args, opts, users["url"], label))
                    elif name.startswith("chatd"):
                        v = variants[chatds.index(name)]
                        results.append(_run_chatd(
                            args, dataclasses.replace(opts, placement=v.placement),
                            users[v.store], server_cpus, label, data_dir, v, engines,
                            f"run{len(results)}"))
                        results[-1].update(base=v.base, placement=v.placement,
                                           store=v.store)
                    else:
                        results.append(_run_peer(args, opts, name, server_cpus, label,
                                                 peers_dir))
                    r = results[-1]
                    # which round, of how many, and on which CPUs: what
                    # ``chatd-bench report`` takes medians over and shows
                    r.update(round=rnd + 1, rounds=args.rounds, server_cpus=server_cpus)
                    if name.startswith("chatd") and variants:
                        r["shards"] = variants[chatds.index(name)].shards
                    if r["problems"]:
                        for line in r["problems"]:
                            _log(f"!! {label}: {line}")
    except (BenchError, ServerError, SetupError) as exc:
        _log(f"chatd-bench: {exc}")
        _emit(args, results)
        return 3
    except KeyboardInterrupt:
        _emit(args, results)
        return 130
    finally:
        engines.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    _emit(args, results)
    bad = [r for r in results if not r["ok"]]
    if bad:
        _log("\n" + "!" * 72 + f"\n!! {len(bad)} run(s) NOT CLEAN: messages lost, duplicated, "
             "misrouted or unacked, or connections failed (see above)\n" + "!" * 72)
        return 1
    return 0


def _emit(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    if not results:
        return
    print(report.table(results))
    # with several shard counts the first is the base the others compare with
    base = next((r["target"] for r in results if r["target"].startswith("chatd")), "chatd")
    text = report.ratios(results, base)
    if text:
        print("\n" + text)
    text = report.placement_ratios(results)
    if text:
        print("\n" + text)
    if args.json:
        if args.json == "-":
            report.write_jsonl(results, sys.stdout)
        else:
            with open(args.json, "a") as f:
                report.write_jsonl(results, f)
    if args.plot:
        report.plot(results, args.plot)


def _external_users(args: argparse.Namespace, phases: list[Options]) -> Users:
    need = max(users_needed(o) for o in phases)
    layouts = [lay for o in phases for lay in layouts_for(o)]
    if args.users_file:
        users = load_users_file(args.users_file)
        if not users.tokens:
            raise SetupError("--users-file has no tokens")
    elif args.data_dir:
        users = prepare_chatd(args.data_dir, need, layouts, log=_log)
    else:
        raise SetupError("--url needs --users-file or the server's --data-dir")
    users.require(need, layouts)
    return users


def _counts(text: str, flag: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise SetupError(f"{flag}: not a list of numbers: {text!r}") from None
    if any(n < 1 for n in counts):
        raise SetupError(f"{flag}: each count must be at least 1")
    return counts


def _shard_counts(args: argparse.Namespace, server_cpus: str | None) -> list[int]:
    """The shard counts to run chatd with (0: chatd's own default)."""
    if args.shards:
        return _counts(args.shards, "--shards")
    return [len(parse_cpus(server_cpus))] if server_cpus else [0]


def _variants(args: argparse.Namespace, server_cpus: str | None) -> list[Variant]:
    """The chatd set-ups to run side by side, named as the report shows them:
    ``chatd``, ``chatd/2`` (shards), ``chatd/postgres``, ``chatd/n3`` (nodes)."""
    stores = [x.strip() for x in args.store.split(",")] if args.store else ["sqlite"]
    for st in stores:
        if st not in STORES:
            raise SetupError(f"--store: {st!r} is not one of {', '.join(STORES)}")
    places = [x.strip() for x in args.placement.split(",")]
    for pl in places:
        if pl not in PLACEMENTS:
            raise SetupError(f"--placement: {pl!r} is not one of {', '.join(PLACEMENTS)}")
    bases: list[Variant] = []
    if args.nodes:
        if args.shards:
            raise SetupError("--nodes runs every node with one shard: not with --shards")
        if args.store and stores != ["postgres"]:
            raise SetupError("--nodes: a cluster's nodes share one PostgreSQL store "
                             "(--store postgres, or leave --store out)")
        bases = [Variant(f"chatd/n{n}", "postgres", 1, n)
                 for n in _counts(args.nodes, "--nodes")]
    else:
        counts = _shard_counts(args, server_cpus)
        for st in stores:
            for shards in counts:
                name = "/".join(["chatd", *([st] if stores != ["sqlite"] else []),
                                 *([str(shards)] if len(counts) > 1 else [])])
                bases.append(Variant(name, st, shards, 0))
    return [dataclasses.replace(v, name=v.name + (f"/{pl}" if len(places) > 1 else ""),
                                placement=pl, base=v.name)
            for v in bases for pl in places]


def _chat_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme or 'ws'}://{parts.netloc}{parts.path or '/chat'}"


def _run_url(args: argparse.Namespace, opts: Options, users: Users,
             label: str) -> dict[str, Any]:
    url = _chat_url(args.url)
    port = urlsplit(url).port or 80
    pid = args.server_pid or find_listener(port)
    target = Target("chatd", url, False, pid)
    if pid:
        target.alive = ProcTree(pid).alive
    return run_once(opts, users, target, label, args.quiet)


def _run_chatd(args: argparse.Namespace, opts: Options, users: Users, cpus: str | None,
               label: str, data_dir: str, variant: Variant, engines: Engines,
               tag: str) -> dict[str, Any]:
    if variant.nodes:
        return _run_cluster(args, opts, users, cpus, label, data_dir, variant, engines, tag)
    if variant.store == "postgres":
        assert engines.pg is not None
        server = ChatdServer(Path(data_dir) / tag, cpus, shards=variant.shards,
                             store=engines.dsn, secret_file=engines.secret_file)
        measured = {"postgres": engines.pg.pid}
    else:
        server = ChatdServer(data_dir, cpus, shards=variant.shards)
        measured = {}
    try:
        port = server.wait_ready()
        target = Target(variant.name, f"ws://127.0.0.1:{port}/chat", False, server.pid,
                        store_bytes=server.store_bytes if variant.store == "sqlite" else None,
                        alive=lambda: server.exited() is None,
                        shard_urls=server.shard_urls(), engines=measured)
        result = run_once(opts, users, target, label, args.quiet)
    finally:
        rc = server.stop()
    _server_notes(result, [(server.name, rc, server.lines)])
    return result


def _run_cluster(args: argparse.Namespace, opts: Options, users: Users, cpus: str | None,
                 label: str, data_dir: str, variant: Variant, engines: Engines,
                 tag: str) -> dict[str, Any]:
    """One run against ``variant.nodes`` fresh nodes on the bench's NATS and PostgreSQL."""
    assert engines.pg is not None and engines.nats is not None and engines.secret_file
    cluster = ChatdCluster(data_dir, variant.nodes, engines.dsn, engines.nats.url,
                           engines.secret_file, cpus, tag=tag)
    try:
        cluster.wait_ready()
        urls = cluster.urls
        target = Target(variant.name, urls[0], False, cluster.pids[0], alive=cluster.alive,
                        shard_urls=urls, round_robin=True, pids=cluster.pids,
                        engines={"nats": engines.nats.pid, "postgres": engines.pg.pid})
        result = run_once(opts, users, target, label, args.quiet)
        result["nodes"] = variant.nodes
    finally:
        codes = cluster.stop()
    _server_notes(result, [(n.name, rc, n.lines)
                           for n, rc in zip(cluster.nodes, codes, strict=True)])
    return result


def _server_notes(result: dict[str, Any], servers: list[tuple[str, int | None, Any]]) -> None:
    """Warn about a server that exited badly or logged an error."""
    for name, rc, lines in servers:
        if rc not in (0, None):
            result.setdefault("warnings", []).append(f"{name} exited with {rc}")
        crashes = [ln for ln in lines if "Traceback" in ln or " ERROR " in ln]
        if crashes:
            result.setdefault("warnings", []).append(f"{name} logged errors: " + crashes[0])


def _run_api(args: argparse.Namespace, cpus: str | None) -> dict[str, Any]:
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="chatd-bench-")
    server = ChatdServer(data_dir, cpus)
    try:
        server.wait_ready()
        return run_api(args.scenario, f"http://127.0.0.1:{server.api_port}", server.pid,
                       f"chatd {args.scenario}", args.duration or 10.0, args.window or 4)
    finally:
        server.stop()
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


def _run_peer(args: argparse.Namespace, opts: Options, name: str, cpus: str | None,
              label: str, peers_dir: Path) -> dict[str, Any]:
    groups = opts.groups if opts.scenario in ("group", "mixed", "soak") else 1
    server = PeerServer(name, groups, cpus, peers_dir)
    try:
        port = server.wait_ready()
        users = peer_users(users_needed(opts), groups)
        target = Target(name, f"ws://127.0.0.1:{port}/chat", True, server.pid,
                        alive=lambda: server.exited() is None)
        return run_once(opts, users, target, label, args.quiet)
    finally:
        server.stop(5)


if __name__ == "__main__":
    sys.exit(main())
