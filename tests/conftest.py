"""Shared fixtures: a real chatd node on loopback, real clients, real SQLite.

``node`` starts the server in the test's own event loop (port 0, a fresh data
folder); ``node_factory`` does the same with config overrides. ``ServerProcess``
runs ``chatd serve`` as a separate process, for signals and kill -9.

Every wait is bounded by ``UNIT`` seconds times a small factor; set
``CHATD_TEST_UNIT`` to scale them on a slow machine.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvloop
from net_helpers import free_port_range  # noqa: F401  (the tests import it from here too)
from picows import WSListener, WSMsgType, ws_connect

from chatd import auth
from chatd.config import Config
from chatd.log import Log
from chatd.server import EmbeddedNode, open_node
from chatd.shard import Shard
from chatd.store import Store

UNIT = float(os.environ.get("CHATD_TEST_UNIT", "1.0"))

#: fixtures that run the server inside the test's event loop
_IN_LOOP_SERVER = {"node", "node_factory", "api", "api_factory"}


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Tests that run the server in their own loop run on asyncio and on uvloop
    (production's loop: transports differ in buffering and write paths)."""
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    if _IN_LOOP_SERVER & set(getattr(item, "fixturenames", ())):
        factories["uvloop"] = uvloop.new_event_loop
    return factories
#: one scrypt hash for all test users (hashing costs ~50 ms each)
TEST_PASSWORD_HASH = auth.hash_password("secret")


class Node:
    """A running in-process chatd node and helpers to set up its data.

    With several shards (the ``layouts`` marker), each listens on a port of
    its own and ``url(uid)`` puts user ``uid`` on shard ``uid % n``: users
    with neighbouring ids talk across shards.
    """

    def __init__(self, cfg: Config, embedded: EmbeddedNode) -> None:
        self.cfg = cfg
        self.embedded = embedded
        self.store: Store = embedded.store
        self.log: Log = embedded.log
        self.shards: list[Shard] = embedded.shards
        self.shard: Shard = embedded.shards[0]
        self.secret = auth.load_or_create_secret(cfg.data_path)
        self._mobiles = 0

    @property
    def port(self) -> int:
        return self.shard.port

    def shard_for(self, uid: int) -> Shard:
        """The shard that ``url(uid)`` connects to."""
        return self.shards[uid % len(self.shards)]

    def url(self, uid: int, token: str | None = None, *, shard: int | None = None) -> str:
        token = token if token is not None else self.token(uid)
        where = self.shards[shard] if shard is not None else self.shard_for(uid)
        return f"ws://127.0.0.1:{where.port}/chat?id={uid}&token={token}"

    def token(self, uid: int, version: int = 0, ttl_s: int = 3600) -> str:
        return auth.issue_token(self.secret, uid, version, ttl_s)

    async def user(self, nickname: str = "") -> int:
        self._mobiles += 1
        return await self.store.create_user(f"1380000{self._mobiles:04d}", TEST_PASSWORD_HASH,
                                            nickname)

    async def group(self, owner: int, *members: int) -> int:
        """A group made through the node's log, as the API makes them (live
        connections of its members enter it at once)."""
        gid = await self.log.create_group(f"group-{owner}", owner)
        for uid in members:
            await self.log.join_group(gid, uid)
        return gid


def make_config(data_dir: Path, **overrides: Any) -> Config:
    base = Config(host="127.0.0.1", chat_port=0, data_dir=str(data_dir), log_level="debug")
    return replace(base, **overrides)


#: node layouts a test module can ask for with ``pytestmark = pytest.mark.layouts(...)``:
#: "1" one shard on the in-process bus, "2" and "3" shards on the Unix-socket bus
LAYOUTS = {"1": 1, "2": 2, "3": 3}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("layouts")
    if marker is not None and "layout" in metafunc.fixturenames:
        metafunc.parametrize("layout", marker.args, ids=[f"shards{a}" for a in marker.args])


@pytest.fixture
def layout() -> str:
    """One shard unless the module asks for more (see ``LAYOUTS``)."""
    return "1"


@pytest.fixture
async def node_factory(tmp_path: Path,
                       layout: str) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    nodes: list[Node] = []

    async def start(**overrides: Any) -> Node:
        cfg = make_config(tmp_path / f"node{len(nodes)}", **overrides)
        n = Node(cfg, await open_node(cfg, shards=LAYOUTS[layout]))
        nodes.append(n)
        for shard in n.shards:
            _NODES[shard.port] = n
        return n

    yield start
    for n in nodes:
        for shard in n.shards:
            _NODES.pop(shard.port, None)
        await n.embedded.close(2 * UNIT)


@pytest.fixture
async def node(node_factory: Callable[..., Awaitable[Node]]) -> Node:
    return await node_factory()


class Client(WSListener):  # type: ignore[misc]
    """A picows test client that queues every decoded frame it receives."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.tr: Any = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()

    def on_ws_connected(self, transport: Any) -> None:
        self.tr = transport

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.frames.put_nowait(json.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.BINARY:
            import msgspec

            self.frames.put_nowait(msgspec.msgpack.decode(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = int(getattr(code, "value", code))

    def on_ws_disconnected(self, transport: Any) -> None:
        self.closed.set()

    def send(self, **fields: Any) -> None:
        self.tr.send(WSMsgType.TEXT, json.dumps(fields).encode())

    def send_binary(self, **fields: Any) -> None:
        import msgspec

        self.tr.send(WSMsgType.BINARY, msgspec.msgpack.encode(fields))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.frames.get(), timeout * UNIT)

    async def recv_until(self, pred: Callable[[dict[str, Any]], bool],
                         timeout: float = 5.0) -> dict[str, Any]:
        """The first frame matching ``pred``; frames before it are dropped."""
        async def go() -> dict[str, Any]:
            while True:
                frame = await self.frames.get()
                if pred(frame):
                    return frame
        return await asyncio.wait_for(go(), timeout * UNIT)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout * UNIT)
        return self.close_code

    async def assert_quiet(self, timeout: float = 5.0) -> None:
        """Nothing was sent to this connection that the test did not read.

        A round trip, not a look at one instant: a cmd 4 from an id above any
        bound is answered at once by the connection's session, so every frame
        the server wrote before it arrives first.
        """
        probe = 1 << 62
        self.send(cmd=4, id=probe)
        frame = await self.recv(timeout)
        assert frame == {"cmd": 4, "id": probe}, f"unexpected frame {frame}"


#: in-process nodes by chat port, so that ``connect`` can wait for registration
_NODES: dict[int, Node] = {}


async def settled(node: Node, timeout: float = 5.0) -> None:
    """Wait until no connection of ``node`` is still loading its groups.

    Live delivery starts when a connection is registered, a moment after the
    handshake (its groups are read first); a test that expects a live copy
    right after connecting waits for that, as a real client resumes with
    ``last=`` instead.
    """
    async def go() -> None:
        while any(shard.pending for shard in node.shards):
            await asyncio.sleep(0.001)
    await asyncio.wait_for(go(), timeout * UNIT)


async def connect(url: str, *, settle: bool = True, **kwargs: Any) -> Client:
    """Open a picows connection to ``url`` and return its listener; on an
    in-process node, once it is registered (``settle=False``: at once)."""
    # plain loop transports, like the server's: aiofastnet's client transport
    # under uvloop never reported a server close that raced a flood of frames
    kwargs.setdefault("use_aiofastnet", False)
    _, client = await ws_connect(Client, url, **kwargs)
    if client is None:
        # picows returns no listener when the connection is lost before the
        # upgrade completes (a shard killed with it in its accept queue)
        raise ConnectionResetError(f"{url}: connection lost during the handshake")
    node = _NODES.get(int(url.split(":")[2].split("/")[0]))
    if settle and node is not None:
        await settled(node)
    return client  # type: ignore[no-any-return]


def run_cli(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``chatd`` CLI in a child process against ``data_dir``."""
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60 * UNIT, check=check)


class ServerProcess:
    """``chatd serve`` in a child process; ``port`` is read from its log."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1", "--chat-port", "0",
             "--api-port", "0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port = 0
        self.api_port = 0

    async def started(self, timeout: float = 20.0) -> int:
        """Wait for the ``listening`` line; return the port."""
        loop = asyncio.get_running_loop()

        def read() -> int:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening .*?\bport=(\d+)", line)
                if m:
                    api = re.search(r"\bapi_port=(\d+)", line)
                    self.api_port = int(api.group(1)) if api else 0
                    return int(m.group(1))
            raise AssertionError("server exited before listening:\n" + "".join(self.lines))

        self.port = await asyncio.wait_for(loop.run_in_executor(None, read), timeout * UNIT)
        return self.port

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def admin(self, *args: str) -> Any:
        """``chatd admin ARGS --json`` against this node; the decoded answer."""
        done = run_cli("admin", *args, "--json", data_dir=self.data_dir)
        return json.loads(done.stdout)

    async def shard_of(self, uid: int, timeout: float = 10.0) -> dict[str, Any]:
        """The admin's row of the shard that holds ``uid``'s (only) connection."""
        loop = asyncio.get_running_loop()

        async def go() -> dict[str, Any]:
            while True:
                rows = await loop.run_in_executor(None, self.admin, "online", str(uid))
                if rows:
                    [row] = rows
                    shards = await loop.run_in_executor(None, self.admin, "shards", "list")
                    [shard] = [s for s in shards if s["index"] == row["shard"]]
                    return dict(shard)
                await asyncio.sleep(0.05)  # registered a moment after the handshake

        return await asyncio.wait_for(go(), timeout * UNIT)

    async def wait(self, timeout: float = 20.0) -> int:
        loop = asyncio.get_running_loop()
        rc = await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout * UNIT)
        assert self.proc.stdout is not None
        self.lines.extend(self.proc.stdout.read().splitlines(keepends=True))
        return rc

    def kill(self) -> None:
        """SIGKILL the server if it still runs, and release its pipe."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- helpers added for the foundation test suite ---------------------------------


class TypedClient(Client):
    """A ``Client`` that also remembers whether each frame was text or binary.

    Use ``recv_typed`` (not ``recv``) on it: it returns ``("text"|"binary", frame)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kinds: collections.deque[str] = collections.deque()

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.kinds.append("text")
        elif frame.msg_type == WSMsgType.BINARY:
            self.kinds.append("binary")
        super().on_ws_frame(transport, frame)

    async def recv_typed(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        frame = await self.recv(timeout)
        return self.kinds.popleft(), frame


async def connect_typed(url: str, **kwargs: Any) -> TypedClient:
    _, client = await ws_connect(TypedClient, url, **kwargs)
    if client is None:
        raise ConnectionResetError(f"{url}: connection lost during the handshake")
    return client  # type: ignore[no-any-return]


async def send_acked(client: Client, dstid: int, n: int, *, cmd: int = 10, prefix: str = "m",
                     timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send ``n`` text messages with cids ``{prefix}{i}`` and wait for every ack.

    Returns the acks in cid order. Frames other than acks of these cids that
    arrive meanwhile are dropped.
    """
    cids = [f"{prefix}{i}" for i in range(n)]
    for i, cid in enumerate(cids):
        client.send(cmd=cmd, dstid=dstid, media=1, content=f"{prefix} body {i}", cid=cid)
    acks: dict[str, dict[str, Any]] = {}
    wanted = set(cids)

    async def go() -> None:
        while wanted - acks.keys():
            frame = await client.frames.get()
            assert frame.get("cmd") != 5, f"error frame while sending: {frame}"
            if frame.get("cmd") == 1 and frame.get("cid") in wanted:
                acks[frame["cid"]] = frame

    await asyncio.wait_for(go(), timeout * UNIT)
    return [acks[c] for c in cids]


async def sync_all(client: Client, after: int = 0,
                   timeout: float = 10.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send cmd 4 from ``after`` and collect frames up to the answering cmd 4.

    Returns (every frame before the cmd 4, the cmd 4 frame).
    """
    client.send(cmd=4, id=after)
    frames: list[dict[str, Any]] = []

    async def go() -> dict[str, Any]:
        while True:
            frame = await client.frames.get()
            if frame.get("cmd") == 4:
                return frame
            frames.append(frame)

    end = await asyncio.wait_for(go(), timeout * UNIT)
    return frames, end


async def http_request(port: int, raw: bytes,
                       timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send a raw HTTP request to 127.0.0.1:``port``; (status, headers, body).

    Header names are lower-cased. The body is read by Content-Length, or to EOF.
    """
    async def go() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            elif status == 101:
                body = b""
            else:
                body = await reader.read()
            return status, headers, body
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout * UNIT)


@pytest.fixture
def server_procs() -> Any:
    """A list to put ``ServerProcess``es in; every one is killed at teardown."""
    procs: list[ServerProcess] = []
    yield procs
    for p in procs:
        p.kill()
        if p.proc.stdout is not None:
            p.proc.stdout.close()


async def close_clients(*clients: Client) -> None:
    """Close picows clients that no in-process node will close (ServerProcess tests)."""
    for c in clients:
        if not c.closed.is_set():
            c.tr.send_close()
            c.tr.disconnect()
    for c in clients:
        await c.wait_closed()


# --- PostgreSQL: a throwaway cluster per test session (tests/pg_helpers.py) -------------


@pytest.fixture(scope="session")
def pg_server() -> Any:
    """A PostgreSQL cluster on a free loopback port, started once per session and
    deleted at its end. Fails (never skips) where PostgreSQL is not installed."""
    from pg_helpers import PgMissing, PgServer

    try:
        server = PgServer.create()
    except PgMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server: Any) -> Any:
    """The DSN of a fresh, empty database, dropped after the test (a fault test
    that left the server stopped gets it started again first)."""
    pg_server.ensure_running()
    name = pg_server.create_database()
    yield pg_server.dsn(name)
    pg_server.ensure_running()
    pg_server.drop_database(name)
