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


class Device:
    """What the router needs of a connection: uid, state, encoding, write()."""

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.state = 0
        self.binary = False
        self.live_from = 0
        self.top = 0
        self.groups: frozenset[int] = frozenset()
        self.written: list[bytes] = []
        self.close_pending = None

    def on_outcome(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_the_senders_other_device_gets_the_copy_even_if_the_sender_is_gone() -> None:
    from chatd.registry import Registry
    from chatd.router import CLOSING, Router
    from chatd.store import STORED
    from chatd.wire import Message

    registry = Registry(10)
    phone, desktop, bob = Device(1), Device(1), Device(2)
    for conn in (desktop, bob):  # the phone disconnected before the commit
        registry.reserve()
        registry.add(conn)
    phone.state = CLOSING
    msg = Message(id=5, userid=1, cmd=10, dstid=2, media=1, content="hi", ts=1)
    Router(registry).on_commit([(msg, phone, STORED)])
    assert desktop.written and bob.written and not phone.written
    assert parse(desktop.written[0]).data == parse(bob.written[0]).data
