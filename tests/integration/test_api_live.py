"""HTTP API -> live connections: a join, a quit or a revocation made over HTTP
reaches a connected websocket client at once, without a reconnect. The
clients are the Python SDK's, each on its user's shard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import api_helpers
import pytest
from api_helpers import Api
from conftest import UNIT, http_request

from chatd.client import ChatClient, Message, State

# every test here on one shard and on two (users on different shards)
pytestmark = pytest.mark.layouts("1", "2")

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


@pytest.fixture
async def clients() -> AsyncIterator[list[ChatClient]]:
    made: list[ChatClient] = []
    yield made
    for c in made:
        await c.close()


async def connected(api: Api, made: list[ChatClient], uid: int, token: str,
                    shard: int | None = None) -> ChatClient:
    """An SDK client of ``uid``, connected (caught up) to ``shard`` (default: the user's)."""
    where = api.node.shards[shard] if shard is not None else api.node.shard_for(uid)
    c = ChatClient(api.base, token=token, uid=uid, ws_url=f"ws://127.0.0.1:{where.port}/chat")
    made.append(c)
    await asyncio.wait_for(c.connect(), 10 * UNIT)
    return c


async def recv(client: ChatClient) -> Message:
    return await asyncio.wait_for(client.recv(), 5 * UNIT)


async def send(client: ChatClient, dstid: int, content: str, *, group: bool = False) -> Message:
    return await asyncio.wait_for(client.send_text(dstid, content, group=group), 10 * UNIT)


def _handshake(uid: int, token: str) -> bytes:
    return (f"GET /chat?id={uid}&token={token} HTTP/1.1\r\nHost: x\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()


async def test_join_and_quit_reach_a_connected_client(api: Api,
                                                      clients: list[ChatClient]) -> None:
    owner, owner_token = await api.user("owner")
    bob, bob_token = await api.user("bob")
    gid = await api.node.group(owner)
    sender = await connected(api, clients, owner, owner_token)
    listener = await connected(api, clients, bob, bob_token)

    # the seed's form call, with userid and token in the body
    await api.ok("/contact/joincommunity", data={"userid": bob, "token": bob_token,
                                                 "dstid": gid})
    ack = await send(sender, gid, "in", group=True)
    got = await recv(listener)
    assert (got.cmd, got.dstid, got.id, got.userid, got.content) == (11, gid, ack.id, owner,
                                                                      "in")

    await api.ok("/contact/quitcommunity", data={"dstid": gid}, token=bob_token)
    await send(sender, gid, "out", group=True)
    # a private message sent after the group one arrives first: the group one never will
    marker = await send(sender, bob, "dm")
    got = await recv(listener)
    assert (got.cmd, got.id) == (10, marker.id)
    # and nothing else came meanwhile: the connection writes in order, so a
    # last private message is the next thing it delivers
    last = await send(sender, bob, "dm 2")
    got = await recv(listener)
    assert (got.cmd, got.id, got.content) == (10, last.id, "dm 2")
    # all of it live, on the first connections
    assert (sender.connections, listener.connections) == (1, 1)


async def test_created_group_reaches_its_connected_owner(api: Api,
                                                         clients: list[ChatClient]) -> None:
    owner, owner_token = await api.user("owner")
    bob, bob_token = await api.user("bob")
    owner_conn = await connected(api, clients, owner, owner_token)
    bob_conn = await connected(api, clients, bob, bob_token)
    # the SDK's own HTTP calls (Bearer tokens)
    group = await owner_conn.create_group("g")
    assert (group.name, group.ownerid) == ("g", owner)
    assert (await bob_conn.join_group(group.id)).joined is True
    ack = await send(bob_conn, group.id, "hello", group=True)
    got = await recv(owner_conn)
    assert (got.cmd, got.id, got.userid, got.content) == (11, ack.id, bob, "hello")
    assert (owner_conn.connections, bob_conn.connections) == (1, 1)


async def test_revoke_closes_live_connections_and_voids_the_token(
        api: Api, clients: list[ChatClient]) -> None:
    user = await api.register("revoker")
    uid, token = user["id"], user["token"]
    shards = range(len(api.node.shards))
    devices = [await connected(api, clients, uid, token, shard=i) for i in shards for _ in (1, 2)]
    await api.ok("/user/revoke", data={"userid": uid, "token": token})
    for device in devices:
        await device.wait_state(State.CLOSED, 5 * UNIT)
        assert device.fatal is not None and device.fatal.code == 4501
        assert device.connections == 1
    # every shard refuses the old token at the handshake, and takes a new login's
    again = await api.ok("/user/login", data={"mobile": user["mobile"], "passwd": "secret1"})
    for shard in api.node.shards:
        status, _, _ = await http_request(shard.port, _handshake(uid, token))
        assert status == 401
        status, _, _ = await http_request(shard.port, _handshake(uid, again["token"]))
        assert status == 101
