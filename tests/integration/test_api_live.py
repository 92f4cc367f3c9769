"""HTTP API -> live connections: a join, a quit or a revocation made over HTTP
reaches a connected websocket client at once, without a reconnect."""

from __future__ import annotations

import api_helpers
import pytest
from api_helpers import Api
from conftest import connect, http_request, send_acked

# every test here on one shard and on two (users on different shards)
pytestmark = pytest.mark.layouts("1", "2")

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


def _handshake(uid: int, token: str) -> bytes:
    return (f"GET /chat?id={uid}&token={token} HTTP/1.1\r\nHost: x\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()


async def test_join_and_quit_reach_a_connected_client(api: Api) -> None:
    owner, _ = await api.user("owner")
    bob, bob_token = await api.user("bob")
    gid = await api.node.group(owner)
    sender = await connect(api.node.url(owner))
    listener = await connect(api.node.url(bob, bob_token))

    await api.ok("/contact/joincommunity", data={"userid": bob, "token": bob_token,
                                                 "dstid": gid})
    [ack] = await send_acked(sender, gid, 1, cmd=11, prefix="in")
    got = await listener.recv()
    assert (got["cmd"], got["dstid"], got["id"], got["userid"]) == (11, gid, ack["id"], owner)

    await api.ok("/contact/quitcommunity", data={"dstid": gid}, token=bob_token)
    await send_acked(sender, gid, 1, cmd=11, prefix="out")
    # a private message sent after the group one arrives first: the group one never will
    [marker] = await send_acked(sender, bob, 1, prefix="dm")
    got = await listener.recv()
    assert (got["cmd"], got["id"]) == (10, marker["id"])
    await listener.assert_quiet()
    sender.tr.disconnect()
    listener.tr.disconnect()


async def test_created_group_reaches_its_connected_owner(api: Api) -> None:
    owner, owner_token = await api.user("owner")
    bob, bob_token = await api.user("bob")
    owner_conn = await connect(api.node.url(owner, owner_token))
    bob_conn = await connect(api.node.url(bob, bob_token))
    gid = (await api.ok("/contact/createcommunity", data={"name": "g"}, token=owner_token))["id"]
    await api.ok("/contact/joincommunity", data={"dstid": gid}, token=bob_token)
    [ack] = await send_acked(bob_conn, gid, 1, cmd=11, prefix="hello")
    got = await owner_conn.recv()
    assert (got["cmd"], got["id"]) == (11, ack["id"])
    owner_conn.tr.disconnect()
    bob_conn.tr.disconnect()


async def test_revoke_closes_live_connections_and_voids_the_token(api: Api) -> None:
    user = await api.register("revoker")
    uid, token = user["id"], user["token"]
    shards = range(len(api.node.shards))
    clients = [await connect(api.node.url(uid, token, shard=i)) for i in shards for _ in (1, 2)]
    await api.ok("/user/revoke", data={"userid": uid, "token": token})
    for client in clients:
        assert await client.wait_closed() == 4501
    # every shard refuses the old token, and takes a new login's
    again = await api.ok("/user/login", data={"mobile": user["mobile"], "passwd": "secret1"})
    for shard in api.node.shards:
        status, _, _ = await http_request(shard.port, _handshake(uid, token))
        assert status == 401
        status, _, _ = await http_request(shard.port, _handshake(uid, again["token"]))
        assert status == 101
