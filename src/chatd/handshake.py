"""Rules of the websocket handshake that need no socket: which browser
origins may open a chat connection.

A browser sends ``Origin`` with every websocket handshake, and any web page
can ask it to open one to chatd: without a check, a foreign page that a
logged-in user visits could chat as that user. Clients that are not browsers
send no ``Origin`` and are not concerned.

``allowed_origins`` (config) decides:

- empty (the default): same-origin only. The origin must name the host the
  request was sent to (its ``Host`` header) and either the same port (a page
  served from the websocket's own origin, e.g. behind one reverse proxy) or
  the api port (chatd's own web client, which the API worker serves);
- ``*``: every origin (a documented choice for public, token-only setups);
- otherwise the exact origins listed (``https://chat.example.com``), compared
  case-insensitively, default ports implied.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(origin: str) -> tuple[str, int] | None:
    """(host, port) of a ``scheme://host[:port]`` origin; None if it is not one."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _host_header(host: str) -> tuple[str, int | None] | None:
    """(host, port or None) of a ``Host`` header value."""
    parsed = _host_port("http://" + host.strip())
    if parsed is None:
        return None
    explicit = host.strip().rsplit("]", 1)[-1]  # an IPv6 literal has colons of its own
    return parsed[0], parsed[1] if ":" in explicit else None


def normalize_origin(origin: str) -> str:
    """An origin in the form used for comparison: ``scheme://host:port``."""
    parsed = _host_port(origin)
    if parsed is None:
        return origin.strip().lower()
    host, port = parsed
    scheme = urlsplit(origin.strip()).scheme.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def origin_allowed(
    origin: str | None,
    host: str | None,
    allowed: Collection[str],
    api_port: int,
) -> bool:
    """Whether a handshake with this ``Origin`` (None: no header) may upgrade.

    ``host`` is the request's ``Host`` header, ``allowed`` the configured
    ``allowed_origins`` (already normalized, see ``normalize_origin``) and
    ``api_port`` the port of chatd's web client.
    """
    if origin is None:
        return True  # not a browser
    if "*" in allowed:
        return True
    if allowed:
        return normalize_origin(origin) in allowed
    theirs = _host_port(origin)
    ours = _host_header(host) if host else None
    if theirs is None or ours is None or theirs[0] != ours[0]:
        return False
    port = theirs[1]
    if port == api_port:
        return True
    # the request's own origin: a Host without a port was sent to the default one
    return port == ours[1] if ours[1] is not None else port in (80, 443)
