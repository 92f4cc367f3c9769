"""HTTP API: the web chat client. ``/`` is the page, ``/static/<name>`` its
files (``/static/chatd.js`` is the JavaScript client library), and
``/config.json`` tells a client where the chat websocket is.

The files come from the installed package (``chatd/web/``), are read once
when the app starts, and are served with an ETag. The page runs under a
strict Content-Security-Policy: scripts, styles and images only from this
origin, no inline script or style, no frames, no forms posted elsewhere, and
connections only to this origin and to the chat websocket, which listens on
the same host name on the chat port (the Host header's name, checked, so a
forged Host can only name itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import re
from typing import Final

from aiohttp import web

from chatd.api_common import CTX, ApiError, reply
from chatd.api_schema import ClientConfig

#: what a file's name says it is; nothing else in ``chatd/web`` is served
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
INDEX: Final = "index.html"
_HOST_RE: Final = re.compile(r"^(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::\d{1,5})?$")
PAGE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclasses.dataclass(frozen=True)
class WebFile:
    body: bytes
    content_type: str
    etag: str


WEB_FILES: Final = web.AppKey("chatd.web", dict[str, WebFile])


def load_files() -> dict[str, WebFile]:
    """Every servable file of the package's ``web`` folder, by name."""
    files: dict[str, WebFile] = {}
    for entry in (importlib.resources.files("chatd") / "web").iterdir():
        name = entry.name
        ctype = CONTENT_TYPES.get(name[name.rfind("."):]) if "." in name else None
        if ctype is None or not entry.is_file() or name.startswith("."):
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[name] = WebFile(body, ctype, etag)
    return files


def host_name(host: str) -> str | None:
    """The name part of a Host header, or None when it is not a plain host name."""
    m = _HOST_RE.match(host)
    return m["name"] if m else None


def page_csp(host: str, chat_port: int) -> str:
    """The Content-Security-Policy of the page and its files, for a request to ``host``."""
    connect = "'self'"
    name = host_name(host)
    if name is not None and chat_port > 0:
        connect += f" ws://{name}:{chat_port} wss://{name}:{chat_port}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def _serve(request: web.Request, name: str) -> web.Response:
    files: dict[str, WebFile] = request.app[WEB_FILES]
    file = files.get(name)
    if file is None:
        raise ApiError(404, "not found")
    headers = {
        **PAGE_HEADERS,
        "ETag": file.etag,
        "Content-Security-Policy": page_csp(request.host, request.app[CTX].chat_port),
    }
    if request.headers.get("If-None-Match") == file.etag:
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = file.content_type
    return web.Response(body=file.body, headers=headers)


async def handle_index(request: web.Request) -> web.Response:
    """The web chat client's page."""
    return _serve(request, INDEX)


async def handle_static(request: web.Request) -> web.Response:
    """One of the web client's files, by name (no folders, nothing else)."""
    return _serve(request, request.match_info.get("name", ""))


async def handle_config(request: web.Request) -> web.Response:
    """``{"chat_port": N, "ws_path": "/chat"}``: where the chat websocket listens."""
    return reply(200, ClientConfig(chat_port=request.app[CTX].chat_port))
