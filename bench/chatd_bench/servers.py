"""The servers under test as child processes, and their figures via psutil.

``ChatdServer`` runs ``chatd serve`` on port 0 with the flood limiter off and
reads the port from its ``listening ... port=N`` log line. ``PeerServer`` runs
one of the bare relays of ``shared/peers`` (the Node one from a temporary copy
where ``npm ci`` has been run once). Both can be pinned with ``taskset``.
``ProcTree`` sums CPU seconds (user + system), RSS and open files over a
process and all its descendants, and splits the CPU by thread name
(``thread_cpu_s``: chatd names its processes and threads, ``chatd.threads``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

PEERS = ("websockets", "aiohttp", "node", "picows")
PEER_FILES = {"websockets": "relay_websockets.py", "aiohttp": "relay_aiohttp.py",
              "node": "relay_node_ws.js", "picows": "relay_picows.py"}


class ServerError(Exception):
    """A server under test did not start or died."""


def default_peers_dir() -> Path:
    env = os.environ.get("CHATD_BENCH_PEERS")
    if env:
        return Path(env)
    # bench/chatd_bench/servers.py -> repo root -> ../shared/peers
    return Path(__file__).resolve().parents[2].parent / "shared" / "peers"


class ProcTree:
    """CPU, memory and fds of a process and its descendants."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self._dead_cpu = 0.0
        self._last: dict[int, float] = {}

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        """User + system CPU seconds of the whole tree so far (children that
        exited keep counting with their last reading)."""
        now: dict[int, float] = {}
        for p in self.procs():
            try:
                t = p.cpu_times()
                now[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        for pid, v in self._last.items():
            if pid not in now:
                self._dead_cpu += v
        self._last = now
        return self._dead_cpu + sum(now.values())

    def thread_cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the tree's live threads, summed by name (the
        kernel's, ``/proc/PID/task/TID/comm``, with a trailing ``-N`` dropped:
        every shard's event loop is ``chatd-shard``). Threads that exited are
        not counted, so compare two readings of a steady server only."""
        out: collections.Counter[str] = collections.Counter()
        for p in self.procs():
            with contextlib.suppress(psutil.Error, OSError):
                for t in p.threads():
                    out[thread_role(p.pid, t.id)] += t.user_time + t.system_time
        return dict(out)

    def rss(self) -> int:
        total = 0
        for p in self.procs():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def fds(self) -> int:
        total = 0
        for p in self.procs():
            with contextlib.suppress(psutil.Error):
                total += p.num_fds()
        return total

    def alive(self) -> bool:
        return bool(self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE)


def thread_role(pid: int, tid: int) -> str:
    """A thread's kernel name without a trailing ``-N`` ("?" if unreadable)."""
    try:
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"
    return re.sub(r"-\d+$", "", name) or "?"


def find_listener(port: int) -> int | None:
    """The pid of the local process listening on ``port``, if we may see it."""
    try:
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except psutil.Error:
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now (probed, not held)."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise ServerError(f"no {n} consecutive free ports")


def taskset(cpus: str | None) -> list[str]:
    """The ``taskset -c CPUS`` prefix of a command (nothing when ``cpus`` is None)."""
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        raise ServerError("--pin needs taskset (util-linux)")
    return ["taskset", "-c", cpus]


class _Child:
    """A server child process whose output is kept (last lines) by a thread."""

    name = "server"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.port = 0
        self._seen = threading.Condition()

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=cwd, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def _wait_line(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with self._seen:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n"
                                      + "\n".join(self.lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerError(f"{self.name} did not start in {timeout_s}s:\n"
                                      + "\n".join(self.lines))
                self._seen.wait(min(left, 0.2))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class ChatdServer(_Child):
    name = "chatd"

    def __init__(self, data_dir: str | Path, cpus: str | None = None,
                 extra_env: dict[str, str] | None = None, shards: int = 0,
                 store: str = "", bus: str = "", node_id: str = "",
                 secret_file: str | Path | None = None) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.store = store
        if node_id:
            self.name = f"chatd node {node_id}"
        #: shard i also listens alone on shard_base_port + i (for placement)
        self.shard_base_port = free_port_range(shards) if shards > 1 else 0
        # every bench client comes from 127.0.0.1: no limit per address
        env = {**os.environ, "CHATD_RATE_LIMIT": "false", "CHATD_LOG_LEVEL": "info",
               "CHATD_MAX_CONNS_PER_IP": "0", **(extra_env or {})}
        if self.shard_base_port:
            env["CHATD_SHARD_BASE_PORT"] = str(self.shard_base_port)
        argv = [*taskset(cpus), sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1",
                "--chat-port", "0", "--api-port", "0", "--data-dir", str(self.data_dir)]
        if shards:
            argv += ["--shards", str(shards)]
        if store:
            argv += ["--store", store]
        if bus:
            argv += ["--bus", bus, "--node-id", node_id]
        if secret_file:
            # the nodes of a cluster sign and check tokens with one secret
            env["CHATD_SECRET_FILE"] = str(secret_file)
        self._spawn(argv, env)

    def shard_urls(self) -> list[str] | None:
        """Each shard's own url, when there are several."""
        if not self.shard_base_port:
            return None
        return [f"ws://127.0.0.1:{self.shard_base_port + i}/chat" for i in range(self.shards)]

    def wait_ready(self, timeout_s: float = 30.0) -> int:
        import re

        line = self._wait_line("listening", timeout_s)
        m = re.search(r"port=(\d+)", line)
        if not m:
            raise ServerError(f"chatd: no port in {line!r}")
        self.port = int(m.group(1))
        api = re.search(r"\bapi_port=(\d+)", line)
        self.api_port = int(api.group(1)) if api else 0
        return self.port

    def store_bytes(self) -> int:
        """Bytes of the SQLite file with its WAL (0 on another store)."""
        if self.store and not self.store.startswith("sqlite:"):
            return 0
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += (self.data_dir / f"chatd.db{suffix}").stat().st_size
        return total


class ChatdCluster:
    """``n`` chatd nodes (``chatd serve --shards 1``) on one PostgreSQL store and
    one NATS bus, each in a data folder of its own under ``folder`` and each
    pinned to ``cpus``; ``urls`` are their chat urls (the slots of placement)."""

    def __init__(self, folder: str | Path, n: int, store: str, bus: str,
                 secret_file: str | Path, cpus: str | None = None, tag: str = "n") -> None:
        self.nodes: list[ChatdServer] = []
        try:
            for i in range(n):
                self.nodes.append(ChatdServer(Path(folder) / f"{tag}-{i}", cpus, shards=1,
                                              store=store, bus=bus, node_id=f"{tag}-{i}",
                                              secret_file=secret_file))
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float = 60.0) -> list[int]:
        """Every node's chat port, once each is listening."""
        return [node.wait_ready(timeout_s) for node in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{node.port}/chat" for node in self.nodes]

    def alive(self) -> bool:
        return all(node.exited() is None for node in self.nodes)

    def stop(self, timeout_s: float = 15.0) -> list[int | None]:
        """SIGTERM to every node at once, then wait for each; their exit statuses."""
        running = [n.proc for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [None if n.proc is None else n.proc.returncode for n in self.nodes]


def prepare_node_peer(peers_dir: Path, log: object = print) -> Path:
    """A temporary copy of the peers folder with ``npm ci`` done (cached per user)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatd-bench"
    lock = (peers_dir / "package-lock.json").read_bytes()
    import hashlib

    target = cache / f"peers-node-{hashlib.sha256(lock).hexdigest()[:12]}"
    if (target / "node_modules" / "ws").is_dir():
        shutil.copy2(peers_dir / PEER_FILES["node"], target / PEER_FILES["node"])
        return target
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise ServerError("the Node peer needs node and npm on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="peers-node-", dir=cache))
    for name in ("package.json", "package-lock.json", PEER_FILES["node"]):
        shutil.copy2(peers_dir / name, tmp / name)
    if callable(log):
        log(f"set-up: npm ci for the Node peer in {tmp}")
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ServerError(f"npm ci failed:\n{done.stdout}\n{done.stderr}")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


class PeerServer(_Child):
    def __init__(self, kind: str, groups: int, cpus: str | None = None,
                 peers_dir: Path | None = None) -> None:
        super().__init__()
        if kind not in PEERS:
            raise ServerError(f"unknown peer {kind!r} (one of {', '.join(PEERS)})")
        self.name = f"peer {kind}"
        peers_dir = peers_dir or default_peers_dir()
        self.port = free_port()
        env = {**os.environ, "PORT": str(self.port), "GROUPS": str(max(1, groups))}
        if kind == "node":
            where = prepare_node_peer(peers_dir)
            argv = [*taskset(cpus), "node", str(where / PEER_FILES[kind])]
            self._spawn(argv, env, cwd=str(where))
        else:
            path = peers_dir / PEER_FILES[kind]
            if not path.exists():
                raise ServerError(f"peer relay {path} not found (set CHATD_BENCH_PEERS)")
            self._spawn([*taskset(cpus), sys.executable, str(path)], env)

    def wait_ready(self, timeout_s: float = 30.0) -> int:
        self._wait_line(f":{self.port}", timeout_s)
        return self.port
