"""``chatd serve``: run a node.

For now a node is one shard process (``--shards 1`` in DESIGN §2): it opens
the store, loads the token revocations, starts the shard and waits for a
signal. SIGTERM or SIGINT drains: the listening socket closes, queued messages
are committed (and acked), clients get close 1001, and the process exits 0
within ``drain_timeout_s``. Signal handlers only set an event; the main
coroutine does the work.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop

from chatd import auth
from chatd.config import Config
from chatd.notify import notify, watchdog_interval_s
from chatd.shard import Shard
from chatd.store import Store

log = logging.getLogger("chatd.server")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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


async def run(cfg: Config) -> int:
    """Serve until SIGTERM/SIGINT, then drain; the process exit status."""
    store, shard = await open_node(cfg)
    log.info(
        "listening on %s port=%d (ws://%s:%d/chat)", cfg.host, shard.port, cfg.host, shard.port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notify("READY=1")
    status = loop.create_task(_report_status(shard))
    await stop.wait()
    status.cancel()
    notify("STOPPING=1")
    log.info("draining: %d connections, %d queued messages", shard.registry.count, store.queued)
    await shard.drain(cfg.drain_timeout_s)
    await store.close()
    log.info("stopped: %d messages committed in %d batches", store.committed, store.batches)
    return 0


async def _report_status(shard: Shard) -> None:
    """Keep systemd's STATUS line current and feed its watchdog."""
    watchdog = watchdog_interval_s()
    period = min(watchdog, 5.0) if watchdog else 5.0
    while True:
        state = f"STATUS={shard.registry.count} connections, {shard.store.committed} messages"
        notify(state + ("\nWATCHDOG=1" if watchdog else ""))
        await asyncio.sleep(period)


def serve(cfg: Config) -> int:
    setup_logging(cfg.log_level)
    return uvloop.run(run(cfg))
