"""``chatd-bench``: load-test chatd (and, with ``--vs``, the peer relays).

Examples::

    chatd-bench private --duration 10 --pin 0:1
    chatd-bench upload --duration 10 --window 4     # HTTP API: 1 MB JPEG + preview
    chatd-bench login --duration 10 --window 8      # HTTP API: scrypt logins
    chatd-bench group --members 10,100,1000 --vs
    chatd-bench connect --conns 10000 --conn-rate 2000 --vs picows,node
    chatd-bench mixed --rate 2000 --users 2000 --json out.jsonl --plot out.png
    chatd-bench private --url ws://10.0.0.5:8080/chat --users-file users.json

Exit status: 0 when every run was clean; 1 when a run lost, duplicated or
misrouted messages (or missed acks, or dropped connections); 2 for bad usage;
3 when the bench could not run (a limit, a server that did not start).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chatd_bench import report
from chatd_bench.api import API_SCENARIOS, run_api
from chatd_bench.run import BenchError, Options, Target, layouts_for, run_once, users_needed
from chatd_bench.servers import (
    PEERS,
    ChatdServer,
    PeerServer,
    ProcTree,
    ServerError,
    default_peers_dir,
    find_listener,
)
from chatd_bench.setup import SetupError, Users, load_users_file, peer_users, prepare_chatd

SCENARIOS = ("connect", "private", "group", "mixed", "soak", *API_SCENARIOS)


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
    a("--procs", type=int, default=1, help="load processes (default 1)")
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
    a("--placement", choices=("kernel", "same", "cross"), default="kernel",
      help="with several shards: users on the chat port (kernel), a pair or group on one "
           "shard (same), or every private message across shards (cross)")
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


def _options(args: argparse.Namespace, members: int) -> Options:
    scen = args.scenario
    users = args.users or (200 if scen == "private" else 1000)
    if scen == "private" and users % 2:
        users += 1
    gen = None
    if args.pin:
        gen = parse_cpus(args.pin.split(":", 1)[1]) if ":" in args.pin else None
    return Options(
        scenario=scen, procs=args.procs,
        duration_s=args.duration or (120.0 if scen == "soak" else 10.0),
        users=users, window=args.window,
        rate=args.rate or (200.0 if scen in ("mixed", "soak") else 0.0),
        members=members, groups=args.groups, senders=args.senders, conns=args.conns,
        conn_rate=args.conn_rate, hold_s=args.hold, group_share=args.group_share,
        image_share=args.image_share, churn_share=args.churn_share, churn_per_s=args.churn,
        hb_interval_s=args.heartbeat, drain_s=args.drain, binary=args.binary,
        gen_cpus=gen, spread_sources=not args.no_spread, placement=args.placement)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.procs < 1:
        _parser().error("--procs must be at least 1")
    server_cpus = args.pin.split(":", 1)[0] if args.pin else None
    sizes = [int(x) for x in args.members.split(",")] if args.scenario == "group" else [0]
    phases = [_options(args, m) for m in sizes]
    peers = [p.strip() for p in args.vs.split(",")] if args.vs else []
    for p in peers:
        if p not in PEERS:
            _parser().error(f"--vs: unknown peer {p!r} (one of {', '.join(PEERS)})")
    if args.scenario in API_SCENARIOS:
        if peers or args.url:
            _parser().error(f"{args.scenario}: the peers have no HTTP API; --vs and --url "
                            "do not apply")
        api_result = _run_api(args, server_cpus)
        _emit(args, [api_result])
        return 0 if api_result["ok"] else 1
    tmp = None
    results: list[dict[str, Any]] = []
    try:
        if args.url:
            chatd_users = _external_users(args, phases)
        else:
            data_dir = args.data_dir or (tmp := tempfile.mkdtemp(prefix="chatd-bench-"))
            need = max(users_needed(o) for o in phases)
            layouts = [lay for o in phases for lay in layouts_for(o)]
            chatd_users = prepare_chatd(data_dir, need, layouts, log=_log)
        peers_dir = Path(args.peers_dir) if args.peers_dir else default_peers_dir()
        counts = _shard_counts(args, server_cpus)
        chatds = ["chatd"] if len(counts) == 1 else [f"chatd/{n}" for n in counts]
        for rnd in range(args.rounds):
            for opts in phases:
                for name in [*chatds, *peers]:
                    tag = (f" M={opts.members}" if opts.scenario == "group" else "") + (
                        f" #{rnd + 1}" if args.rounds > 1 else "")
                    label = f"{name} {opts.scenario}{tag}"
                    if name.startswith("chatd"):
                        shards = counts[chatds.index(name)]
                        results.append(_run_chatd(args, opts, chatd_users, server_cpus, label,
                                                  tmp or args.data_dir, shards, name))
                    else:
                        results.append(_run_peer(args, opts, name, server_cpus, label,
                                                 peers_dir))
                    r = results[-1]
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


def _shard_counts(args: argparse.Namespace, server_cpus: str | None) -> list[int]:
    """The shard counts to run chatd with (0: chatd's own default)."""
    if args.shards:
        try:
            counts = [int(x) for x in args.shards.split(",")]
        except ValueError:
            raise SetupError(f"--shards: not a list of numbers: {args.shards!r}") from None
        if any(n < 1 for n in counts):
            raise SetupError("--shards: each count must be at least 1")
        return counts
    return [len(parse_cpus(server_cpus))] if server_cpus else [0]


def _chat_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme or 'ws'}://{parts.netloc}{parts.path or '/chat'}"


def _run_chatd(args: argparse.Namespace, opts: Options, users: Users, cpus: str | None,
               label: str, data_dir: str | None, shards: int = 0,
               name: str = "chatd") -> dict[str, Any]:
    if args.url:
        url = _chat_url(args.url)
        port = urlsplit(url).port or 80
        pid = args.server_pid or find_listener(port)
        target = Target("chatd", url, False, pid)
        if pid:
            target.alive = ProcTree(pid).alive
        return run_once(opts, users, target, label, args.quiet)
    assert data_dir is not None
    server = ChatdServer(data_dir, cpus, shards=shards)
    try:
        port = server.wait_ready()
        target = Target(name, f"ws://127.0.0.1:{port}/chat", False, server.pid,
                        store_bytes=server.store_bytes,
                        alive=lambda: server.exited() is None,
                        shard_urls=server.shard_urls())
        result = run_once(opts, users, target, label, args.quiet)
    finally:
        rc = server.stop()
    if rc not in (0, None):
        result.setdefault("warnings", []).append(f"chatd exited with {rc}")
    crashes = [ln for ln in server.lines if "Traceback" in ln or " ERROR " in ln]
    if crashes:
        result.setdefault("warnings", []).append("server logged errors: " + crashes[0])
    return result


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
