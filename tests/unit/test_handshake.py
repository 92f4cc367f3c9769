"""Which browser origins may open a chat connection (``handshake.origin_allowed``)."""

from __future__ import annotations

import pytest

from chatd.handshake import normalize_origin, origin_allowed

API = 8081


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "chat.example.com:8080", True),  # not a browser
        ("http://chat.example.com:8081", "chat.example.com:8080", True),  # the web client
        ("http://CHAT.example.com:8081", "chat.example.com:8080", True),
        ("http://chat.example.com:8080", "chat.example.com:8080", True),  # its own origin
        ("https://chat.example.com", "chat.example.com", True),  # one proxy on 443
        ("http://chat.example.com", "chat.example.com", True),
        ("https://chat.example.com", "chat.example.com:8080", False),
        ("http://evil.example:8081", "chat.example.com:8080", False),
        ("http://chat.example.com.evil.example:8081", "chat.example.com:8080", False),
        ("http://chat.example.com:9999", "chat.example.com:8080", False),
        ("null", "chat.example.com:8080", False),  # sandboxed frames, file://
        ("chat.example.com", "chat.example.com:8080", False),
        ("ftp://chat.example.com:8081", "chat.example.com:8080", False),
        ("http://chat.example.com:99999", "chat.example.com:8080", False),
        ("http://127.0.0.1:8081", None, False),  # no Host: nothing to be same with
        ("http://[::1]:8081", "[::1]:8080", True),
        ("http://[::1]:8082", "[::1]:8080", False),
    ],
)
def test_same_origin_by_default(origin: str | None, host: str | None, allowed: bool) -> None:
    assert origin_allowed(origin, host, frozenset(), API) is allowed


def test_star_allows_every_origin() -> None:
    assert origin_allowed("http://evil.example", "chat:8080", frozenset({"*"}), API)
    assert origin_allowed("null", "chat:8080", frozenset({"*"}), API)


def test_an_explicit_list_allows_exactly_its_origins() -> None:
    allowed = frozenset({normalize_origin("https://App.example.com")})
    assert origin_allowed("https://app.example.com", "chat:8080", allowed, API)
    assert origin_allowed("https://app.example.com:443", "chat:8080", allowed, API)
    assert not origin_allowed("http://app.example.com", "chat:8080", allowed, API)
    assert not origin_allowed("https://app.example.com:8443", "chat:8080", allowed, API)
    # the list replaces the same-origin rule
    assert not origin_allowed("http://chat:8081", "chat:8080", allowed, API)


def test_normalize_origin_spells_the_port() -> None:
    assert normalize_origin("HTTPS://Example.COM") == "https://example.com:443"
    assert normalize_origin("http://[::1]") == "http://[::1]:80"
    assert normalize_origin("weird") == "weird"
