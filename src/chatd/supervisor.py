"""The supervisor: ``chatd serve``'s main process.

It prepares the node (data folder, secret, schema migration), reserves the
ports, starts the children — the log process (the node's one writer), the
shard processes on the chat port (SO_REUSEPORT) and the API worker on the api
port — and then only supervises:

- each child has a watcher that waits on the child's sentinel (a file
  descriptor the kernel makes readable when the process ends) with the event
  loop's reader: no thread per child, so no number of children can starve it;
- a child that dies is started again, with a backoff that doubles from 0.5 s
  to 10 s and resets once the child has run for 30 s;
- the admin socket (``chatd.admin``) lists, adds and retires shards at run
  time and asks the children what they hold;
- SIGTERM / SIGINT drain: the shards first (they stop accepting, wait for the
  log's answers to what they submitted, close clients with 1001), then the API
  worker, then the log (which commits what is queued); whatever is still
  alive past ``drain_timeout_s`` + 5 s is killed;
- SIGHUP re-reads and validates the configuration;
- systemd hears READY=1 once every child is ready, and STATUS= lines.

Signal handlers only set events or call a handler that does no I/O; ``run``
does the work. The pipes to the children are read by the loop's reader and
written with small messages only, so a stalled child cannot stall it.
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

from chatd import auth, tls
from chatd.config import Config
from chatd.control import Link
from chatd.errors import ConfigError
from chatd.notify import notify, watchdog_interval_s
from chatd.store import open_configured

log = logging.getLogger("chatd.supervisor")

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
HEALTHY_AFTER_S: Final = 30.0
READY_TIMEOUT_S: Final = 30.0
#: how long an admin question to a child may take
ASK_TIMEOUT_S: Final = 5.0
#: how often the API workers get fresh figures for /metrics (and systemd a STATUS)
METRICS_PERIOD_S: Final = 2.0
#: most shards one node runs
MAX_SHARDS: Final = 1024

ChildMain = Callable[[Config, int, Connection], None]

LOG: Final = "log"
SHARD: Final = "shard"
API: Final = "api"


@dataclass(eq=False)
class Child:
    """One supervised process and its pipe."""

    role: str
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
    #: when the last status came (its loop turns; monotonic seconds)
    reported_at: float = 0.0
    #: retired (admin drain / scale down): not restarted, removed once gone
    retired: bool = False
    watcher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


class Supervisor:
    """Starts, watches and drains the processes of one node."""

    def __init__(
        self,
        cfg: Config,
        api_main: ChildMain | None,
        shard_main: ChildMain,
        log_main: ChildMain,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.cfg = cfg
        self._reload = reload
        self._ctx = multiprocessing.get_context("spawn")
        self._mains = {SHARD: shard_main, LOG: log_main}
        if api_main is not None:
            self._mains[API] = api_main
        self.children: list[Child] = []
        self.draining = False
        self._stop = asyncio.Event()
        self._reserved: list[socket.socket] = []
        self._child_cfg = cfg
        self._asks: dict[int, asyncio.Future[Any]] = {}
        self._ask_seq = 0

    # --- preparation ----------------------------------------------------------------

    async def prepare(self) -> Config:
        """Create the data folder and secret, migrate the schema, reserve ports.

        Returns the config with the real ports (a 0 in the config means "any
        free port": the supervisor picks it so that every child binds the same).
        """
        cfg = self.cfg
        tls.server_context(cfg)  # a certificate that does not load fails here, once
        cfg.data_path.mkdir(parents=True, exist_ok=True)
        auth.node_secret(cfg.data_path, cfg.secret_file)
        store = await open_configured(cfg)
        await store.close()
        cfg.run_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.run_path.chmod(0o700)
        chat_port = self._reserve(cfg.host, cfg.chat_port)
        api_port = self._reserve(cfg.host, cfg.api_port) if API in self._mains else 0
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

    def _new_child(self, role: str, index: int) -> Child:
        child = Child(role, self._mains[role], self._child_cfg, index)
        self.children.append(child)
        self._spawn(child)
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child))
        return child

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
        child.started_at = child.reported_at = time.monotonic()
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
            child.reported_at = time.monotonic()
        elif verb == "answer":
            req, value = payload
            future = self._asks.pop(req, None)
            if future is not None and not future.done():
                future.set_result(value)
        else:
            log.warning("%s sent unknown message %r", child.name, verb)

    async def _exited(self, proc: BaseProcess) -> None:
        """Wait until ``proc`` ends (its sentinel becomes readable), then reap it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        sentinel = proc.sentinel

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(sentinel, readable)
        try:
            await done
        finally:
            loop.remove_reader(sentinel)
        proc.join()  # it has ended: this only reaps it

    async def _watch(self, child: Child) -> None:
        """Restart ``child`` whenever it exits, until the node drains or it retires.

        The only place that reaps the child's process: two waiters on one pid
        race, and the loser may see a dead child as alive.
        """
        while True:
            assert child.proc is not None
            await self._exited(child.proc)
            child.exited.set()
            if child.link is not None:
                child.link.close()
            if self.draining or child.retired:
                if child.retired and child in self.children:
                    self.children.remove(child)
                    log.info("%s retired (status %s)", child.name, child.proc.exitcode)
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
            if child.retired:
                self.children.remove(child)
                return
            child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)
            child.restarts += 1
            child.status = {}
            self._spawn(child)

    def _hosts_log(self, child: Child) -> bool:
        return child.role == SHARD and child.index == 0 and self._child_cfg.log_in_shard

    def of_role(self, role: str) -> list[Child]:
        return [c for c in self.children if c.role == role]

    # --- dynamic capacity (the admin socket) ------------------------------------------

    def shards(self) -> list[Child]:
        """The shards that serve (not retiring), by index."""
        return sorted((c for c in self.of_role(SHARD) if not c.retired), key=lambda c: c.index)

    async def add_shard(self) -> Child:
        """Start one more shard on the chat port; returns once it is ready."""
        used = {c.index for c in self.of_role(SHARD)}
        index = next(i for i in range(MAX_SHARDS + 1) if i not in used)
        child = self._new_child(SHARD, index)
        await asyncio.wait_for(child.ready.wait(), READY_TIMEOUT_S)
        return child

    async def retire_shard(self, index: int, wait: bool = True) -> bool:
        """Drain shard ``index`` (its clients get 1012 and reconnect to the others);
        False if there is no such shard or it is the last one."""
        serving = self.shards()
        child = next((c for c in serving if c.index == index), None)
        if child is None or len(serving) <= 1 or self._hosts_log(child):
            return False
        child.retired = True
        if child.link is not None:
            child.link.send("retire")
        if wait:
            await self._wait_exit(child, self._child_cfg.drain_timeout_s + 5)
        return True

    async def scale(self, n: int) -> list[int]:
        """Run ``n`` shards: start or retire (highest index first); the indexes after."""
        if not 1 <= n <= MAX_SHARDS:
            raise ValueError(f"a node runs 1 to {MAX_SHARDS} shards")
        while len(self.shards()) < n:
            await self.add_shard()
        # the highest indexes go first; a shard that runs the log stays
        extra = [c for c in self.shards() if not self._hosts_log(c)][::-1][: len(self.shards()) - n]
        for child in extra:
            await self.retire_shard(child.index, wait=False)
        for child in extra:
            await self._wait_exit(child, self._child_cfg.drain_timeout_s + 5)
        return [c.index for c in self.shards()]

    async def ask(self, child: Child, what: str, *args: Any) -> Any:
        """Ask a child a question over its pipe (``Shard.answer``); None if it cannot say."""
        if child.link is None or child.link.closed:
            return None
        self._ask_seq += 1
        req = self._ask_seq
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._asks[req] = future
        if not child.link.send("ask", (req, what, list(args))):
            self._asks.pop(req, None)
            return None
        try:
            return await asyncio.wait_for(future, ASK_TIMEOUT_S)
        except TimeoutError:
            self._asks.pop(req, None)
            return None

    async def _wait_exit(self, child: Child, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(child.exited.wait(), timeout_s)
        except TimeoutError:
            log.error("%s did not drain in time; killing it", child.name)
            if child.proc is not None:
                child.proc.kill()
            await child.exited.wait()

    # --- main -------------------------------------------------------------------

    async def run(self) -> int:
        """Run the node until SIGTERM/SIGINT; the process exit status."""
        from chatd.admin import AdminServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
        cfg = self._child_cfg = await self.prepare()
        admin = AdminServer(self, cfg.run_path / "admin.sock")
        await admin.start()
        # the log first: the shards and the API worker connect to it
        first = self._new_child(SHARD, 0) if cfg.log_in_shard else self._new_child(LOG, 0)
        started = await self._until_ready([first])
        if started:
            for index in range(cfg.shard_count):
                if not (cfg.log_in_shard and index == 0):
                    self._new_child(SHARD, index)
            if API in self._mains:
                self._new_child(API, 0)
            started = await self._until_ready(self.children)
        if not started:
            asked_to_stop = self._stop.is_set()
            if not asked_to_stop:
                log.error("children not ready after %d s; stopping", READY_TIMEOUT_S)
            await self._drain()
            await admin.close()
            return 0 if asked_to_stop else 1
        api = f" api_port={cfg.api_port}" if API in self._mains else ""
        log.info(
            "listening on %s port=%d%s shards=%d (ws://%s:%d/chat)",
            cfg.host,
            cfg.chat_port,
            api,
            len(self.shards()),
            cfg.host,
            cfg.chat_port,
        )
        notify("READY=1")
        status = loop.create_task(self._report_status())
        await self._stop.wait()
        status.cancel()
        notify("STOPPING=1")
        await admin.close()
        await self._drain()
        for sock in self._reserved:
            sock.close()
        log.info("stopped")
        return 0

    async def _until_ready(self, children: list[Child]) -> bool:
        """Wait for ``children`` to be ready; False if stopped or timed out first."""
        ready: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(c.ready.wait() for c in children))
        )
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait(
            {ready, stopped}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        if ready.done() and not self._stop.is_set():
            return True
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
        return False

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
        if self.cfg.tls_cert:
            # renewed certificate files: every child reads them again
            for child in self.children:
                if child.role in (SHARD, API) and child.link is not None:
                    child.link.send("reload_tls")
        if changed:
            log.warning("reload: %s changed; that takes a restart", ", ".join(changed))
        else:
            log.info("reload: configuration valid")

    def leave(self) -> None:
        """``chatd admin node drain``: stop as on SIGTERM, but tell the clients
        to reconnect elsewhere (1012): in a cluster another node takes them."""
        log.warning("node drain: every client gets 1012; the node stops")
        self._leaving = True
        self._stop.set()

    _leaving = False

    async def _drain(self) -> None:
        """Drain the shards, then the API worker, then the log; kill what
        outlives the bound. The shards close their clients with 1001 (1012
        when the node leaves its cluster)."""
        self.draining = True
        self._stop.set()
        deadline = asyncio.get_running_loop().time() + self._child_cfg.drain_timeout_s + 5
        shards = self.of_role(SHARD)
        # shards first, the API worker, then the log (or the shard that runs it)
        groups = [
            [c for c in shards if not self._hosts_log(c)],
            self.of_role(API),
            [*self.of_role(LOG), *(c for c in shards if self._hosts_log(c))],
        ]
        for group in groups:
            for child in group:
                if child.link is not None:
                    leaving = self._leaving and child.role == SHARD
                    child.link.send("retire" if leaving else "drain")
            for child in group:
                if child.proc is None:
                    continue
                remaining = max(0.1, deadline - asyncio.get_running_loop().time())
                await self._wait_exit(child, remaining)
        watchers = [c.watcher for c in self.children if c.watcher is not None]
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        """The node's figures for ``metrics``: each child's own report and what
        the kernel says of its process."""
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

    def _kill_stuck(self) -> None:
        """Kill a child whose loop stopped turning (no status for ``stuck_after_s``);
        its watcher restarts it. A child that is starting has not reported yet."""
        now = time.monotonic()
        limit = self._child_cfg.stuck_after_s
        for child in self.children:
            proc = child.proc
            if (proc is None or child.exited.is_set() or not child.ready.is_set()
                    or now - child.reported_at < limit):
                continue
            log.error("%s has not reported for %.0f s: its loop is stuck; killing it",
                      child.name, now - child.reported_at)
            child.reported_at = now  # once per stuck spell
            proc.kill()

    async def _report_status(self) -> None:
        watchdog = watchdog_interval_s()
        period = min(watchdog, METRICS_PERIOD_S) if watchdog else METRICS_PERIOD_S
        while True:
            self._kill_stuck()
            snapshot = self.snapshot()
            for child in self.of_role(API):
                if child.link is not None:
                    child.link.send("metrics", snapshot)
            shards = self.of_role(SHARD)
            conns = sum(int(c.status.get("connections", 0)) for c in shards)
            messages = sum(int(c.status.get("committed", 0)) for c in self.children)
            log_up = all(bool(c.status.get("log_up", True)) for c in shards)
            store_ok = all(bool(c.status.get("store_ok", True)) for c in self.children)
            notify(
                f"STATUS={conns} connections on {len(self.shards())} shards, {messages} messages"
                + ("" if log_up else ", log unreachable")
                + ("" if store_ok else ", store unreachable: not ready")
                + ("\nWATCHDOG=1" if watchdog else "")
            )
            await asyncio.sleep(period)
