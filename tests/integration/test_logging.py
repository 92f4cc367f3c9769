"""What the node logs: one line per event (time, level, logger, message), and
never a token or a password — not even at debug level, where connections and
refused handshakes are logged."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import aiohttp
import pytest
from conftest import ServerProcess, close_clients, connect, http_request, send_acked

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                  r"[\w.]+: ")


@pytest.mark.slow
async def test_debug_logs_carry_no_token_or_password(tmp_path: Path,
                                                    server_procs: list[ServerProcess]) -> None:
    server = ServerProcess(tmp_path / "data", "--log-level", "debug", "--shards", "2")
    server_procs.append(server)
    port = await server.started()
    password = "correct horse battery"
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.api_port}"
        async with http.post(base + "/user/register", data={
                "mobile": "555", "passwd": password, "nickname": "n"}) as resp:
            user = (await resp.json())["data"]
        async with http.post(base + "/user/login", data={
                "mobile": "555", "passwd": password + "x"}) as resp:
            assert resp.status == 401  # a failed login is logged without the password
    uid, token = user["id"], user["token"]
    client = await connect(f"ws://127.0.0.1:{port}/chat?id={uid}&token={token}")
    await send_acked(client, uid, 1)
    forged = token[:-4] + "AAAA"
    for bad in (forged, "not-a-token"):
        status, _, _ = await http_request(port, (
            f"GET /chat?id={uid}&token={bad} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
        assert status == 401
    await close_clients(client)
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0
    text = "".join(server.lines)
    assert "handshake refused" in text  # debug level was really on
    for secret in (token, forged, token.rsplit(".", 1)[1], password):
        assert secret not in text
    assert "token=" not in text
    # one line per event: every line starts like the format says (tracebacks
    # would be continuation lines; there must be none here)
    bad, skip = [], False
    for line in server.lines:
        if "CoverageWarning" in line:  # the suite's coverage tool, not chatd
            skip = True
            continue
        if skip and line.startswith(" "):
            continue
        skip = False
        if line.strip() and not LINE.match(line):
            bad.append(line)
    assert bad == [], bad[:5]
