"""Shared fixtures: a real chatd node on loopback, real clients, real SQLite.

``node`` starts the server in the test's own event loop (port 0, a fresh data
folder); ``node_factory`` does the same with config overrides. ``ServerProcess``
runs ``chatd serve`` as a separate process, for signals and kill -9.

Every wait is bounded by ``UNIT`` seconds times a small factor; set
``CHATD_TEST_UNIT`` to scale them on a slow machine.
"""

from __future__ import annotations

import asyncio
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
from picows import WSListener, WSMsgType, ws_connect

from chatd import auth
from chatd.config import Config
from chatd.server import open_node
from chatd.shard import Shard
from chatd.store import Store

UNIT = float(os.environ.get("CHATD_TEST_UNIT", "1.0"))
#: one scrypt hash for all test users (hashing costs ~50 ms each)
TEST_PASSWORD_HASH = auth.hash_password("secret")


class Node:
    """A running in-process chatd node and helpers to set up its data."""

    def __init__(self, cfg: Config, store: Store, shard: Shard) -> None:
        self.cfg = cfg
        self.store = store
        self.shard = shard
        self.secret = auth.load_or_create_secret(cfg.data_path)
        self._mobiles = 0

    @property
    def port(self) -> int:
        return self.shard.port

    def url(self, uid: int, token: str | None = None) -> str:
        token = token if token is not None else self.token(uid)
        return f"ws://127.0.0.1:{self.port}/chat?id={uid}&token={token}"

    def token(self, uid: int, version: int = 0, ttl_s: int = 3600) -> str:
        return auth.issue_token(self.secret, uid, version, ttl_s)

    async def user(self, nickname: str = "") -> int:
        self._mobiles += 1
        return await self.store.create_user(f"1380000{self._mobiles:04d}", TEST_PASSWORD_HASH,
                                            nickname)

    async def group(self, owner: int, *members: int) -> int:
        gid = await self.store.create_group(f"group-{owner}", owner)
        for uid in members:
            await self.store.join_group(gid, uid)
        return gid


def make_config(data_dir: Path, **overrides: Any) -> Config:
    base = Config(host="127.0.0.1", chat_port=0, data_dir=str(data_dir), log_level="debug")
    return replace(base, **overrides)


@pytest.fixture
async def node_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    nodes: list[Node] = []

    async def start(**overrides: Any) -> Node:
        cfg = make_config(tmp_path / f"node{len(nodes)}", **overrides)
        store, shard = await open_node(cfg)
        n = Node(cfg, store, shard)
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        await n.shard.drain(2 * UNIT)
        await n.store.close()


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

    def assert_silent(self) -> None:
        assert self.frames.empty(), f"unexpected frame {self.frames.get_nowait()}"


async def connect(url: str, **kwargs: Any) -> Client:
    """Open a picows connection to ``url`` and return its listener."""
    _, client = await ws_connect(Client, url, **kwargs)
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
             "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port = 0

    async def started(self, timeout: float = 20.0) -> int:
        """Wait for the ``listening`` line; return the port."""
        loop = asyncio.get_running_loop()

        def read() -> int:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening .*port=(\d+)", line)
                if m:
                    return int(m.group(1))
            raise AssertionError("server exited before listening:\n" + "".join(self.lines))

        self.port = await asyncio.wait_for(loop.run_in_executor(None, read), timeout * UNIT)
        return self.port

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        loop = asyncio.get_running_loop()
        rc = await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout * UNIT)
        assert self.proc.stdout is not None
        self.lines.extend(self.proc.stdout.read().splitlines(keepends=True))
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
