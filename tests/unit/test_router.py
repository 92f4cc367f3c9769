"""Server-side websocket framing, checked against an independent parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from chatd.router import OP_BINARY, OP_TEXT, ws_frame


def parse(data: bytes) -> Frame:
    """Parse one server frame with the websockets library's own parser."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    gen = Frame.parse(reader.read_exact, mask=False)
    try:
        next(gen)
    except StopIteration as done:
        assert reader.at_eof(), "bytes left after the frame"
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("frame incomplete")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize(("opcode", "expected"), [(OP_TEXT, Opcode.TEXT),
                                                 (OP_BINARY, Opcode.BINARY)])
def test_length_encodings_at_every_boundary(size: int, opcode: int, expected: Opcode) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = parse(ws_frame(opcode, payload))
    assert frame.opcode is expected
    assert frame.fin
    assert frame.data == payload


@given(st.binary(max_size=300))
def test_any_payload_round_trips(payload: bytes) -> None:
    assert parse(ws_frame(OP_BINARY, payload)).data == payload
