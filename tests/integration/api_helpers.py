"""Fixtures and helpers for the HTTP API tests: the API app served on
127.0.0.1 port 0 next to a real shard (the ``node`` fixture), with
its routing changes going to the node's log, and an aiohttp client.

Import the fixtures into a test module with
``from api_helpers import api, api_factory  # noqa: F401``.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import UNIT, Node
from PIL import Image

from chatd.api import make_app
from chatd.store import Store, open_store


class Api:
    """A running API app and a client for it."""

    def __init__(self, node: Node, store: Store, session: aiohttp.ClientSession,
                 port: int) -> None:
        self.node = node
        self.store = store
        self.session = session
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self._mobiles = 0

    async def call(self, path: str, *, data: Any = None, json: Any = None,
                   token: str | None = None, method: str = "POST",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """``(status, envelope)`` of one call; ``token`` goes in a Bearer header."""
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, data=data, json=json,
                                        headers=hdrs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()

    async def ok(self, path: str, **kwargs: Any) -> Any:
        """The ``data`` of a call that must succeed."""
        status, body = await self.call(path, **kwargs)
        assert (status, body["code"]) == (200, 0), body
        return body["data"]

    async def register(self, nickname: str = "", passwd: str = "secret1") -> dict[str, Any]:
        """Register a fresh user the seed's way (a form post); its profile and token."""
        self._mobiles += 1
        user: dict[str, Any] = await self.ok("/user/register", data={
            "mobile": f"1390000{self._mobiles:04d}", "passwd": passwd, "nickname": nickname})
        return user

    async def user(self, nickname: str = "") -> tuple[int, str]:
        """A user made directly in the store (no scrypt per user) and its token."""
        uid = await self.node.user(nickname)
        return uid, self.node.token(uid)


async def start_api(node: Node, **kwargs: Any) -> tuple[web.AppRunner, Store, int]:
    # the API has its own Store (its own SQLite connections), as an API worker
    # does; routing changes go to the node's log
    store = await open_store(node.cfg.db_path)
    app = make_app(node.cfg, store, node.secret, node.log, **kwargs)
    runner = web.AppRunner(app, shutdown_timeout=2 * UNIT)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, store, port


@pytest.fixture
async def api_factory(node: Node) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    started: list[tuple[web.AppRunner, Store, aiohttp.ClientSession]] = []

    async def start(**kwargs: Any) -> Api:
        runner, store, port = await start_api(node, **kwargs)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20 * UNIT))
        started.append((runner, store, session))
        return Api(node, store, session, port)

    yield start
    for runner, store, session in started:
        await session.close()
        await runner.cleanup()
        await store.close()


@pytest.fixture
async def api(api_factory: Callable[..., Awaitable[Api]]) -> Api:
    return await api_factory()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), mode: str = "RGB",
                color: Any = (200, 30, 30), **save: Any) -> bytes:
    """An image of ``size`` encoded as ``fmt``."""
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, fmt, **save)
    return out.getvalue()
