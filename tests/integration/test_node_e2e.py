"""The whole node as ``chatd serve`` runs it: supervisor, shard process and API
worker process. What the API changes reaches live websocket connections in
another process, through the supervisor, without a reconnect. The clients are
the Python SDK's: its HTTP calls and its websocket, found through /config.json."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import pytest
from conftest import UNIT, ServerProcess
from PIL import Image

from chatd.client import ChatClient, Message, State


async def recv(client: ChatClient) -> Message:
    return await asyncio.wait_for(client.recv(), 10 * UNIT)


@pytest.mark.slow
async def test_api_changes_reach_live_connections_across_processes(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    server = ServerProcess(tmp_path / "data")
    server_procs.append(server)
    await server.started()
    base = f"http://127.0.0.1:{server.api_port}"
    alice, bob = ChatClient(base), ChatClient(base)
    try:
        a = await alice.register("13900000001", "secret1", nickname="13900000001")
        b = await bob.register("13900000002", "secret1", nickname="13900000002")
        await asyncio.wait_for(alice.connect(), 10 * UNIT)
        await asyncio.wait_for(bob.connect(), 10 * UNIT)

        group = await alice.create_group("team")
        # bob joins over HTTP while connected: the shard must learn it live
        assert (await bob.join_group(group.id)).joined is True

        # the join is in the node's order before the reply: the first group
        # message after it reaches bob live
        ack = await asyncio.wait_for(alice.send_text(group.id, "team body 0", group=True),
                                     10 * UNIT)
        got = await recv(bob)
        assert (got.cmd, got.dstid, got.id, got.userid, got.content) == (
            11, group.id, ack.id, a.id, "team body 0")

        # an uploaded image: the message that carries its url gets the preview
        buf = io.BytesIO()
        Image.new("RGB", (1200, 800), (200, 30, 30)).save(buf, "JPEG")
        upload = await alice.upload(buf.getvalue(), "x.jpg", "image/jpeg")
        assert upload.pic.endswith(".preview.jpg")
        sent = await asyncio.wait_for(alice.submit(Message(
            cmd=10, dstid=b.id, media=4, url=upload.url, cid="img1")), 10 * UNIT)
        copy = await recv(bob)
        assert (copy.id, copy.cid, copy.media) == (sent.id, "img1", 4)
        assert copy.url == upload.url
        assert copy.pic == upload.pic and copy.pic.endswith(".preview.jpg")
        # every message reached bob on the connection he had before the join
        assert (alice.connections, bob.connections) == (1, 1)

        # revocation closes bob's live connection with 4501
        await bob.revoke()
        await bob.wait_state(State.CLOSED, 10 * UNIT)
        assert bob.fatal is not None and bob.fatal.code == 4501
        await alice.close()
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        await alice.close()
        await bob.close()
