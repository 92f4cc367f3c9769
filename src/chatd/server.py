"""The processes of a node: ``serve`` starts the supervisor, which starts
the children whose entry points are here.

- The log child (one per node) opens the store, starts the node's ordered
  log (``chatd.log``) and serves it on ``log.sock`` in the run folder.
- A shard child opens the store read-only (for replays), connects to the log
  (``bus.unix``), listens on the chat port (SO_REUSEPORT) and reports ready.
- An API worker serves the HTTP API; its routing changes go to the log.

Each drains when told to, on its own SIGTERM/SIGINT, or when the supervisor's
pipe closes: a shard stops listening, waits for the log's answers to what it
submitted, closes its clients with 1001 (1012 when it is retired) and exits
within ``drain_timeout_s``; the log, drained after the shards, commits what
is queued.

``open_node`` starts a complete single-shard node in the calling event loop
(the tests and embedded uses run it directly; the log runs in that loop).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import uvloop

from chatd import auth, tls
from chatd.bus import LogLink
from chatd.bus.local import LocalLink
from chatd.bus.unix import LogServer, UnixControl, UnixLogLink
from chatd.config import Config
from chatd.control import Link
from chatd.errors import ConfigError, StoreUnavailable
from chatd.log import Log
from chatd.shard import Shard
from chatd.store import Store, open_configured
from chatd.supervisor import Supervisor
from chatd.threads import name_this_thread
from chatd.wire import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART

log = logging.getLogger("chatd.server")

STATUS_PERIOD_S: Final = 2.0
#: how long a new shard waits for the log's welcome before it reports ready anyway
READY_WAIT_S: Final = 10.0


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # picows logs every accepted and lost connection at INFO: noise at 100k
    if level.lower() != "debug":
        logging.getLogger("chatd.ws").setLevel(logging.WARNING)


@dataclass
class EmbeddedNode:
    """A whole node in the calling event loop (``open_node``)."""

    cfg: Config
    store: Store
    log: Log
    shards: list[Shard]
    links: list[LogLink]
    server: LogServer | None = None
    readers: list[Store] = field(default_factory=list)

    @property
    def shard(self) -> Shard:
        return self.shards[0]

    async def close(self, timeout_s: float | None = None) -> None:
        """Drain the shards (close 1001), commit what is queued, close the store."""
        timeout = self.cfg.drain_timeout_s if timeout_s is None else timeout_s
        await asyncio.gather(*(shard.drain(timeout) for shard in self.shards))
        for link in self.links:
            await link.close()
        await self.log.close()
        if self.server is not None:
            await self.server.close()
        for reader in self.readers:
            await reader.close()
        await self.store.close()


async def open_node(cfg: Config, *, port: int | None = None, shards: int = 1) -> EmbeddedNode:
    """Open the store, start the log and ``shards`` shards listening, in this loop.

    One shard (the embedded default) talks to the log directly (``bus.local``).
    More than one talk to it over its Unix socket (``bus.unix``), as the shard
    processes of ``chatd serve`` do, each on a port of its own (``port`` is
    the first shard's; the others take any free one), so that a caller can
    choose where a connection lands.
    """
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    secret = auth.node_secret(cfg.data_path, cfg.secret_file)
    store = await open_configured(cfg, log=True)
    node = None
    try:
        node_log = make_log(cfg, store)
        await node_log.start()
        node = EmbeddedNode(cfg, store, node_log, [], [])
        if shards == 1:
            shard = Shard(cfg, store, _checker(secret, await store.token_versions()))
            link = LocalLink(node_log, shard)
            await shard.start(link, port=port)
            link.connect()
            node.shards.append(shard)
            node.links.append(link)
            return node
        node.server = LogServer(node_log, log_socket(cfg))
        await node.server.start()
        for index in range(shards):
            reader = await open_configured(cfg, writable=False)
            node.readers.append(reader)
            shard = Shard(cfg, reader, _checker(secret, await reader.token_versions()), index)
            bus = UnixLogLink(log_socket(cfg), index, shard)
            await shard.start(bus, port=port if index == 0 else 0)
            bus.start()
            node.shards.append(shard)
            node.links.append(bus)
            if not await bus.wait_up(READY_WAIT_S):
                raise StoreUnavailable("a shard could not reach the log")
    except BaseException:
        if node is not None:
            await node.close(0.1)
        else:
            await store.close()
        raise
    return node


def make_log(cfg: Config, store: Store) -> Log:
    """The node's log: one of a cluster (``bus`` set, a shared store) or alone."""
    if cfg.clustered:
        from chatd.log.cluster import ClusterLog

        return ClusterLog(
            store,  # type: ignore[arg-type]  # check-config made sure it is PostgreSQL
            node=cfg.node_name,
            servers=list(cfg.bus),
            batch_max=cfg.batch_max,
            queue_max=cfg.queue_max,
            commit_interval_s=cfg.commit_interval_ms / 1000,
        )
    return Log(store, batch_max=cfg.batch_max, queue_max=cfg.queue_max,
               commit_interval_s=cfg.commit_interval_ms / 1000)


def _checker(secret: bytes, versions: dict[int, int]) -> auth.TokenChecker:
    return auth.TokenChecker(secret, versions)


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # the pipe's EOF tells us too


def _child_signals(stop: asyncio.Event, signalled: asyncio.Event | None = None) -> None:
    """SIGTERM stops a child by itself (``signalled`` is set too, where given).

    A terminal's Ctrl-C and hangup reach the whole process group: only the
    supervisor acts on them, and it drains the children in order. A SIGTERM
    sent to the whole group (``kill -TERM -PGID``, ``timeout``) reaches every
    child at once: the log then waits for its shards to go before it stops.
    """
    loop = asyncio.get_running_loop()

    def on_term() -> None:
        if signalled is not None:
            signalled.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _reload_tls(context: ssl.SSLContext | None, cfg: Config) -> None:
    """SIGHUP: the certificate files again, for the handshakes from now on."""
    if context is None:
        return
    try:
        tls.reload(context, cfg)
    except ConfigError as exc:
        log.error("TLS reload refused, the running certificate stays: %s", exc)
        return
    log.info("TLS certificate reloaded from %s", cfg.tls_cert)


def _set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


async def _report(link: Link, status: Callable[[], dict[str, Any]]) -> None:
    while True:
        # "at" (CLOCK_MONOTONIC, one clock for every process) makes rates exact
        link.send("status", {**status(), "at": time.monotonic()})
        await asyncio.sleep(STATUS_PERIOD_S)


def log_socket(cfg: Config) -> Path:
    """Where the node's log listens for its shards and API workers."""
    return cfg.run_path / "log.sock"


async def run_log(cfg: Config, index: int, conn: Connection) -> int:
    """The log process: the node's one writer, serving shards and API workers
    on ``log.sock`` until told to drain (after the shards have drained)."""
    stop = asyncio.Event()
    signalled = asyncio.Event()
    _child_signals(stop, signalled)
    store = await open_configured(cfg, log=True)
    node_log = make_log(cfg, store)
    await node_log.start()
    server = LogServer(node_log, log_socket(cfg))
    await server.start()

    def on_message(verb: str, payload: Any) -> None:
        if verb == "drain":
            stop.set()
        elif verb == "log_level":
            _set_log_level(payload)

    link = Link(conn, on_message, stop.set)
    link.start()
    link.send("ready", {"hw": node_log.hw})
    log.info("log serving on %s (high-water %d)", server.path, node_log.hw)
    reporter = asyncio.get_running_loop().create_task(_report(link, node_log.figures))
    await stop.wait()
    if signalled.is_set() and not await server.wait_no_shards(cfg.drain_timeout_s):
        log.warning("log: shards still attached after %.0f s; stopping anyway",
                    cfg.drain_timeout_s)
    reporter.cancel()
    log.info("log draining: %d queued messages", node_log.queued)
    try:
        await asyncio.wait_for(node_log.close(), cfg.drain_timeout_s)
    except TimeoutError:
        log.error("log: %d queued messages not committed in time", node_log.queued)
    await server.close()
    await store.close()
    link.close()
    log.info("log stopped: %d messages committed in %d batches",
             node_log.committed, node_log.batches)
    return 0


def log_main(cfg: Config, index: int, conn: Connection) -> None:
    """Entry point of the log child process."""
    _die_with_parent()
    name_this_thread("chatd-log")
    setup_logging(cfg.log_level)
    raise SystemExit(uvloop.run(run_log(cfg, index, conn)))


async def run_shard(cfg: Config, index: int, conn: Connection) -> int:
    """A shard process: serve the chat port until told to drain (1001) or to
    retire (1012: the node sheds this shard; its clients reconnect to others).

    Shard 0 of a node whose log runs inside it (``log_process``) also opens the
    store for writing, runs the log in its loop (``bus.local`` for itself) and
    serves it on ``log.sock`` to the other shards and the API worker.
    """
    stop = asyncio.Event()
    close_code: list[Any] = [CLOSE_GOING_AWAY, "server going away"]
    _child_signals(stop)
    secret = auth.node_secret(cfg.data_path, cfg.secret_file)
    hosts_log = index == 0 and cfg.log_in_shard
    node_log: Log | None = None
    server: LogServer | None = None
    if hosts_log:
        store = await open_configured(cfg, log=True)
        node_log = make_log(cfg, store)
        await node_log.start()
        server = LogServer(node_log, log_socket(cfg))
        await server.start()
    else:
        store = await open_configured(cfg, writable=False)
    checker = auth.TokenChecker(secret, await store.token_versions())
    checker.banned = set(await store.banned_users())
    shard = Shard(cfg, store, checker, index)
    tls_context = tls.server_context(cfg)
    bus: LocalLink | UnixLogLink
    if node_log is not None:
        bus = LocalLink(node_log, shard)
        await shard.start(bus, tls=tls_context)
        bus.connect()
    else:
        bus = UnixLogLink(log_socket(cfg), index, shard)
        await shard.start(bus, tls=tls_context)
        bus.start()

    def on_message(verb: str, payload: Any) -> None:
        if verb == "drain":
            stop.set()
        elif verb == "retire":
            close_code[:] = [CLOSE_SERVICE_RESTART, "shard retired, reconnect"]
            stop.set()
        elif verb == "ask":
            req, what, args = payload
            link.send("answer", (req, shard.answer(what, args)))
        elif verb == "reload_tls":
            _reload_tls(tls_context, cfg)
        elif verb == "log_level":
            _set_log_level(payload)

    link = Link(conn, on_message, stop.set)
    link.start()
    if isinstance(bus, UnixLogLink) and not await bus.wait_up(READY_WAIT_S):
        log.warning("shard %d: the log has not answered yet; serving, submissions wait", index)
    link.send("ready", {"port": shard.port})
    log.info("shard %d serving on port %d%s", index, shard.port,
             " (with the node's log)" if hosts_log else "")

    def figures() -> dict[str, Any]:
        out = shard.figures()
        if node_log is not None:
            out.update(node_log.figures())
        return out

    reporter = asyncio.get_running_loop().create_task(_report(link, figures))
    await stop.wait()
    reporter.cancel()
    log.info("shard %d draining: %d connections", index, shard.registry.count)
    await shard.drain(cfg.drain_timeout_s, int(close_code[0]), str(close_code[1]))
    await bus.close()
    if node_log is not None and server is not None:
        try:
            await asyncio.wait_for(node_log.close(), cfg.drain_timeout_s)
        except TimeoutError:
            log.error("log: %d queued messages not committed in time", node_log.queued)
        await server.close()
    await store.close()
    link.close()
    log.info("shard %d stopped", index)
    return 0


def shard_main(cfg: Config, index: int, conn: Connection) -> None:
    """Entry point of a shard child process."""
    _die_with_parent()
    name_this_thread(f"chatd-shard-{index}")
    setup_logging(cfg.log_level)
    raise SystemExit(uvloop.run(run_shard(cfg, index, conn)))


async def run_api(cfg: Config, index: int, conn: Connection) -> int:
    """An API worker process: serve the HTTP API until told to drain.

    Routing changes (group joins and leaves, revocations) go to the node's log
    over its socket.
    """
    from aiohttp import web

    from chatd.api import make_app
    from chatd.api_common import CTX

    stop = asyncio.Event()
    _child_signals(stop)
    secret = auth.node_secret(cfg.data_path, cfg.secret_file)
    store = await open_configured(cfg)
    control = UnixControl(log_socket(cfg))
    app = make_app(cfg, store, secret, control)
    ctx = app[CTX]

    tls_context = tls.server_context(cfg)

    def on_message(verb: str, payload: Any) -> None:
        if verb == "drain":
            stop.set()
        elif verb == "metrics":
            ctx.metrics = payload
        elif verb == "reload_tls":
            _reload_tls(tls_context, cfg)
        elif verb == "log_level":
            _set_log_level(payload)

    link = Link(conn, on_message, stop.set)
    link.start()
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=cfg.drain_timeout_s / 2,
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.api_port, reuse_port=True, backlog=1024,
                       ssl_context=tls_context)
    await site.start()
    link.send("ready", {"port": cfg.api_port})
    log.info("api %d serving on port %d", index, cfg.api_port)
    # its loop turns: the supervisor's stuck-child check hears it
    reporter = asyncio.get_running_loop().create_task(_report(link, dict))
    await stop.wait()
    reporter.cancel()
    await runner.cleanup()
    await control.close()
    await store.close()
    link.close()
    return 0


def api_main(cfg: Config, index: int, conn: Connection) -> None:
    """Entry point of an API worker child process."""
    _die_with_parent()
    name_this_thread(f"chatd-api-{index}")
    setup_logging(cfg.log_level)
    raise SystemExit(uvloop.run(run_api(cfg, index, conn)))


def serve(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    """``chatd serve``: run the supervisor and its children until SIGTERM;
    ``reload`` re-reads the configuration on SIGHUP."""
    setup_logging(cfg.log_level)
    return uvloop.run(Supervisor(cfg, api_main, shard_main, log_main, reload).run())
