"""GET /metrics on a running node reflects what the shard does."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest
from conftest import UNIT, ServerProcess, connect, run_cli


@pytest.mark.slow
async def test_metrics_count_connections_and_messages(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uid = int(run_cli("user", "add", "--mobile", "1", "--password", "pw", data_dir=data).stdout)
    token = run_cli("token", str(uid), data_dir=data).stdout.strip()
    server = ServerProcess(data)
    try:
        port = await server.started()
        client = await connect(f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}")
        client.send(cmd=10, dstid=uid, media=1, content="to myself", cid="m1")
        await client.recv_until(lambda f: f.get("cmd") == 1)
        url = f"http://127.0.0.1:{server.api_port}/metrics"

        async def scrape(session: aiohttp.ClientSession) -> str:
            async with session.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return await resp.text()

        async with aiohttp.ClientSession() as session:
            async def until_counted() -> str:
                while True:  # figures are pushed every 2 s
                    text = await scrape(session)
                    if re.search(r'^chatd_messages_stored_total\{child="log-0"\} 1$', text,
                                 re.M):
                        return text
                    await asyncio.sleep(0.2)

            text = await asyncio.wait_for(until_counted(), 15 * UNIT)
        assert re.search(r'^chatd_connections\{child="shard-0"\} 1$', text, re.M), text
        assert re.search(r'^chatd_process_resident_bytes\{child="api-0"\} \d+$', text, re.M)
        client.tr.disconnect()
        server.signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        server.kill()
