"""``chatd admin …`` and ``chatd db …``: the operator's commands.

``admin`` talks to a running node over its admin socket (``chatd.admin``),
found from ``--data-dir``/``--config``/``CHATD_*`` without extra flags; every
command prints a human table or text by default and JSON with ``--json``; an
error is one line on stderr and exit status 1. ``db`` acts on the database
file itself (online: the node may run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from chatd.admin import AdminClient
from chatd.config import Config
from chatd.wire import CLOSE_KICKED

Flags = Callable[[argparse.ArgumentParser], None]


def add_parsers(sub: Any, config_flags: Flags) -> None:
    """The ``admin`` and ``db`` subcommands (``config_flags`` adds --data-dir, --config)."""

    def flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        config_flags(p)
        return p

    admin = sub.add_parser("admin", help="ask the running node (over its admin socket)")
    acts = admin.add_subparsers(dest="action", required=True)
    shards = acts.add_parser("shards", help="list, scale or drain the shards")
    shard_acts = shards.add_subparsers(dest="shards_action", required=True)
    flags(shard_acts.add_parser("list", help="the shards and what they hold"))
    flags(shard_acts.add_parser("scale", help="run N shards (start or retire some)")).add_argument(
        "n", type=int)
    flags(shard_acts.add_parser("drain", help="retire shard K: its clients move (1012)")
          ).add_argument("index", type=int)
    node = acts.add_parser("node", help="this node in its cluster")
    node_acts = node.add_subparsers(dest="node_action", required=True)
    flags(node_acts.add_parser(
        "drain", help="leave the cluster: every client gets 1012 and moves to another node; "
                      "the node exits 0"))
    flags(acts.add_parser("online", help="where a user is connected, since when")).add_argument(
        "uid", type=int)
    kick = flags(acts.add_parser("kick", help="close a user's connections"))
    kick.add_argument("uid", type=int)
    kick.add_argument("--code", type=int, default=CLOSE_KICKED,
                      help=f"close code, 4000-4999 (default {CLOSE_KICKED}; 4500+: do not "
                           "reconnect)")
    cast = flags(acts.add_parser("broadcast", help="a system message to every user (or a group)"))
    cast.add_argument("text")
    cast.add_argument("--group", type=int, metavar="GID", help="only to this group's members")
    user = flags(acts.add_parser("user", help="ban, unban, revoke or show a user"))
    user.add_argument("user_action", choices=("ban", "unban", "revoke", "show"))
    user.add_argument("uid", type=int)
    group = flags(acts.add_parser("group", help="a group's members"))
    group.add_argument("group_action", choices=("members",))
    group.add_argument("gid", type=int)
    stats = flags(acts.add_parser("stats", help="per process and for the node: what it does"))
    stats.add_argument("--interval", type=float, default=2.5,
                       help="seconds between the two looks the rates come from (default 2.5; "
                            "processes report every 2 s)")

    db = sub.add_parser("db", help="the database file: backup, check, vacuum")
    db_acts = db.add_subparsers(dest="action", required=True)
    backup = db_acts.add_parser("backup", help="an online copy (SQLite's backup API)")
    backup.add_argument("file")
    config_flags(backup)
    config_flags(db_acts.add_parser("check", help="PRAGMA integrity_check"))
    config_flags(db_acts.add_parser("vacuum", help="rebuild the file (writers wait meanwhile)"))


def run_admin(cfg: Config, args: argparse.Namespace) -> int:
    """``chatd admin …``: one request (two for ``stats``), printed."""
    client = AdminClient(cfg.run_path / "admin.sock")
    action = args.action
    if action == "stats":
        data = asyncio.run(_stats(client, args.interval))
        print(json.dumps(data, indent=2, sort_keys=True) if args.json else _stats_text(data))
        return 0
    if action == "shards":
        sub = args.shards_action
        request: dict[str, Any] = (
            {"cmd": "shards"} if sub == "list"
            else {"cmd": "scale", "n": args.n} if sub == "scale"
            else {"cmd": "drain", "index": args.index}
        )
    elif action == "node":
        request = {"cmd": "node_drain"}
    elif action == "online":
        request = {"cmd": "online", "uid": args.uid}
    elif action == "kick":
        request = {"cmd": "kick", "uid": args.uid, "code": args.code}
    elif action == "broadcast":
        request = {"cmd": "broadcast", "text": args.text, "gid": args.group}
    elif action == "user":
        request = {"cmd": "user", "action": args.user_action, "uid": args.uid}
    else:
        request = {"cmd": "group", "action": args.group_action, "gid": args.gid}
    data = asyncio.run(client.request(**request))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif action == "online" and not data:
        print(f"user {args.uid} is offline")  # a known user: an unknown one is an error
    elif isinstance(data, list):
        print(table([_readable(row) for row in data]) if data else "(none)")
    else:
        print("\n".join(f"{k}: {v}".rstrip() for k, v in data.items()))
    return 0


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    """A row for people: wall times as local ISO times."""
    out = dict(row)
    for key in ("since", "created_ms"):
        if isinstance(out.get(key), int | float):
            seconds = out[key] / 1000 if key.endswith("_ms") else out[key]
            out[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned text table (columns from the first row)."""
    columns = list(rows[0])
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


#: counters whose per-second rate ``stats`` shows
_RATES = ("frames_in", "frames_out", "committed", "deliveries", "items_in")


async def _stats(client: AdminClient, interval_s: float) -> dict[str, Any]:
    first = await client.request(cmd="stats")
    t0 = time.monotonic()
    await asyncio.sleep(interval_s)
    second = await client.request(cmd="stats")
    elapsed = max(1e-3, time.monotonic() - t0)
    before = {c["name"]: c for c in first["children"]}
    rows = []
    for child in second["children"]:
        status = child.get("status", {})
        old = before.get(child["name"], {}).get("status", {})
        closes = status.get("closes", {})
        row: dict[str, Any] = {
            "process": child["name"],
            "connections": status.get("connections", ""),
            "users": status.get("users", ""),
        }
        # over the two reports' own times (they come every 2 s, not when we look)
        span = status.get("at", 0.0) - old.get("at", 0.0)
        for key in _RATES:
            if key in status:
                row[f"{key}/s"] = (round((status[key] - old.get(key, 0)) / span, 1)
                                   if span > 0 and key in old else "")
        row["slow_closes"] = closes.get(4009, closes.get("4009", 0))
        row["flood_closes"] = closes.get(4008, closes.get("4008", 0))
        if "queued" in status:
            row["queue"] = status["queued"]
            row["batch_p50"] = _quantile(status.get("batch_size"), 0.5)
            row["commit_ms_p50"] = _ms(_quantile(status.get("commit_seconds"), 0.5))
            row["commit_ms_p99"] = _ms(_quantile(status.get("commit_seconds"), 0.99))
        row["rss_mb"] = round(child.get("rss_bytes", 0) / 1e6, 1)
        row["cpu_s"] = round(child.get("cpu_seconds", 0.0), 1)
        row["restarts"] = child.get("restarts", 0)
        rows.append(row)
    node = {
        "connections": sum(int(r["connections"] or 0) for r in rows),
        "users": sum(int(r["users"] or 0) for r in rows),
        "rss_mb": round(sum(r["rss_mb"] for r in rows), 1),
    }
    for key in _RATES:
        node[f"{key}/s"] = round(sum(r.get(f"{key}/s") or 0 for r in rows), 1)
    return {"processes": rows, "node": node, "interval_s": round(elapsed, 2)}


def _quantile(hist: Any, q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of a reported histogram."""
    if not isinstance(hist, dict) or not hist.get("count"):
        return None
    want = q * hist["count"]
    for bound, cumulative in hist.get("buckets", []):
        if cumulative >= want:
            return float(bound)
    return None


def _ms(seconds: float | None) -> float | str:
    return "" if seconds is None else round(seconds * 1000, 2)


def _stats_text(data: dict[str, Any]) -> str:
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in data["processes"]]
    columns = sorted({k for r in rows for k in r}, key=lambda k: list(_ORDER).index(k)
                     if k in _ORDER else len(_ORDER))
    full = [{c: r.get(c, "") for c in columns} for r in rows]
    node = ", ".join(f"{k} {v}" for k, v in data["node"].items())
    return table(full) + f"\n\nnode: {node} (rates over {data['interval_s']} s)"


_ORDER = ("process", "connections", "users", "frames_in/s", "frames_out/s", "committed/s",
          "deliveries/s", "items_in/s", "slow_closes", "flood_closes", "queue", "batch_p50",
          "commit_ms_p50", "commit_ms_p99", "rss_mb", "cpu_s", "restarts")


def run_db(cfg: Config, args: argparse.Namespace) -> int:
    """``chatd db backup FILE | check | vacuum``."""
    from pathlib import Path

    from chatd.errors import ChatdError
    from chatd.store import sqlite

    if cfg.store_is_postgres:
        raise ChatdError(
            f"chatd db {args.action} works on the SQLite store; this node's store is "
            "PostgreSQL: use its own tools (pg_dump for a backup, amcheck, VACUUM)"
        )
    if args.action == "backup":
        pages = sqlite.backup(cfg.db_path, Path(args.file))
        print(f"backed up {cfg.db_path} to {args.file} ({pages} pages); integrity ok")
    elif args.action == "check":
        problems = sqlite.check(cfg.db_path)
        if problems:
            for line in problems:
                print(line)
            return 1
        print("ok")
    else:
        before, after = sqlite.vacuum(cfg.db_path)
        print(f"vacuumed {cfg.db_path}: {before} -> {after} bytes")
    return 0
