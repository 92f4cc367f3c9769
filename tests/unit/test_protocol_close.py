"""A session that closes while answers are due keeps its stream gapless.

Found by the chaos soak (tests/integration/test_chaos.py): a connection closed
with 4008 while its messages were in the log got their acks after the close
(as it must), but the live copies committed between them were dropped, so
its highest id was no longer a safe resume point: a resume with ``last=`` that
id skipped those copies for good.
"""

from __future__ import annotations

import msgspec

from chatd.protocol import CLOSING, DELIVERED, IGNORED, Limits, Session
from chatd.wire import CMD_GROUP, CMD_PRIVATE, Message, framed


def _live(uid: int = 7) -> Session:
    sess = Session(uid, Limits(rate_per_s=0.0))
    waiting, replay = sess.on_here(frozenset({1}), 0)
    assert waiting == [] and not replay
    return sess


def _frames(sess: Session) -> list[dict[str, object]]:
    data = sess.take_out() or b""
    out = []
    while data:  # unmasked server frames, short payloads: 2-byte header
        n = data[1]
        assert n < 126
        out.append(msgspec.json.decode(data[2 : 2 + n]))
        data = data[2 + n :]
    return out


def _submit(sess: Session, cid: str) -> Message:
    msg = Message(cmd=CMD_PRIVATE, dstid=8, media=1, content="x", cid=cid)
    sess.accept(msg, 0)
    sess.submitted()
    return msg


def test_copies_between_the_close_and_the_last_ack_still_go_out() -> None:
    sess = _live()
    _submit(sess, "a")
    sess.close(4008, "rate limited")
    assert sess.state is CLOSING and sess.close_frame is None  # the ack is due first
    copy = Message(id=5, userid=9, cmd=CMD_GROUP, dstid=1, media=1, content="hi", ts=1)
    assert sess.deliver(copy, framed(copy, False)) == DELIVERED
    sess.on_acked(6, 2, "a", True)
    assert [(f["cmd"], f["id"]) for f in _frames(sess)] == [(11, 5), (1, 6)]
    assert sess.close_frame == (4008, "rate limited")
    # once the close frame is due, nothing more is delivered
    later = Message(id=7, userid=9, cmd=CMD_GROUP, dstid=1, media=1, content="yo", ts=3)
    assert sess.deliver(later, framed(later, False)) == IGNORED


def test_a_close_without_answers_due_delivers_nothing_more() -> None:
    sess = _live()
    sess.close(4008, "rate limited")
    copy = Message(id=5, userid=9, cmd=CMD_GROUP, dstid=1, media=1, content="hi", ts=1)
    assert sess.deliver(copy, framed(copy, False)) == IGNORED
    assert sess.close_frame == (4008, "rate limited")


def test_a_revocation_stops_delivery_at_once_even_with_answers_due() -> None:
    sess = _live()
    _submit(sess, "a")
    sess.close(4501, "token revoked")
    copy = Message(id=5, userid=9, cmd=CMD_GROUP, dstid=1, media=1, content="hi", ts=1)
    assert sess.deliver(copy, framed(copy, False)) == IGNORED


def test_a_close_during_a_replay_sends_no_id_above_what_the_replay_sent() -> None:
    """Closed (4009, 1001, ...) in the middle of a replay: acks held for after
    it would carry ids above the unreplayed part, and a resume from them would
    skip it. They are not sent: each is answered 503 (send again), the
    client's retry (same cid) is acked again, and its message comes back in
    the replay of the next connection."""
    sess = Session(7, Limits(rate_per_s=0.0), resume=0)
    _, replay = sess.on_here(frozenset({1}), 10)
    assert replay and sess.replay_window() == (0, 11)
    page = [Message(id=i, userid=9, cmd=CMD_PRIVATE, dstid=7, media=1, content="p", ts=1)
            for i in (1, 2)]
    assert sess.on_page(page, 2)  # more to read: 3..10 are not sent yet
    _submit(sess, "a")
    assert sess.on_acked(11, 2, "a", True)  # held for after the replay
    sess.close(4009, "slow consumer")
    frames = _frames(sess)
    ids = [f["id"] for f in frames if "id" in f]
    assert ids == [1, 2], ids
    # the message still gets its one answer: "send again" (503), no id
    assert [(f["cmd"], f["amount"], f["cid"]) for f in frames if "id" not in f] == [
        (5, 503, "a")]
    assert sess.close_frame == (4009, "slow consumer")
