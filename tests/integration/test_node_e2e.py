"""The whole node as ``chatd serve`` runs it: supervisor, shard process and API
worker process. What the API changes reaches live websocket connections in
another process, through the supervisor, without a reconnect."""

from __future__ import annotations

import io
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ServerProcess, connect, send_acked
from PIL import Image


class Http:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def ok(self, path: str, **kwargs: Any) -> Any:
        return (await self.body(path, **kwargs))["data"]

    async def body(self, path: str, **kwargs: Any) -> Any:
        async with self.session.post(self.base + path, **kwargs) as resp:
            body = await resp.json()
            assert (resp.status, body["code"]) == (200, 0), body
            return body


async def _register(http: Http, mobile: str) -> tuple[int, str]:
    user = await http.ok("/user/register", data={"mobile": mobile, "passwd": "secret1",
                                                 "nickname": mobile})
    return int(user["id"]), str(user["token"])


@pytest.mark.slow
async def test_api_changes_reach_live_connections_across_processes(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    try:
        port = await server.started()
        async with aiohttp.ClientSession() as session:
            http = Http(session, server.api_port)
            alice, alice_token = await _register(http, "13900000001")
            bob, bob_token = await _register(http, "13900000002")
            a = await connect(f"ws://127.0.0.1:{port}/chat?id={alice}&token={alice_token}")
            b = await connect(f"ws://127.0.0.1:{port}/chat?id={bob}&token={bob_token}")

            group = await http.ok("/contact/createcommunity", data={
                "userid": alice, "token": alice_token, "name": "team"})
            gid = int(group["id"])
            # bob joins over HTTP while connected: the shard must learn it live
            await http.ok("/contact/joincommunity", data={
                "userid": bob, "token": bob_token, "dstid": gid})

            # the join is in the node's order before the reply: the first group
            # message after it reaches bob live
            [ack] = await send_acked(a, gid, 1, cmd=11, prefix="team")
            got = await b.recv()
            assert (got["id"], got["userid"], got["content"]) == (ack["id"], alice, "team body 0")

            # an uploaded image: the message that carries its url gets the preview
            buf = io.BytesIO()
            Image.new("RGB", (1200, 800), (200, 30, 30)).save(buf, "JPEG")
            form = aiohttp.FormData()
            form.add_field("file", buf.getvalue(), filename="x.jpg", content_type="image/jpeg")
            upload = await http.body("/attach/upload", data=form,
                                   headers={"Authorization": f"Bearer {alice_token}"})
            a.send(cmd=10, dstid=bob, media=4, url=upload["url"], cid="img1")
            copy = await b.recv_until(lambda f: f.get("cid") == "img1")
            assert copy["url"] == upload["url"]
            assert copy["pic"] == upload["pic"] and copy["pic"].endswith(".preview.jpg")

            # revocation closes bob's live connection with 4501
            await http.ok("/user/revoke", headers={"Authorization": f"Bearer {bob_token}"})
            assert await b.wait_closed(10) == 4501
        a.tr.disconnect()
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        server.kill()
