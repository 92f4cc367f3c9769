"""A throwaway PostgreSQL cluster for the tests: Debian's binaries, a temp folder.

``PgServer.create()`` finds ``initdb`` and ``pg_ctl`` (the highest version under
``/usr/lib/postgresql/*/bin``, else ``PATH``), makes a cluster in a temp folder
owned by the ``postgres`` user (tests run as root; PostgreSQL refuses to run
as root, so its commands run through ``runuser -u postgres --``) and starts it
on a free loopback port with its Unix socket in the same folder, with
``fsync=on`` and ``synchronous_commit=on`` (a commit is on disk before the
client hears of it: the durability tests rely on it). ``stop`` / ``start`` /
``restart`` / ``kill`` (``pg_ctl stop -m immediate``) are for fault tests.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from net_helpers import free_port

INSTALL_HINT = "PostgreSQL is not installed: apt-get install -y postgresql"

#: seconds pg_ctl waits for the server to start or stop
PG_CTL_WAIT_S = 60


class PgMissing(RuntimeError):
    """No PostgreSQL binaries on this machine."""


def find_bindir() -> Path:
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
    raise PgMissing(INSTALL_HINT)


class PgServer:
    """One PostgreSQL cluster in a temp folder, run by the ``postgres`` user."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.logfile = root / "server.log"
        self.port = port
        self.host = "127.0.0.1"
        self._dbs = 0

    # --- life -------------------------------------------------------------------

    @classmethod
    def create(cls) -> PgServer:
        """A new cluster, initialised and started."""
        bindir = find_bindir()
        root = Path(tempfile.mkdtemp(prefix="chatd-pg-"))
        server = cls(bindir, root, free_port())
        try:
            if os.geteuid() == 0:
                shutil.chown(root, "postgres", "postgres")
            server._as_owner(
                "initdb",
                "-D",
                str(server.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            )
            with open(server.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"port = {server.port}\n"
                    f"listen_addresses = '{server.host}'\n"
                    f"unix_socket_directories = '{root}'\n"
                    "fsync = on\n"
                    "synchronous_commit = on\n"
                    "max_connections = 100\n"
                    "shared_buffers = 64MB\n"
                    "log_min_messages = warning\n"
                )
            server.start()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return server

    def _as_owner(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}"
            )
        return done

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._as_owner(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            str(PG_CTL_WAIT_S),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: clients are disconnected, commits are kept;
        ``immediate``: the processes quit at once, as in a crash)."""
        self._as_owner(
            "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(PG_CTL_WAIT_S), "stop"
        )

    def kill(self) -> None:
        """``pg_ctl stop -m immediate``: no shutdown checkpoint, recovery at start."""
        self.stop("immediate")

    def restart(self) -> None:
        """Stop (fast) and start again."""
        self.stop()
        self.start()

    def running(self) -> bool:
        """Whether the server is up (``pg_ctl status``)."""
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, cwd=self.root).returncode == 0

    def ensure_running(self) -> None:
        """Start the server if a fault test left it stopped."""
        if not self.running():
            self.start()

    def destroy(self) -> None:
        """Stop the server (if up) and delete its folder."""
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- databases --------------------------------------------------------------

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run ``sql`` with psql over TCP (trust auth); its output, unaligned."""
        done = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def create_database(self) -> str:
        """A new empty database; its name."""
        self._dbs += 1
        name = f"chatd_t{os.getpid()}_{self._dbs}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
