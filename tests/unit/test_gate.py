"""The FrameGate without a socket: whatever the reads a stream is cut into,
picows gets exactly the frames it would accept (up to a client's close frame,
nothing after it), and the listener each frame that picows would fail the
connection for, with its close code.

picows' side is a stand-in for its read-buffer API (``get_buffer`` hands out
its free space, more than 256 bytes as picows' does; ``buffer_updated`` says
how many of them it may parse), which records what it was given."""

from __future__ import annotations

import os
import struct
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from chatd.gate import FrameGate

LIMIT = 1000


class Transport:
    is_disconnected = False


class Picows:
    """picows' read buffer as the gate sees it, and the listener behind it."""

    def __init__(self) -> None:
        self.buf = bytearray(2048)
        self.pos = 0
        self.listener = self
        self.transport = Transport()
        self.faults: list[int] = []

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buf) - self.pos <= 256:
            self.buf.extend(bytes(len(self.buf)))
        return memoryview(self.buf)[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes

    def on_bad_frame(self, code: int, reason: str) -> None:
        assert reason
        self.faults.append(code)

    @property
    def given(self) -> bytes:
        return bytes(self.buf[: self.pos])


def read(gate: FrameGate, data: bytes, cuts: list[int]) -> None:
    """``data`` as the transport would read it, in pieces of the sizes ``cuts``
    (cycled), each at most what ``get_buffer`` offers."""
    i = 0
    while data:
        view = gate.get_buffer(-1)
        k = min(len(view), len(data), cuts[i % len(cuts)] if cuts else len(data))
        view[:k] = data[:k]
        del view  # picows may grow its buffer now
        gate.buffer_updated(k)
        data = data[k:]
        i += 1


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True) -> bytes:
    """A client frame (masked unless ``mask`` is false)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


#: kinds of frames: (what picows gets of it, the fault it is, whether it ends the stream)
OK, BIG, BAD, CLOSE = "ok", "big", "bad", "close"


def frames() -> st.SearchStrategy[tuple[str, bytes, int]]:
    """(kind, the frame, its close code if it is a fault)."""
    data = st.builds(lambda op, n, fin: (OK, frame(op, b"d" * n, fin=fin), 0),
                     st.sampled_from([0, 1, 2]), st.integers(0, LIMIT), st.booleans())
    control = st.builds(lambda op, n: (OK, frame(op, b"c" * n), 0),
                        st.sampled_from([9, 10]), st.integers(0, 125))
    big = st.builds(lambda n: (BIG, frame(2, b"b" * n), 1009), st.integers(LIMIT + 1, 70_000))
    bad = st.sampled_from([
        (BAD, frame(3, b"x"), 1002),
        (BAD, frame(0xB, b""), 1002),
        (BAD, frame(1, b"x", mask=False), 1002),
        (BAD, frame(9, b"p", fin=False), 1002),
        (BAD, frame(9, b"p" * 126), 1002),
        (BAD, struct.pack("!BBH", 0x82, 0xFE, 125) + b"k" * 4 + b"x" * 125, 1002),
        (BAD, struct.pack("!BBQ", 0x82, 0xFF, 65535) + b"k" * 4, 1002),
        (BAD, struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + b"k" * 4, 1002),
        (BAD, frame(8, b"\x03"), 1002),
        (BAD, frame(8, struct.pack("!H", 1005)), 1002),
        (BAD, frame(8, struct.pack("!H", 5000)), 1002),
        (BAD, frame(8, struct.pack("!H", 1000) + b"\xff"), 1007),
    ])
    close = st.builds(lambda reason: (CLOSE, frame(8, struct.pack("!H", 1000) + reason), 0),
                      st.sampled_from([b"", b"bye", "é".encode() * 61]))
    return st.one_of(data, data, control, big, bad, close, st.just((CLOSE, frame(8), 0)))


def expected(stream: list[tuple[str, bytes, int]]) -> tuple[bytes, list[int]]:
    """What picows must get of ``stream``, and the faults reported."""
    given: list[bytes] = []
    faults: list[int] = []
    for kind, data, code in stream:
        if kind == OK:
            given.append(data)
        elif kind == BIG:
            faults.append(code)  # its payload is dropped, the frames after it go on
        elif kind == BAD:
            faults.append(code)
            break
        else:
            given.append(data)
            break
    return b"".join(given), faults


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), max_size=12),
       st.lists(st.integers(1, 3000), max_size=6),
       st.binary(max_size=300),
       st.integers(0, 5000))
def test_picows_gets_the_frames_it_accepts_whatever_the_reads(
        stream: list[tuple[str, bytes, int]], cuts: list[int], trailing: bytes,
        with_head: int) -> None:
    inner = Picows()
    gate = FrameGate(inner, LIMIT)
    data = b"".join(f for _, f, _ in stream)
    # the first bytes may come with the request head (the guard feeds them)
    gate.feed(data[:with_head])
    read(gate, data[with_head:], cuts)
    want, faults = expected(stream)
    ended = any(kind in (BAD, CLOSE) for kind, _, _ in stream)
    if ended:
        # whatever comes after the end is dropped, whatever it is
        read(gate, trailing, cuts)
    assert inner.given == want
    assert inner.faults == faults


def test_a_huge_frame_is_counted_off_not_buffered() -> None:
    inner = Picows()
    gate = FrameGate(inner, LIMIT)
    size = 100 << 20
    read(gate, struct.pack("!BBQ", 0x82, 0xFF, size) + b"mask", [])
    chunk = bytes(64 * 1024)
    for _ in range(size // len(chunk)):
        read(gate, chunk, [])
    after = frame(1, b"after")
    read(gate, after, [])
    assert inner.faults == [1009]
    assert inner.given == after
    assert len(inner.buf) == 2048  # picows' buffer never held the frame


def test_bytes_that_came_with_the_request_head_are_judged_too() -> None:
    inner = Picows()
    gate = FrameGate(inner, LIMIT)
    ok = frame(1, b'{"cmd": 0}')
    gate.feed(ok + frame(3, b"x") + ok)
    assert (inner.given, inner.faults) == (ok, [1002])


@pytest.mark.parametrize("refused", [True, False])
def test_a_refused_upgrade_gets_nothing(refused: bool) -> None:
    inner: Any = Picows()
    if refused:
        inner.listener = None  # picows answered the handshake with an error
    gate = FrameGate(inner, LIMIT)
    data = frame(1, b"x")
    read(gate, data, [])
    assert inner.given == (b"" if refused else data)
    assert inner.faults == []


def test_a_cap_under_126_bytes_holds_for_short_frames() -> None:
    inner = Picows()
    gate = FrameGate(inner, 50)
    ok = frame(1, b"x" * 50)
    read(gate, ok + frame(1, b"x" * 51) + ok, [])
    assert (inner.given, inner.faults) == (ok + ok, [1009])
