"""The handshake's rules without a socket: which browser origins may open a
chat connection (``origin_allowed``), what makes an upgrade
(``upgrade_refusal``), and connections per address (``AddressLimit``)."""

from __future__ import annotations

import random

import pytest
from multidict import CIMultiDict

from chatd.handshake import (
    AddressLimit,
    address_key,
    normalize_origin,
    origin_allowed,
    upgrade_refusal,
)

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


# --- upgrade_refusal ------------------------------------------------------------

GOOD = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def headers(**changes: str | None) -> CIMultiDict[str]:
    """GOOD with some headers changed (None: left out); names use _ for -."""
    out = CIMultiDict(GOOD)
    for name, value in changes.items():
        name = name.replace("_", "-")
        out.popall(name, None)
        if value is not None:
            out[name] = value
    return out


@pytest.mark.parametrize("changes", [
    {}, {"Connection": "keep-alive, Upgrade"}, {"Upgrade": "WebSocket"},
    {"Connection": "upgrade,keep-alive"}, {"Sec_WebSocket_Version": " 13 "},
])
def test_a_websocket_upgrade_is_accepted(changes: dict[str, str]) -> None:
    assert upgrade_refusal(headers(**changes)) is None


@pytest.mark.parametrize("changes,status", [
    ({"Upgrade": None}, 400),
    ({"Upgrade": "h2c"}, 400),
    ({"Connection": None}, 400),
    ({"Connection": "keep-alive"}, 400),
    ({"Sec_WebSocket_Key": None}, 400),
    ({"Sec_WebSocket_Key": "short"}, 400),
    ({"Sec_WebSocket_Key": "dGhlIHNhbXBsZSBub25jZQ"}, 400),  # padding missing
    ({"Sec_WebSocket_Key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAA"}, 400),  # 21 bytes
    ({"Sec_WebSocket_Key": "dGhlIHNhbXBsZSBub25jZQ==é"}, 400),
    ({"Sec_WebSocket_Version": None}, 426),
    ({"Sec_WebSocket_Version": "8"}, 426),
    ({"Sec_WebSocket_Version": "13, 8"}, 426),
])
def test_what_is_no_upgrade(changes: dict[str, str | None], status: int) -> None:
    refusal = upgrade_refusal(headers(**changes))
    assert refusal is not None and refusal[0] == status and refusal[1]


# --- address_key -----------------------------------------------------------------


@pytest.mark.parametrize("peer,key", [
    ("127.0.0.1", "127.0.0.1"),
    ("203.0.113.9", "203.0.113.9"),
    ("::ffff:203.0.113.9", "203.0.113.9"),  # a dual-stack socket's IPv4 peer
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::1", "::/64"),
    ("", ""),
    ("not:an:address", "not:an:address"),
])
def test_address_key(peer: str, key: str) -> None:
    assert address_key(peer) == key


def test_one_ipv6_host_is_one_address() -> None:
    assert address_key("2001:db8:1:2::a") == address_key("2001:db8:1:2:9:8:7:6")
    assert address_key("2001:db8:1:2::a") != address_key("2001:db8:1:3::a")


# --- AddressLimit ----------------------------------------------------------------


def test_an_address_gets_its_limit_and_then_one_more_after_a_close() -> None:
    limit = AddressLimit(3)
    for _ in range(3):
        assert limit.allows("10.0.0.1")
        limit.opened("10.0.0.1")
    assert not limit.allows("10.0.0.1")
    assert limit.allows("10.0.0.2")  # others are not concerned
    limit.closed("10.0.0.1")
    assert limit.allows("10.0.0.1") and limit.count("10.0.0.1") == 2


def test_an_address_with_nothing_open_leaves_no_entry() -> None:
    limit = AddressLimit(2)
    limit.opened("a")
    limit.opened("b")
    limit.closed("a")
    limit.closed("b")
    assert len(limit) == 0 and limit.count("a") == 0


def test_limit_zero_counts_nothing() -> None:
    limit = AddressLimit(0)
    for _ in range(10_000):
        assert limit.opened("10.0.0.1") == ""  # nothing for the connection to keep
    assert limit.allows("10.0.0.1") and len(limit) == 0


def test_the_connections_of_one_address_share_one_string() -> None:
    limit = AddressLimit(10)
    kept = [limit.opened("".join(["10.0.0.", "1"])) for _ in range(3)]
    assert kept == ["10.0.0.1"] * 3 and all(k is kept[0] for k in kept)
    for key in kept:
        limit.closed(key)
    assert len(limit) == 0
    fresh = "".join(["10.0.0.", "1"])
    assert limit.opened(fresh) is fresh  # nothing left of the old one


def test_counts_stay_true_through_any_order_of_opens_and_closes() -> None:
    """Random opens and closes (each close of a connection that is open):
    the table always says what is open, and allows exactly below the limit."""
    rng = random.Random(8)
    limit = AddressLimit(5)
    open_: list[str] = []
    for _ in range(5_000):
        addr = rng.choice("abcd")
        if open_ and rng.random() < 0.5:
            gone = open_.pop(rng.randrange(len(open_)))
            limit.closed(gone)
        elif limit.allows(addr):
            limit.opened(addr)
            open_.append(addr)
        else:
            assert open_.count(addr) == 5
        for a in "abcd":
            assert limit.count(a) == open_.count(a)
            assert limit.allows(a) is (open_.count(a) < 5)
    assert len(limit) == len(set(open_))
