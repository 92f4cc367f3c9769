"""Rules of the websocket handshake that need no socket: whether a request
is a websocket upgrade at all, which browser origins may open a chat
connection, and how many connections one address may hold.

Upgrade (``upgrade_refusal``, RFC 6455 §4.2.1): ``Upgrade`` must name
``websocket`` and ``Connection`` ``upgrade`` (as tokens of a list: Firefox
sends ``keep-alive, Upgrade``), ``Sec-WebSocket-Key`` must be 16 bytes in
base64, otherwise 400; a ``Sec-WebSocket-Version`` other than 13 gets 426 with
``Sec-WebSocket-Version: 13`` (§4.4), so the client knows what to speak.

Addresses (``AddressLimit``): one shard counts its upgraded connections per
peer address (``address_key``: an IPv4 address, or an IPv6 /64, which one
host usually owns whole) and refuses the upgrade past ``max_conns_per_ip``
with 429. The count is per shard: with N shards behind SO_REUSEPORT, one
address may hold up to N times the limit on the node.

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

import binascii
import ipaddress
from base64 import b64decode
from collections.abc import Collection, Mapping
from typing import Final
from urllib.parse import urlsplit

#: the only websocket version chatd speaks (RFC 6455)
WS_VERSION: Final = "13"

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


# --- is it a websocket upgrade? ----------------------------------------------------


def _has_token(value: str | None, token: str) -> bool:
    return value is not None and any(
        part.strip().lower() == token for part in value.split(",")
    )


def upgrade_refusal(headers: Mapping[str, str]) -> tuple[int, str] | None:
    """Why a request for a websocket endpoint cannot be upgraded, as
    (HTTP status, reason); None if it can. ``headers``: case-insensitive."""
    if not _has_token(headers.get("upgrade"), "websocket"):
        return 400, "not a websocket upgrade: Upgrade: websocket is required"
    if not _has_token(headers.get("connection"), "upgrade"):
        return 400, "not a websocket upgrade: Connection: Upgrade is required"
    version = headers.get("sec-websocket-version")
    if version is None or version.strip() != WS_VERSION:
        return 426, f"websocket version {WS_VERSION} is required"
    key = headers.get("sec-websocket-key")
    try:
        valid = key is not None and len(b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


# --- connections per address ------------------------------------------------------


def address_key(peer: str) -> str:
    """What ``AddressLimit`` counts a peer address as: an IPv4 address as it
    is (also when it comes IPv4-mapped, ``::ffff:a.b.c.d``), an IPv6 address
    as its /64 network (``2001:db8:1:2::/64``); anything else as it is."""
    if ":" not in peer:
        return peer
    try:
        addr = ipaddress.IPv6Address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


class AddressLimit:
    """Open connections per address (``address_key``) against a limit.

    The shard asks ``allows`` at the handshake, calls ``opened`` when the
    connection is upgraded and ``closed`` when it is gone; an address with no
    connection left has no entry. ``limit`` 0 switches it off (nothing is
    counted). Pure bookkeeping: a dict of counts, no timers.
    """

    __slots__ = ("limit", "_open", "_keys")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        #: each counted address's one string (the connections keep it)
        self._keys: dict[str, str] = {}

    def allows(self, key: str) -> bool:
        """Whether one more connection from ``key`` may be upgraded."""
        limit = self.limit
        return not limit or self._open.get(key, 0) < limit

    def opened(self, key: str) -> str:
        """Count one more connection from ``key``; what the connection keeps to
        uncount it (``closed``): one string per address, shared by all its
        connections, or "" when nothing is counted (limit 0)."""
        if not self.limit:
            return ""
        count = self._open.get(key, 0)
        if count:
            key = self._keys[key]
        else:
            self._keys[key] = key
        self._open[key] = count + 1
        return key

    def closed(self, key: str) -> None:
        if not self.limit:
            return
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
            self._keys.pop(key, None)

    def count(self, key: str) -> int:
        """Connections open from ``key``."""
        return self._open.get(key, 0)

    def __len__(self) -> int:
        """Addresses with at least one connection open."""
        return len(self._open)
