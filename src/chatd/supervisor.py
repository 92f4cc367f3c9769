"""The supervisor: ``chatd serve``'s main process.

It prepares the node (data folder, secret, schema migration), reserves the chat
port, starts the children — shard processes on the chat port (SO_REUSEPORT)
and API workers on the api port — and then only supervises:

- a child that dies is started again, with a backoff that doubles from 0.5 s
  to 10 s and resets once the child has run for 30 s;
- control events from API workers are forwarded to every shard;
- SIGTERM / SIGINT drain: the children are told to drain (queued messages
  committed, clients closed with 1001) and the supervisor exits 0 once they
  have, or kills what is left after ``drain_timeout_s`` + 5 s;
- systemd hears READY=1 once every child is ready, and STATUS= lines.

Signal handlers only set events; ``run`` does the work. Each child also
drains on its own SIGTERM (systemd signals the whole control group) and when
its pipe to the supervisor closes (the supervisor died).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

import psutil

from chatd import auth
from chatd.config import Config
from chatd.control import Link
from chatd.errors import ConfigError
from chatd.notify import notify, watchdog_interval_s
from chatd.store import Store

log = logging.getLogger("chatd.supervisor")

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
HEALTHY_AFTER_S: Final = 30.0
READY_TIMEOUT_S: Final = 30.0
#: how often the API workers get fresh figures for /metrics (and systemd a STATUS)
METRICS_PERIOD_S: Final = 2.0

ChildMain = Callable[[Config, int, Connection], None]


@dataclass(eq=False)
class Child:
    """One supervised process and its pipe."""

    name: str
    main: ChildMain
    cfg: Config
    index: int
    proc: BaseProcess | None = None
    link: Link | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_MIN_S
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    status: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    """Starts, watches and drains the processes of one node."""

    def __init__(
        self,
        cfg: Config,
        api_main: ChildMain | None,
        shard_main: ChildMain,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.cfg = cfg
        self._reload = reload
        self._ctx = multiprocessing.get_context("spawn")
        self._shard_main = shard_main
        self._api_main = api_main
        self.children: list[Child] = []
        self.draining = False
        self._stop = asyncio.Event()
        self._reserved: list[socket.socket] = []

    # --- preparation ----------------------------------------------------------------

    async def prepare(self) -> Config:
        """Create the data folder and secret, migrate the schema, reserve ports.

        Returns the config with the real ports (a 0 in the config means "any
        free port": the supervisor picks it so that every child binds the same).
        """
        cfg = self.cfg
        cfg.data_path.mkdir(parents=True, exist_ok=True)
        auth.load_or_create_secret(cfg.data_path)
        store = await Store.open(cfg.db_path, synchronous=cfg.db_synchronous)
        await store.close()
        chat_port = self._reserve(cfg.host, cfg.chat_port)
        api_port = self._reserve(cfg.host, cfg.api_port) if self._api_main else 0
        return replace(cfg, chat_port=chat_port, api_port=api_port)

    def _reserve(self, host: str, port: int) -> int:
        """Hold ``port`` (0: any free one) for the children; return it.

        A probe bind first proves that nobody holds the port, not even another
        chatd (SO_REUSEPORT would silently share it with one). The probe sets
        SO_REUSEADDR: the sockets of connections that a killed node left in
        TIME_WAIT must not keep a restarted node off its port for a minute
        (systemd would give up restarting it), while Linux still refuses the
        bind when a socket *listens* there or another chatd holds it. Then a
        bound but not listening SO_REUSEPORT socket (without SO_REUSEADDR, so
        a second chatd's probe fails on it too) holds the port for the
        children without taking any of their connections.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            port = int(probe.getsockname()[1])
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        self._reserved.append(sock)
        return port

    # --- children ---------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        parent_end, child_end = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=child.main,
            args=(child.cfg, child.index, child_end),
            name=child.name,
            daemon=False,
        )
        proc.start()
        child_end.close()
        child.proc = proc
        child.started_at = time.monotonic()
        child.ready.clear()
        child.exited.clear()
        child.link = Link(
            parent_end, lambda verb, payload: self._on_child(child, verb, payload), lambda: None
        )
        child.link.start()
        log.info("started %s (pid %d)", child.name, proc.pid)

    def _on_child(self, child: Child, verb: str, payload: Any) -> None:
        if verb == "ready":
            child.ready.set()
        elif verb == "status":
            child.status = payload
        elif verb == "event":
            for other in self.children:
                if other.name.startswith("shard") and other.link is not None:
                    other.link.send("event", payload)
        else:
            log.warning("%s sent unknown message %r", child.name, verb)

    async def _watch(self, child: Child) -> None:
        """Restart ``child`` whenever it exits, until the node drains.

        The only place that waits for (reaps) the child's process: two waiters
        on one pid race, and the loser may see a dead child as alive.
        """
        loop = asyncio.get_running_loop()
        while True:
            assert child.proc is not None
            await loop.run_in_executor(None, child.proc.join)
            child.exited.set()
            if child.link is not None:
                child.link.close()
            if self.draining:
                return
            ran_s = time.monotonic() - child.started_at
            if ran_s > HEALTHY_AFTER_S:
                child.backoff_s = BACKOFF_MIN_S
            log.error(
                "%s exited with status %s after %.1f s; restarting in %.1f s",
                child.name,
                child.proc.exitcode,
                ran_s,
                child.backoff_s,
            )
            try:
                await asyncio.wait_for(self._stop.wait(), child.backoff_s)
                return  # draining started during the backoff
            except TimeoutError:
                pass
            child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)
            child.restarts += 1
            child.status = {}
            self._spawn(child)

    # --- main -------------------------------------------------------------------

    async def run(self) -> int:
        """Run the node until SIGTERM/SIGINT; the process exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
        cfg = await self.prepare()
        self.children = [Child("shard-0", self._shard_main, cfg, 0)]
        if self._api_main is not None:
            self.children.append(Child("api-0", self._api_main, cfg, 0))
        for child in self.children:
            self._spawn(child)
        watchers = [loop.create_task(self._watch(c)) for c in self.children]
        ready = loop.create_task(self._all_ready())
        stopped = loop.create_task(self._stop.wait())
        await asyncio.wait(
            {ready, stopped}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        if not ready.done():
            ready.cancel()
            asked_to_stop = self._stop.is_set()
            if not asked_to_stop:
                log.error("children not ready after %d s; stopping", READY_TIMEOUT_S)
            await self._drain()
            await asyncio.gather(*watchers, return_exceptions=True)
            return 0 if asked_to_stop else 1
        api = f" api_port={cfg.api_port}" if self._api_main else ""
        log.info(
            "listening on %s port=%d%s (ws://%s:%d/chat)",
            cfg.host,
            cfg.chat_port,
            api,
            cfg.host,
            cfg.chat_port,
        )
        notify("READY=1")
        status = loop.create_task(self._report_status())
        await self._stop.wait()
        status.cancel()
        notify("STOPPING=1")
        await self._drain()
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for sock in self._reserved:
            sock.close()
        log.info("stopped")
        return 0

    def handle_hup(self) -> None:
        """SIGHUP (``systemctl reload``): re-read and validate the configuration.

        A bad one is refused and the node runs on. ``log_level`` applies at
        once, in every process; other changes need a restart, and the log says
        which.
        """
        if self._reload is None:
            log.info("reload: nothing to re-read")
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        # self.cfg is the configuration as read at start (a port of 0 stays 0)
        changed = [
            f.name for f in fields(Config) if getattr(new, f.name) != getattr(self.cfg, f.name)
        ]
        if "log_level" in changed:
            logging.getLogger().setLevel(new.log_level.upper())
            for child in self.children:
                if child.link is not None:
                    child.link.send("log_level", new.log_level)
            changed.remove("log_level")
            self.cfg = replace(self.cfg, log_level=new.log_level)
            log.warning("reload: log_level is now %s", new.log_level)
        if changed:
            log.warning("reload: %s changed; that takes a restart", ", ".join(changed))
        else:
            log.info("reload: configuration valid")

    async def _all_ready(self) -> None:
        for child in self.children:
            await child.ready.wait()

    async def _drain(self) -> None:
        """Tell every child to drain; kill those still alive past the bound."""
        self.draining = True
        self._stop.set()
        for child in self.children:
            if child.link is not None:
                child.link.send("drain")
        deadline = asyncio.get_running_loop().time() + self.cfg.drain_timeout_s + 5
        for child in self.children:
            if child.proc is None:
                continue
            remaining = max(0.1, deadline - asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(child.exited.wait(), remaining)
            except TimeoutError:
                log.error("%s did not drain in time; killing it", child.name)
                child.proc.kill()
                await child.exited.wait()

    def snapshot(self) -> dict[str, Any]:
        """The node's figures for ``metrics.render``: each child's own report
        and what the kernel says of its process."""
        children = []
        for child in self.children:
            entry: dict[str, Any] = {
                "name": child.name,
                "restarts": child.restarts,
                "status": dict(child.status),
            }
            pid = child.proc.pid if child.proc is not None else None
            try:
                if pid is None:
                    raise psutil.NoSuchProcess(0)
                proc = psutil.Process(pid)
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    entry["rss_bytes"] = proc.memory_info().rss
                    entry["cpu_seconds"] = cpu.user + cpu.system
                    entry["open_fds"] = proc.num_fds()
            except psutil.Error:
                pass  # between a death and a restart: no process figures
            children.append(entry)
        return {"children": children}

    async def _report_status(self) -> None:
        watchdog = watchdog_interval_s()
        period = min(watchdog, METRICS_PERIOD_S) if watchdog else METRICS_PERIOD_S
        while True:
            snapshot = self.snapshot()
            for child in self.children:
                if child.name.startswith("api") and child.link is not None:
                    child.link.send("metrics", snapshot)
            conns = sum(int(c.status.get("connections", 0)) for c in self.children)
            messages = sum(int(c.status.get("committed", 0)) for c in self.children)
            notify(
                f"STATUS={conns} connections, {messages} messages"
                + ("\nWATCHDOG=1" if watchdog else "")
            )
            await asyncio.sleep(period)
