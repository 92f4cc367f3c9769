"""The processes of a node: ``serve`` starts the supervisor, which starts
the children whose entry points are here.

A shard child opens the store, loads the token revocations, starts its shard
on the chat port (SO_REUSEPORT) and reports ready; it applies control events
the supervisor forwards, and drains when told to, on its own SIGTERM/SIGINT,
or when the supervisor's pipe closes: the listening socket closes, queued
messages are committed (and acked), clients get close 1001, and the process
exits 0 within ``drain_timeout_s``.

``open_node`` starts a complete single-shard node in the calling event loop
(the tests and embedded uses run it directly).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

import uvloop

from chatd import auth
from chatd.config import Config
from chatd.control import Event, Link, decode_event, encode_event
from chatd.shard import Shard
from chatd.store import Store
from chatd.supervisor import Supervisor

log = logging.getLogger("chatd.server")

STATUS_PERIOD_S: Final = 2.0


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # picows logs every accepted and lost connection at INFO: noise at 100k
    if level.lower() != "debug":
        logging.getLogger("chatd.ws").setLevel(logging.WARNING)


async def open_node(cfg: Config) -> tuple[Store, Shard]:
    """Open the store and start a shard listening; the caller drains and closes."""
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    secret = auth.load_or_create_secret(cfg.data_path)
    store = await Store.open(
        cfg.db_path,
        synchronous=cfg.db_synchronous,
        batch_max=cfg.batch_max,
        queue_max=cfg.queue_max,
    )
    try:
        checker = auth.TokenChecker(secret, await store.token_versions())
        shard = Shard(cfg, store, checker)
        await shard.start()
    except BaseException:
        await store.close()
        raise
    return store, shard


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # the pipe's EOF tells us too


def _child_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # a terminal's hangup reaches the whole group: only the supervisor reloads
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


async def _report(link: Link, status: Callable[[], dict[str, int]]) -> None:
    while True:
        link.send("status", status())
        await asyncio.sleep(STATUS_PERIOD_S)


async def run_shard(cfg: Config, index: int, conn: Connection) -> int:
    """A shard process: serve the chat port until told to drain."""
    stop = asyncio.Event()
    _child_signals(stop)
    store, shard = await open_node(cfg)

    def on_message(verb: str, payload: Any) -> None:
        if verb == "drain":
            stop.set()
        elif verb == "event":
            shard.apply(decode_event(payload))
        elif verb == "log_level":
            _set_log_level(payload)

    link = Link(conn, on_message, stop.set)
    link.start()
    link.send("ready", {"port": shard.port})
    log.info("shard %d serving on port %d", index, shard.port)
    reporter = asyncio.get_running_loop().create_task(
        _report(
            link,
            lambda: {
                "connections": shard.registry.count,
                "users": shard.registry.users,
                "committed": store.committed,
                "batches": store.batches,
                "queued": store.queued,
                "delivered": shard.router.delivered,
            },
        )
    )
    await stop.wait()
    reporter.cancel()
    log.info(
        "shard %d draining: %d connections, %d queued messages",
        index,
        shard.registry.count,
        store.queued,
    )
    await shard.drain(cfg.drain_timeout_s)
    await store.close()
    link.close()
    log.info(
        "shard %d stopped: %d messages committed in %d batches",
        index,
        store.committed,
        store.batches,
    )
    return 0


def shard_main(cfg: Config, index: int, conn: Connection) -> None:
    """Entry point of a shard child process."""
    _die_with_parent()
    setup_logging(cfg.log_level)
    raise SystemExit(uvloop.run(run_shard(cfg, index, conn)))


async def run_api(cfg: Config, index: int, conn: Connection) -> int:
    """An API worker process: serve the HTTP API until told to drain.

    Control events its handlers publish go up the pipe; the supervisor hands
    them to every shard.
    """
    from aiohttp import web

    from chatd.api import make_app
    from chatd.api_common import CTX

    stop = asyncio.Event()
    _child_signals(stop)
    secret = auth.load_or_create_secret(cfg.data_path)
    store = await Store.open(cfg.db_path, synchronous=cfg.db_synchronous)

    link: Link | None = None

    async def publish(event: Event) -> None:
        assert link is not None
        link.send("event", encode_event(event))

    app = make_app(cfg, store, secret, publish)
    ctx = app[CTX]

    def on_message(verb: str, payload: Any) -> None:
        if verb == "drain":
            stop.set()
        elif verb == "metrics":
            ctx.metrics = payload
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
    site = web.TCPSite(runner, cfg.host, cfg.api_port, reuse_port=True, backlog=1024)
    await site.start()
    link.send("ready", {"port": cfg.api_port})
    log.info("api %d serving on port %d", index, cfg.api_port)
    await stop.wait()
    await runner.cleanup()
    await store.close()
    link.close()
    return 0


def api_main(cfg: Config, index: int, conn: Connection) -> None:
    """Entry point of an API worker child process."""
    _die_with_parent()
    setup_logging(cfg.log_level)
    raise SystemExit(uvloop.run(run_api(cfg, index, conn)))


def serve(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    """``chatd serve``: run the supervisor and its children until SIGTERM;
    ``reload`` re-reads the configuration on SIGHUP."""
    setup_logging(cfg.log_level)
    return uvloop.run(Supervisor(cfg, api_main, shard_main, reload).run())
