"""Per-connection rules: the token bucket and fragment reassembly."""

from __future__ import annotations

import pytest

from chatd.errors import FrameError
from chatd.session import RateLimiter, add_fragment
from chatd.wire import ERR_TOO_LARGE


class ConnState:
    """The attributes that ``shard.Conn`` gives these helpers."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.stamp = 0.0
        self.frag: bytearray | None = None


def test_bucket_allows_a_burst_then_refuses() -> None:
    limiter, conn = RateLimiter(rate_per_s=10, burst=5), ConnState()
    limiter.start(conn, now=100.0)
    assert [limiter.allow(conn, 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refills_at_the_rate_and_caps_at_the_burst() -> None:
    limiter, conn = RateLimiter(rate_per_s=10, burst=5), ConnState()
    limiter.start(conn, now=0.0)
    for _ in range(5):
        assert limiter.allow(conn, 0.0)
    assert not limiter.allow(conn, 0.05)  # half a token
    assert limiter.allow(conn, 0.1)  # 0.1 s more: one token
    assert not limiter.allow(conn, 0.1)
    # a long silence refills to the burst, not beyond
    assert [limiter.allow(conn, 1000.0) for _ in range(6)] == [True] * 5 + [False]


def test_refused_frames_do_not_spend_tokens() -> None:
    limiter, conn = RateLimiter(rate_per_s=1, burst=1), ConnState()
    limiter.start(conn, now=0.0)
    assert limiter.allow(conn, 0.0)
    for t in (0.2, 0.4, 0.6, 0.8):
        assert not limiter.allow(conn, t)
    assert limiter.allow(conn, 1.0)


def test_fragments_are_reassembled() -> None:
    conn = ConnState()
    assert add_fragment(conn, b'{"cmd":', False, True, 100) is None
    assert add_fragment(conn, b"0", False, False, 100) is None
    assert add_fragment(conn, b"}", True, False, 100) == b'{"cmd":0}'
    assert conn.frag is None
    # and the next message starts afresh
    assert add_fragment(conn, b"ab", False, True, 100) is None
    assert add_fragment(conn, b"c", True, False, 100) == b"abc"


def test_a_message_growing_past_the_limit_is_413_and_forgotten() -> None:
    conn = ConnState()
    add_fragment(conn, b"x" * 60, False, True, 100)
    with pytest.raises(FrameError) as info:
        add_fragment(conn, b"x" * 41, False, False, 100)
    assert info.value.code == ERR_TOO_LARGE
    assert conn.frag is None


def test_exactly_the_limit_is_fine() -> None:
    conn = ConnState()
    add_fragment(conn, b"x" * 60, False, True, 100)
    assert add_fragment(conn, b"x" * 40, True, False, 100) == b"x" * 100


def test_continuation_without_a_start_is_a_protocol_error() -> None:
    with pytest.raises(ValueError):
        add_fragment(ConnState(), b"x", True, False, 100)


def test_new_message_inside_a_fragmented_one_is_a_protocol_error() -> None:
    conn = ConnState()
    add_fragment(conn, b"x", False, True, 100)
    with pytest.raises(ValueError):
        add_fragment(conn, b"y", False, True, 100)
