"""The first end-to-end path: a private message is stored, acked and delivered."""

from __future__ import annotations

from conftest import Node, connect


async def test_private_message_is_acked_and_delivered(node: Node) -> None:
    alice, bob = await node.user(), await node.user()
    a = await connect(node.url(alice))
    b = await connect(node.url(bob))
    a.send(cmd=10, dstid=bob, media=1, content="hello", cid="c1")
    ack = await a.recv()
    got = await b.recv()
    assert ack["cmd"] == 1 and ack["cid"] == "c1" and ack["id"] > 0
    assert got["userid"] == alice and got["content"] == "hello" and got["id"] == ack["id"]
    assert got["ts"] == ack["ts"]
