"""TLS natively: wss:// on the chat port and HTTPS on the api port, with a
certificate made in the test; a renewed certificate is read on SIGHUP without
dropping the connections that are open."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme
from conftest import UNIT, ServerProcess, close_clients, connect, run_cli, send_acked

from chatd import auth

pytestmark = pytest.mark.slow


def _write(cert: trustme.LeafCert, folder: Path) -> tuple[Path, Path]:
    chain, key = folder / "chain.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(chain))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(chain), append=True)
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


def _serial(port: int, client: ssl.SSLContext) -> int:
    with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
          client.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        return int(tls.getpeercert()["serialNumber"], 16)  # type: ignore[index]


async def _until_logged(server: ServerProcess, needle: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()

    def read() -> None:
        assert server.proc.stdout is not None
        for line in server.proc.stdout:
            server.lines.append(line)
            if needle in line:
                return
        raise AssertionError(f"{needle!r} never logged")

    await asyncio.wait_for(loop.run_in_executor(None, read), timeout * UNIT)


async def test_wss_and_https_with_a_certificate_renewed_on_sighup(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    ca = trustme.CA()
    first = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = _write(first, tmp_path)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    data = tmp_path / "data"
    uid = int(run_cli("user", "add", "--mobile", "1", "--password", "pw1234",
                      data_dir=data).stdout)
    token = auth.issue_token(auth.load_or_create_secret(data), uid, 0, 3600)
    server = ServerProcess(data, "--tls-cert", str(chain), "--tls-key", str(key),
                           "--shards", "1")
    server_procs.append(server)
    port = await server.started()
    url = f"wss://127.0.0.1:{port}/chat?id={uid}&token={token}"
    c = await connect(url, ssl_context=client)
    [ack] = await send_acked(c, uid, 1, prefix="over-tls")
    assert ack["id"] > 0
    async with aiohttp.ClientSession() as session, session.get(
            f"https://127.0.0.1:{server.api_port}/healthz", ssl=client) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    # a plaintext handshake on the TLS port is never upgraded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /chat?id={uid}&token={token} HTTP/1.1\r\nHost: x\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10 * UNIT)  # the server hangs up
    assert not answer.startswith(b"HTTP/1.1 101")
    writer.close()
    first_serial = _serial(port, client)

    # renewal: new files, SIGHUP; the open connection keeps working
    renewed = ca.issue_cert("127.0.0.1", "localhost")
    _write(renewed, tmp_path)
    server.signal(signal.SIGHUP)
    await _until_logged(server, "TLS certificate reloaded")
    [again] = await send_acked(c, uid, 1, prefix="after-renewal")
    assert again["id"] > ack["id"]
    assert _serial(port, client) != first_serial
    assert _serial(server.api_port, client) != first_serial
    await close_clients(c)
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0


def test_a_certificate_that_does_not_load_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    for command in ("check-config", "serve"):
        done = run_cli(command, "--tls-cert", str(bad), "--tls-key", str(bad),
                       "--chat-port", "0", "--api-port", "0", data_dir=tmp_path / "d",
                       check=False)
        assert done.returncode == 1, done
        assert "cannot load" in done.stderr
    done = run_cli("check-config", "--tls-cert", str(bad), data_dir=tmp_path, check=False)
    assert done.returncode == 1 and "give both" in done.stderr


async def test_a_tls_handshake_that_never_comes_is_dropped_at_the_deadline(
        tmp_path: Path, server_procs: list[ServerProcess]) -> None:
    """Slowloris before TLS: a client that opens TCP and sends no ClientHello
    (or half of one) is dropped at ``handshake_timeout_s``, not at asyncio's
    60 s TLS default; a client that completes TLS in time is upgraded."""
    deadline = 1.0 * UNIT
    ca = trustme.CA()
    chain, key = _write(ca.issue_cert("127.0.0.1"), tmp_path)
    server = ServerProcess(tmp_path / "data", "--tls-cert", str(chain), "--tls-key", str(key),
                           "--shards", "1", env={"CHATD_HANDSHAKE_TIMEOUT_S": str(deadline)})
    server_procs.append(server)
    port = await server.started()
    loop = asyncio.get_running_loop()
    for opening in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; a ClientHello's first bytes
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening)
        try:
            rest = await asyncio.wait_for(reader.read(), deadline + 10 * UNIT)
        except ConnectionResetError:
            rest = b""
        took = loop.time() - started
        writer.close()
        assert rest == b""
        assert deadline * 0.9 <= took < deadline + 5 * UNIT, took
    client = ssl.create_default_context()
    ca.configure_trust(client)
    assert _serial(port, client) > 0  # a prompt TLS client is served as before
    server.signal(signal.SIGTERM)
    assert await server.wait() == 0
