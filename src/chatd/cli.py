"""The ``chatd`` command line.

``chatd serve`` runs a node; ``chatd admin`` asks a running one over its admin
socket (found from ``--data-dir``/``--config``/``CHATD_*``); ``chatd tune
check`` judges the box for a connection count (``chatd.tune``); the other
commands act on a node's data folder directly. Every option of
``serve`` also reads ``CHATD_*`` and the TOML file given by ``--config``.
Output meant for scripts (an id, a token) is printed alone on stdout; errors go
to stderr with exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from chatd import __version__, auth, tune
from chatd.admin_cli import add_parsers, run_admin, run_db
from chatd.config import Config, load
from chatd.errors import ChatdError, StoreUnavailable
from chatd.store import Store, open_configured


def _config_flags(p: argparse.ArgumentParser, serving: bool) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (env CHATD_CONFIG)")
    p.add_argument("--data-dir", metavar="DIR", help="data folder (env CHATD_DATA_DIR)")
    if serving:
        p.add_argument("--host", help="address to listen on (env CHATD_HOST)")
        p.add_argument(
            "--api-port",
            type=int,
            metavar="PORT",
            help="HTTP API port, 0 for any free one (env CHATD_API_PORT)",
        )
        p.add_argument(
            "--chat-port",
            type=int,
            metavar="PORT",
            help="websocket port, 0 for any free one (env CHATD_CHAT_PORT)",
        )
        p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
        p.add_argument("--tls-cert", metavar="PEM", help="certificate chain (env CHATD_TLS_CERT)")
        p.add_argument("--tls-key", metavar="PEM", help="private key (env CHATD_TLS_KEY)")
        p.add_argument(
            "--store",
            metavar="URL",
            help="sqlite:///path/chatd.db (default: in the data folder) or "
            "postgresql://user@host:port/db (env CHATD_STORE)",
        )
        p.add_argument(
            "--bus",
            metavar="URLS",
            help="NATS servers of a cluster, comma-separated nats:// URLs (env CHATD_BUS)",
        )
        p.add_argument("--node-id", metavar="NAME", help="this node's name (env CHATD_NODE_ID)")
        p.add_argument(
            "--shards",
            type=int,
            metavar="N",
            help="shard processes on the chat port, 0 = one per CPU (env CHATD_SHARDS)",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _config_flags(sub.add_parser("serve", help="run the server"), True)
    _config_flags(sub.add_parser("check-config", help="validate the configuration"), True)

    user = sub.add_parser("user", help="manage users").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="create a user; prints its id")
    add.add_argument("--mobile", required=True)
    add.add_argument("--password", required=True)
    add.add_argument("--nickname", default="")
    _config_flags(add, False)

    token = sub.add_parser("token", help="print a token for a user")
    token.add_argument("uid", type=int)
    token.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: config)")
    _config_flags(token, False)

    group = sub.add_parser("group", help="manage groups").add_subparsers(
        dest="action", required=True
    )
    gadd = group.add_parser("add", help="create a group; prints its id")
    gadd.add_argument("name")
    gadd.add_argument("--owner", type=int, required=True)
    _config_flags(gadd, False)
    join = group.add_parser("join", help="add a user to a group")
    join.add_argument("gid", type=int)
    join.add_argument("uid", type=int)
    _config_flags(join, False)

    add_parsers(sub, lambda p: _config_flags(p, False))

    tuning = sub.add_parser("tune", help="check this box for a connection count")
    tsub = tuning.add_subparsers(dest="action", required=True)
    check = tsub.add_parser(
        "check",
        help="report open-file limits, kernel settings and memory against N connections",
        description=tune.__doc__.split("\n\n")[1].replace("``", "") if tune.__doc__ else None,
        epilog="Exit status: 0 when nothing fails (warnings alone still give 0), 1 when "
        "something does, 2 for bad usage. Thresholds and fixes: README, Operate.",
    )
    check.add_argument(
        "--connections",
        type=_positive,
        default=tune.DEFAULT_CONNECTIONS,
        metavar="N",
        help="connections the box should carry, all shards together (default %(default)s)",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument(
        "--proc-root",
        metavar="DIR",
        help=f"read /proc from DIR (env CHATD_PROC_ROOT; default {tune.DEFAULT_PROC_ROOT})",
    )
    check.add_argument(
        "--unit",
        metavar="FILE",
        help=f"the installed systemd unit (default {tune.DEFAULT_UNIT}, if there)",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _tune_check(args: argparse.Namespace) -> int:
    proc_root = args.proc_root or os.environ.get("CHATD_PROC_ROOT") or tune.DEFAULT_PROC_ROOT
    box = tune.read_box(Path(proc_root), Path(args.unit) if args.unit else None)
    checks = tune.assess(box, args.connections)
    report = tune.format_json if args.json else tune.format_text
    sys.stdout.write(report(checks, args.connections))
    return tune.exit_status(checks)


def _config(args: argparse.Namespace) -> Config:
    flags = {
        k: getattr(args, k, None)
        for k in ("data_dir", "host", "chat_port", "api_port", "log_level", "shards",
                  "tls_cert", "tls_key", "store", "bus", "node_id")
    }
    return load(args.config, flags=flags)


def _with_store(cfg: Config, action: Callable[[Store], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        store = await open_configured(cfg)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


async def _check_engines(cfg: Config) -> list[str]:
    """Try the store and every NATS server the config names; what did not answer."""
    failed: list[str] = []
    if cfg.store_is_postgres:
        where = _without_password(cfg.store)
        try:
            store = await asyncio.wait_for(open_configured(cfg, writable=False), 10)
        except (ChatdError, TimeoutError) as exc:
            failed.append(f"store {where} ({exc or 'no answer in 10 s'})")
        else:
            await store.close()
            print(f"store {where}: reachable")
    if cfg.bus:
        from chatd.bus.nats import probe

        for url in cfg.bus:
            try:
                await probe(url)
            except ChatdError as exc:
                failed.append(f"bus {url} ({exc})")
            else:
                print(f"bus {url}: reachable")
    return failed


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def _run(args: argparse.Namespace) -> int:
    if args.command == "tune":
        return _tune_check(args)  # reads the box, not the configuration
    cfg = _config(args)
    if args.command == "serve":
        from chatd.server import serve

        return serve(cfg, reload=lambda: _config(args))
    if args.command == "check-config":
        from chatd.tls import server_context

        server_context(cfg)  # the certificate and key load
        if cfg.secret_file:
            auth.read_secret(Path(cfg.secret_file))
        unreachable = asyncio.run(_check_engines(cfg))
        if unreachable:
            raise ChatdError("unreachable: " + "; ".join(unreachable))
        print(
            f"config ok: chat on {cfg.host}:{cfg.chat_port} ({cfg.shard_count} shards), api on "
            f"{cfg.host}:{cfg.api_port}, data in {cfg.data_dir}"
            + (f", node {cfg.node_name} of a cluster" if cfg.clustered else "")
        )
        return 0
    if args.command == "admin":
        return run_admin(cfg, args)
    if args.command == "db":
        return run_db(cfg, args)
    if args.command == "user":
        if not args.mobile.strip() or not args.password:
            raise ChatdError("mobile and password must not be empty")
        hashed = auth.hash_password(args.password)
        print(_with_store(cfg, lambda s: s.create_user(args.mobile, hashed, args.nickname)))
        return 0
    if args.command == "token":
        cfg.data_path.mkdir(parents=True, exist_ok=True)
        secret = auth.node_secret(cfg.data_path, cfg.secret_file)
        version = _with_store(cfg, lambda s: s.token_version(args.uid))
        print(auth.issue_token(secret, args.uid, version, args.ttl or cfg.token_ttl_s))
        return 0
    if args.action == "add":
        print(_with_control(cfg, lambda c: c.create_group(args.name, args.owner)))
        return 0
    _with_control(cfg, lambda c: c.join_group(args.gid, args.uid))
    return 0


def _with_control(cfg: Config, action: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run a routing change through the running node's log (so live connections
    learn it at once, in order), or on the store when no node runs."""
    from chatd.bus.unix import UnixControl
    from chatd.server import log_socket

    async def go() -> Any:
        control = UnixControl(log_socket(cfg))
        try:
            return await action(control)
        except StoreUnavailable:
            if log_socket(cfg).exists() and _log_alive(cfg):
                raise
        finally:
            await control.close()
        store = await open_configured(cfg)
        try:
            return await action(_StoreControl(store))
        finally:
            await store.close()

    return asyncio.run(go())


def _log_alive(cfg: Config) -> bool:
    import socket

    from chatd.server import log_socket

    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(log_socket(cfg)))
        except OSError:
            return False
    return True


class _StoreControl:
    """The routing changes straight on the store, for a node that is not running."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create_group(self, name: str, owner: int) -> int:
        return await self._store.create_group(name, owner)

    async def join_group(self, gid: int, uid: int) -> bool:
        return await self._store.join_group(gid, uid)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ChatdError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
