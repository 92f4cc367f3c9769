"""The bounds of a session that no integration test reaches cheaply."""

from __future__ import annotations

from chatd.protocol import Limits, Session, Verdict
from chatd.wire import CMD_PRIVATE, Message


def test_frames_past_waiting_max_while_loading_get_503() -> None:
    """A connection whose place in the order is not known yet queues at most
    ``waiting_max`` frames; the next ones are refused with 503 "retry"."""
    sess = Session(7, Limits(rate_per_s=0.0, waiting_max=3))
    verdicts = [sess.accept(Message(cmd=CMD_PRIVATE, dstid=8, media=1, content="x",
                                    cid=f"c{i}"), 0) for i in range(5)]
    assert verdicts == [Verdict.WAIT] * 3 + [Verdict.DONE] * 2
    out = sess.take_out() or b""
    assert out.count(b'"amount":503') == 2 and b'"cid":"c3"' in out and b'"cid":"c4"' in out
    waiting, _ = sess.on_here(frozenset(), 0)
    assert [m.cid for m in waiting] == ["c0", "c1", "c2"]
