"""The first end-to-end path: a private message is stored, acked and delivered,
between two clients of the Python SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import api_helpers
import pytest
from api_helpers import Api
from conftest import UNIT, Node

from chatd.client import ChatClient, Message

# the API fixtures (api_helpers)
api_factory = api_helpers.api_factory


@pytest.fixture
async def api(api_factory: Callable[..., Awaitable[Api]], node: Node) -> Api:
    # /config.json tells the SDK the in-process shard's real port
    return await api_factory(chat_port=node.port)


@pytest.fixture
async def clients() -> AsyncIterator[list[ChatClient]]:
    made: list[ChatClient] = []
    yield made
    for c in made:
        await c.close()


def sdk(api: Api, uid: int, made: list[ChatClient]) -> ChatClient:
    """An SDK client of user ``uid`` with a saved session (a token of the node's)."""
    c = ChatClient(api.base, token=api.node.token(uid), uid=uid)
    made.append(c)
    return c


async def test_private_message_is_acked_and_delivered(api: Api,
                                                      clients: list[ChatClient]) -> None:
    alice, bob = await api.node.user(), await api.node.user()
    a, b = sdk(api, alice, clients), sdk(api, bob, clients)
    await a.connect()
    await b.connect()
    ack = await asyncio.wait_for(
        a.send(Message(cmd=10, dstid=bob, media=1, content="hello", cid="c1")), 5 * UNIT)
    got = await asyncio.wait_for(b.recv(), 5 * UNIT)
    assert ack.cmd == 1 and ack.cid == "c1" and ack.id > 0 and ack.ts > 0
    assert (got.cmd, got.userid, got.dstid, got.media, got.content) == (10, alice, bob, 1,
                                                                        "hello")
    assert got.id == ack.id and got.ts == ack.ts and got.cid == "c1"
    assert (a.last, b.last) == (ack.id, ack.id)
