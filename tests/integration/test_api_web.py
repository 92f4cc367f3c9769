"""HTTP API: the web client's page and files, ``/config.json``, and the
headers that keep the page strict (CSP) and what it serves inert."""

from __future__ import annotations

import api_helpers
from api_helpers import Api
from conftest import Node, http_request
from multidict import CIMultiDict

from chatd.api_web import host_name, page_csp

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


async def _get(api: Api, path: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with api.session.get(api.base + path, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def test_page_and_library_are_served_with_a_strict_csp(api: Api) -> None:
    status, headers, body = await _get(api, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/static/app.js"></script>' in body
    assert b"<script>" not in body and b" on" not in body.replace(b" one", b"")
    csp = headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no eval
    assert directives["style-src"] == "'self'"
    assert directives["img-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"

    status, headers, lib = await _get(api, "/static/chatd.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert b"export class ChatClient" in lib
    assert headers["Content-Security-Policy"] == csp
    for name in ("app.js", "app.css", "icon.svg"):
        assert (await _get(api, f"/static/{name}"))[0] == 200


async def test_the_csp_lets_the_page_reach_the_chat_port_of_its_own_host(
        api_factory: object, node: Node) -> None:
    api = await api_factory(chat_port=8123)  # type: ignore[operator]
    _, headers, _ = await _get(api, "/")
    assert "connect-src 'self' ws://127.0.0.1:8123 wss://127.0.0.1:8123;" in (
        headers["Content-Security-Policy"])
    # a forged Host can only name a host; anything else leaves just 'self'
    raw = (b"GET / HTTP/1.1\r\nHost: evil.example;script-src *\r\nConnection: close\r\n\r\n")
    status, headers, _ = await http_request(api.port, raw)
    assert status == 200
    assert "connect-src 'self';" in headers["content-security-policy"]
    assert "script-src 'self';" in headers["content-security-policy"]
    assert host_name("[::1]:8081") == "[::1]" and host_name("a.b:1") == "a.b"
    assert host_name("a b") is None and host_name("x/y") is None
    assert "ws:" not in page_csp("chat.example", 0)


async def test_static_serves_only_its_own_files(api: Api) -> None:
    for path in ("/static/nope.js", "/static/..%2fapi.py", "/static/%2e%2e/__init__.py",
                 "/static/", "/static/.hidden", "/static/index.htm"):
        status, headers, body = await _get(api, path)
        assert status == 404, path
        assert headers["Content-Type"].startswith("application/json"), path
    status, _, body = await _get(api, "/static/../api.py")
    assert status == 404 and b"import" not in body


async def test_etag_and_not_modified(api: Api) -> None:
    status, headers, _ = await _get(api, "/static/chatd.js")
    etag = headers["ETag"]
    status, headers, body = await _get(api, "/static/chatd.js", **{"If-None-Match": etag})
    assert status == 304 and body == b""
    status, _, body = await _get(api, "/static/chatd.js", **{"If-None-Match": '"other"'})
    assert status == 200 and body


async def test_config_names_the_chat_port(api_factory: object, node: Node) -> None:
    api = await api_factory(chat_port=node.port)  # type: ignore[operator]
    status, _, body = await _get(api, "/config.json")
    assert status == 200
    import json

    assert json.loads(body) == {"chat_port": node.port, "ws_path": "/chat"}
    # without an override, the configuration's port
    plain = await api_factory()  # type: ignore[operator]
    assert json.loads((await _get(plain, "/config.json"))[2])["chat_port"] == node.cfg.chat_port


async def test_no_token_in_the_page(api: Api) -> None:
    # the page keeps the token in sessionStorage, never in a URL it builds
    app = (await _get(api, "/static/app.js"))[2].decode()
    assert "location.search" not in app and "history.pushState" not in app
    assert "sessionStorage" in app and "localStorage" not in app
