"""One connection's protocol state (``protocol.Session``): pure, no I/O.

The tests drive a Session as the shard's glue does (``chatd.shard``) and read
what collects in ``out`` as the client would: websocket frames made by
``wire.ws_frame``, decoded.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from chatd.protocol import CLOSING, DELIVERED, IGNORED, LIVE, SYNCING, Limits, Session, Verdict
from chatd.wire import (
    CLOSE_SLOW_CONSUMER,
    CMD_ACK,
    CMD_ERROR,
    CMD_PRIVATE,
    CMD_SYNC,
    ERR_BUSY,
    OP_BINARY,
    OP_TEXT,
    Message,
    framed,
)

UID = 1
OTHER = 2


def frames_of(data: bytes | None) -> list[dict[str, Any]]:
    """Split what a Session wrote into its websocket frames (``wire.ws_frame``:
    final, unmasked, a 2, 4 or 10-byte header) and decode each payload."""
    frames: list[dict[str, Any]] = []
    i = 0
    data = data or b""
    while i < len(data):
        b0, b1 = data[i], data[i + 1]
        assert b0 & 0x80, "every frame is final"
        assert not b1 & 0x80, "server frames are not masked"
        opcode = b0 & 0x0F
        n = b1 & 0x7F
        i += 2
        if n == 126:
            n = int.from_bytes(data[i : i + 2], "big")
            i += 2
        elif n == 127:
            n = int.from_bytes(data[i : i + 8], "big")
            i += 8
        payload = data[i : i + n]
        assert len(payload) == n, "a frame cut short"
        i += n
        if opcode == OP_TEXT:
            frames.append(json.loads(payload))
        else:
            assert opcode == OP_BINARY
            frames.append(msgspec.msgpack.decode(payload))
    return frames


def out(sess: Session) -> list[dict[str, Any]]:
    """What the glue writes now (``Shard.flush``), decoded."""
    return frames_of(sess.take_out())


def pm(id: int, src: int = OTHER, dst: int = UID, cid: str = "") -> Message:
    """A stored private message."""
    return Message(id=id, userid=src, cmd=CMD_PRIVATE, dstid=dst, media=1, content=f"m{id}",
                   cid=cid, ts=id)


# --- bugs found by the state machine below, kept as examples ---------------------------


def test_a_log_restart_during_a_page_read_does_not_end_the_replay_early() -> None:
    """The shard's replay task reads a page for the window it got, and the log's
    restart may raise the bound while that read is awaited: a short page then
    says nothing about the ids above the window it was read for."""
    sess = Session(UID, Limits(), resume=0)
    sess.on_here(frozenset(), 1)  # replay (0, 1]
    assert sess.replay_window() == (0, 2)  # the page is being read...
    sess.on_here(frozenset(), 2)  # ...when the log, restarted, places the user at 2
    assert sess.on_page([pm(1)], 100) is True, "the replay must read on to 2"
    assert [f["id"] for f in out(sess)] == [1]
    assert sess.replay_window() == (1, 3)
    assert sess.on_page([pm(2)], 100) is False
    assert out(sess) == [{"id": 2, "userid": OTHER, "cmd": 10, "dstid": UID, "media": 1,
                          "content": "m2", "ts": 2}, {"cmd": CMD_SYNC, "id": 2}]
    assert sess.state is LIVE


def replay(sess: Session, stored: list[Message], page_size: int = 1) -> None:
    """The shard's replay task (``Shard._replay``) against the messages
    ``stored`` for the user (in id order), until the replay ends."""
    while sess.state is SYNCING:
        after, before = sess.replay_window()
        page = [msgspec.structs.replace(m) for m in stored if after < m.id < before]
        if not sess.on_page(page[:page_size], page_size):
            break


def ids(frames: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(cmd, id) of every frame that carries an id."""
    return [(f["cmd"], f["id"]) for f in frames if "id" in f]


def submit(sess: Session, cid: str, dst: int = OTHER) -> Message:
    """The client sends a private message; the glue hands it to the log."""
    msg = Message(cmd=CMD_PRIVATE, dstid=dst, media=1, content="hi", cid=cid)
    assert sess.accept(msg, 0) is Verdict.SUBMIT
    sess.submitted()
    return msg


def test_a_close_during_a_replay_acks_nothing_above_what_the_client_has() -> None:
    """The client resumed from 0; the store has 1 and 2 for it. The connection
    closes after the first page: an ack of id 3 (held, or arriving while it
    closes) would make 3 the client's resume point, and 2 would never come.
    Those messages are answered "send again" instead (their retries are acked
    with the same ids)."""
    sess = Session(UID, Limits(), resume=0)
    sess.on_here(frozenset(), 2)
    assert sess.on_page([pm(1)], 1) is True and sess.state is SYNCING
    submit(sess, "held")
    submit(sess, "late")
    assert sess.on_acked(3, 3, "held", True)  # held for after the replay
    assert [f["id"] for f in out(sess)] == [1]
    sess.close(1001, "going away")
    sess.on_acked(4, 4, "late", True)
    frames = out(sess)
    assert all(f["cmd"] != CMD_ACK for f in frames), frames
    assert [(f["cmd"], f["amount"], f["cid"]) for f in frames] == [
        (CMD_ERROR, ERR_BUSY, "held"), (CMD_ERROR, ERR_BUSY, "late")]
    assert sess.state is CLOSING and sess.close_frame == (1001, "going away")


def test_an_ack_that_the_held_copies_leave_no_room_for_is_still_answered() -> None:
    """A replay holds ``held_max`` live copies; the ack of the client's message
    does not fit: the glue closes the slow consumer (4009), and the message
    still gets its one answer before the close frame ("send again": its ack
    cannot go before the replay)."""
    sess = Session(UID, Limits(held_max=1), resume=0)
    sess.on_here(frozenset(), 5)
    live = pm(6)
    assert sess.deliver(live, framed(live, False)) == DELIVERED  # held: full now
    submit(sess, "c1")
    assert sess.on_acked(7, 7, "c1", True) is False  # the glue closes it
    sess.close(CLOSE_SLOW_CONSUMER, "slow consumer")
    assert [(f["cmd"], f["amount"], f["cid"]) for f in out(sess)] == [(CMD_ERROR, ERR_BUSY, "c1")]
    assert sess.close_frame == (CLOSE_SLOW_CONSUMER, "slow consumer")


def test_a_failed_replay_still_answers_the_acks_it_held() -> None:
    """The store cannot give a page: the session closes (1011); the message
    whose ack it held for after the replay still gets its one answer."""
    sess = Session(UID, Limits(), resume=0)
    sess.on_here(frozenset(), 5)
    submit(sess, "c1")
    assert sess.on_acked(6, 6, "c1", True)
    sess.replay_failed()
    assert [(f["cmd"], f["amount"], f["cid"]) for f in out(sess)] == [(CMD_ERROR, ERR_BUSY, "c1")]
    assert sess.close_frame == (1011, "sync failed, reconnect")


def test_a_re_ack_above_what_the_client_has_waits_for_the_replay() -> None:
    """The client's message was stored as 3 but its ack was lost with the last
    connection; it resumes from 0 and sends the message again. The re-ack
    (the original id 3) must not overtake the replay of 1 and 2: the client's
    highest id would be 3 before it has them (invariants 3 and 4)."""
    own = pm(3, src=UID, dst=OTHER, cid="c1")
    stored = [pm(1), pm(2), own]
    sess = Session(UID, Limits(), resume=0)
    retry = Message(cmd=CMD_PRIVATE, dstid=OTHER, media=1, content="hi", cid="c1")
    assert sess.accept(retry, 0) is Verdict.WAIT
    waiting, replaying = sess.on_here(frozenset(), 3)
    assert waiting == [retry] and replaying
    assert sess.accept(retry, 3) is Verdict.SUBMIT
    sess.submitted()
    assert sess.on_acked(3, 3, "c1", False)  # a duplicate: the original's id
    replay(sess, stored)
    got = ids(out(sess))
    assert got[:2] == [(CMD_PRIVATE, 1), (CMD_PRIVATE, 2)], got
    assert (CMD_ACK, 3) in got and got[-1] == (CMD_SYNC, 3)
    assert [i for _, i in got] == sorted(i for _, i in got), got


def test_a_raised_bound_sends_a_held_ack_in_its_place_among_the_pages() -> None:
    """The client's message is stored as 3 during a replay to 2, its ack held;
    then the log restarts and places the user at 4 (4 was lost with the link).
    The replay now passes 3: the ack goes out in its place, before 4, and the
    client's own message comes as its ack, not as a copy ahead of it."""
    own = pm(3, src=UID, dst=OTHER, cid="c1")
    stored = [pm(1), pm(2), own, pm(4)]
    sess = Session(UID, Limits(), resume=0)
    sess.on_here(frozenset(), 2)
    submit(sess, "c1")
    assert sess.on_acked(3, 3, "c1", True)
    sess.on_here(frozenset(), 4)  # the log's restart
    replay(sess, stored)
    assert ids(out(sess)) == [(CMD_PRIVATE, 1), (CMD_PRIVATE, 2), (CMD_ACK, 3),
                              (CMD_PRIVATE, 4), (CMD_SYNC, 4)]


def test_a_close_on_a_live_session_acks_nothing_above_a_copy_it_did_not_send() -> None:
    """A closing connection gets no more live copies, but its messages' answers
    still go out: an ack of 2 after the copy of 1 was left out would make 2 the
    client's resume point, past 1. That ack becomes "send again" instead; one
    below every copy left out is still an ack."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset(), 0)
    submit(sess, "c1")
    submit(sess, "c2")
    sess.close(1001, "going away")
    sess.on_acked(1, 1, "c1", True)  # nothing was left out below it
    assert sess.deliver(pm(2), framed(pm(2), False)) == IGNORED
    sess.on_acked(3, 3, "c2", True)
    assert [(f["cmd"], f.get("id"), f["cid"]) for f in out(sess)] == [
        (CMD_ACK, 1, "c1"), (CMD_ERROR, None, "c2")]
    assert sess.close_frame == (1001, "going away")
