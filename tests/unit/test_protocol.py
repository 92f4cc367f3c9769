"""One connection's protocol state (``protocol.Session``): pure, no I/O.

The tests drive a Session as the shard's glue does (``chatd.shard``) and read
what collects in ``out`` as the client would: websocket frames made by
``wire.ws_frame``, decoded. First an example for each rule of the module's
docstring, then the bugs the state machine found (kept as examples), then
the state machine itself (``SessionMachine``): every input a Session has, in
any order, against a model of the store, with the invariants that belong to
one connection (docs/design.md §5, 3 and 4) checked after every step.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chatd.errors import FrameError
from chatd.protocol import (
    CLOSED,
    CLOSING,
    DELIVERED,
    IGNORED,
    LIVE,
    LOADING,
    OVERFLOW,
    SYNCING,
    Limits,
    Session,
    Verdict,
)
from chatd.wire import (
    CLOSE_SLOW_CONSUMER,
    CMD_ACK,
    CMD_ERROR,
    CMD_GROUP,
    CMD_GROUP_ENTER,
    CMD_GROUP_LEAVE,
    CMD_HEARTBEAT,
    CMD_PRIVATE,
    CMD_SYNC,
    ERR_BUSY,
    ERR_CONFLICT,
    ERR_FORBIDDEN,
    ERR_NOT_FOUND,
    ERR_SERVER,
    ERR_TOO_LARGE,
    OP_BINARY,
    OP_TEXT,
    Message,
    encode_json,
    framed,
)

UID = 1  # the connection's user
OTHER = 2  # another user
THIRD = 3  # yet another (messages between OTHER and THIRD concern nobody here)
NO_USER = 99  # does not exist: a private message to it is refused with 404
GROUPS = (1, 2, 3)


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


def as_dict(msg: Message) -> dict[str, Any]:
    """``msg`` as a client decodes it."""
    return dict(json.loads(encode_json(msg)))


def copy(msg: Message) -> Message:
    return msgspec.structs.replace(msg)


def replay(sess: Session, stored: list[Message], page_size: int = 1) -> None:
    """The shard's replay task (``Shard._replay``) against the messages
    ``stored`` for the user (in id order), until the replay ends."""
    while sess.state is SYNCING:
        after, before = sess.replay_window()
        page = [copy(m) for m in stored if after < m.id < before]
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


# --- the rules of the module docstring, one example each ---------------------------


def test_a_new_session_waits_for_its_place_then_goes_live_at_the_bound() -> None:
    """LOADING --Here--> LIVE: frames that came first wait (and are handed back
    in order); nothing is delivered before the place is known; after it, live
    copies go out at once, and a later cmd 4 replays only up to the bound."""
    sess = Session(UID, Limits())
    assert sess.state is LOADING
    first = Message(cmd=CMD_PRIVATE, dstid=OTHER, media=1, content="a", cid="c1")
    beat = Message(cmd=CMD_HEARTBEAT, cid="c2")
    assert sess.accept(first, 0) is Verdict.WAIT
    assert sess.accept(beat, 0) is Verdict.WAIT
    early = pm(4)
    assert sess.deliver(early, framed(early, False)) == IGNORED
    waiting, replaying = sess.on_here(frozenset({7}), 5)
    assert waiting == [first, beat] and not replaying
    assert sess.state is LIVE and sess.groups == {7} and sess.live_from == 5
    assert out(sess) == []
    live = pm(6)
    assert sess.deliver(live, framed(live, False)) == DELIVERED
    assert ids(out(sess)) == [(CMD_PRIVATE, 6)]
    assert sess.accept(Message(cmd=CMD_SYNC, id=0), 9) is Verdict.REPLAY
    assert sess.replay_window() == (0, 6)  # above 5 everything went out live


def test_a_resuming_session_replays_then_sends_what_it_held_above_the_bound() -> None:
    """LOADING --Here+last--> SYNCING --last page + held--> LIVE: the replay
    reads (last, bound] in pages; live copies and acks that come meanwhile are
    held, those the replay covered are dropped, the rest follow in id order,
    then cmd 4 with the high-water id."""
    stored = [pm(3), pm(4), pm(5)]
    sess = Session(UID, Limits(), resume=2)
    waiting, replaying = sess.on_here(frozenset(), 5)
    assert waiting == [] and replaying and sess.state is SYNCING
    assert sess.replay_window() == (2, 6)
    for live in (pm(5), pm(6)):  # 5 was committed before the bound, 6 after
        assert sess.deliver(live, framed(live, False)) == DELIVERED
    submit(sess, "c1")
    assert sess.on_acked(7, 7, "c1", True)
    assert out(sess) == [], "held while the replay runs"
    replay(sess, stored, page_size=2)
    assert ids(out(sess)) == [(CMD_PRIVATE, 3), (CMD_PRIVATE, 4), (CMD_PRIVATE, 5),
                              (CMD_PRIVATE, 6), (CMD_ACK, 7), (CMD_SYNC, 7)]
    assert sess.state is LIVE and sess.top == 7


def test_a_session_that_resumes_ahead_of_this_nodes_stream_gets_nothing_twice() -> None:
    """A client that comes from another node of a cluster may have ids this
    node has not released yet (the node it left was killed before its last
    batches reached the bus; this node reads them from the store a moment
    later): ``last`` 8 against a bound of 5. The replay has nothing to read,
    and the stream's copies up to 8, held or live, are not sent again (a
    cluster's kill -9 test found 25 such duplicates)."""
    sess = Session(UID, Limits(), resume=8)
    waiting, replaying = sess.on_here(frozenset(), 5)
    assert replaying and sess.state is SYNCING
    early = pm(6)  # released while the (empty) replay runs
    assert sess.deliver(early, framed(early, False)) == IGNORED
    replay(sess, [pm(3), pm(4), pm(5)])
    assert ids(out(sess)) == [(CMD_SYNC, 8)], "the client has everything up to 8"
    assert sess.state is LIVE
    for mid in (7, 8, 9):
        late = pm(mid)
        assert sess.deliver(late, framed(late, False)) == (IGNORED if mid <= 8 else DELIVERED)
    assert ids(out(sess)) == [(CMD_PRIVATE, 9)]


def test_a_cmd_4_on_a_live_session_replays_what_it_asks_for_up_to_live_from() -> None:
    """LIVE --cmd 4--> SYNCING --> LIVE: the client asked explicitly, so ids it
    has may come again, but only in (id, live_from]; with nothing to read
    (id at or above the bound) it is answered at once with max(id, top)."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset(), 3)
    for live in (pm(4), pm(5)):
        sess.deliver(live, framed(live, False))
    out(sess)
    assert sess.accept(Message(cmd=CMD_SYNC, id=1, cid="s1"), 5) is Verdict.REPLAY
    assert sess.replay_window() == (1, 4)
    assert sess.accept(Message(cmd=CMD_SYNC, id=1, cid="s2"), 5) is Verdict.DONE
    assert [(f["cmd"], f["amount"], f["cid"]) for f in out(sess)] == [
        (CMD_ERROR, ERR_CONFLICT, "s2")]  # one sync at a time
    replay(sess, [pm(2), pm(3), pm(4), pm(5)], page_size=10)
    assert ids(out(sess)) == [(CMD_PRIVATE, 2), (CMD_PRIVATE, 3), (CMD_SYNC, 5)]
    assert sess.accept(Message(cmd=CMD_SYNC, id=5), 5) is Verdict.DONE
    assert out(sess) == [{"cmd": CMD_SYNC, "id": 5}]
    assert sess.accept(Message(cmd=CMD_SYNC, id=3), 5) is Verdict.DONE  # 3 >= live_from
    assert out(sess) == [{"cmd": CMD_SYNC, "id": 5}]


def test_leaving_a_group_stream_makes_a_later_cmd_4_read_up_to_the_high_water() -> None:
    """cmd 3 gives up ``live_from``: group messages skip the connection now, so
    a later sync cannot assume that everything above it went out live."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset({7}), 3)
    assert sess.accept(Message(cmd=CMD_GROUP_LEAVE, dstid=7), 3) is Verdict.LEAVE
    assert sess.accept(Message(cmd=CMD_GROUP_ENTER, dstid=7), 3) is Verdict.ENTER
    assert sess.accept(Message(cmd=CMD_SYNC, id=0), 9) is Verdict.REPLAY
    assert sess.replay_window() == (0, 10)


def test_a_log_restart_replays_what_the_stream_may_have_lost_without_a_cmd_4() -> None:
    """LIVE --log restart--> SYNCING: the new ``Here`` has a higher bound; the
    session replays from the highest id it sent, and goes live again without
    an answer nobody asked for. With nothing above what it has: no replay."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset(), 2)
    live = pm(3)
    sess.deliver(live, framed(live, False))
    out(sess)
    assert sess.on_here(frozenset(), 3) == ([], False)
    waiting, replaying = sess.on_here(frozenset({7}), 6)
    assert waiting == [] and replaying and sess.groups == {7}
    assert sess.replay_window() == (3, 7)
    replay(sess, [pm(5)], page_size=5)
    assert ids(out(sess)) == [(CMD_PRIVATE, 5)]
    assert sess.state is LIVE and sess.live_from == 6


def test_a_session_accepts_only_what_its_user_may_do() -> None:
    """The sender is the connection's user whatever the frame says; a group
    message or stream needs membership (as the log last told it)."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset({7}), 0)
    msg = Message(id=5, userid=OTHER, cmd=CMD_GROUP, dstid=7, media=1, content="x", ts=9)
    assert sess.accept(msg, 0) is Verdict.SUBMIT
    assert (msg.userid, msg.id, msg.ts) == (UID, 0, 0)
    assert sess.accept(Message(cmd=CMD_GROUP, dstid=8, media=1, content="x", cid="g8"),
                       0) is Verdict.DONE
    assert sess.accept(Message(cmd=CMD_GROUP_ENTER, dstid=8, cid="e8"), 0) is Verdict.DONE
    assert [(f["amount"], f["cid"]) for f in out(sess)] == [(ERR_FORBIDDEN, "g8"),
                                                           (ERR_FORBIDDEN, "e8")]
    sess.joined(8)
    assert sess.accept(Message(cmd=CMD_GROUP_ENTER, dstid=8), 0) is Verdict.ENTER
    sess.left(7)
    assert sess.accept(Message(cmd=CMD_GROUP, dstid=7, media=1, content="x"), 0) is Verdict.DONE
    assert sess.accept(Message(cmd=CMD_HEARTBEAT), 0) is Verdict.DONE
    assert [f["amount"] for f in out(sess)] == [ERR_FORBIDDEN]


def test_waiting_frames_have_a_bound() -> None:
    sess = Session(UID, Limits(waiting_max=2))
    assert sess.waiting is None  # made by the first frame that waits (idle: nothing)
    for i in range(2):
        assert sess.accept(Message(cmd=CMD_HEARTBEAT, cid=f"w{i}"), 0) is Verdict.WAIT
    assert sess.accept(Message(cmd=CMD_HEARTBEAT, cid="w2"), 0) is Verdict.DONE
    assert [(f["amount"], f["cid"]) for f in out(sess)] == [(ERR_BUSY, "w2")]
    assert len(sess.waiting or ()) == 2


def test_held_copies_have_a_bound() -> None:
    sess = Session(UID, Limits(held_max=2), resume=0)
    sess.on_here(frozenset(), 9)
    for i in (10, 11):
        assert sess.deliver(pm(i), framed(pm(i), False)) == DELIVERED
    assert sess.deliver(pm(12), framed(pm(12), False)) == OVERFLOW
    assert len(sess.held or ()) == 2


def test_a_close_lets_the_answers_out_then_the_close_frame() -> None:
    """any --close()--> CLOSING: nothing more is read; the answers to messages
    handed to the log still go out, with the live copies among them (a client
    that may come back resumes from the highest id it got), then the close
    frame, and then nothing more is delivered."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset(), 0)
    submit(sess, "c1")
    submit(sess, "c2")
    sess.close(1001, "going away")
    assert sess.state is CLOSING and sess.close_frame is None and sess.writable
    assert sess.accept(Message(cmd=CMD_HEARTBEAT), 0) is Verdict.DONE
    sess.on_acked(2, 2, "c1", True)
    assert sess.deliver(pm(3), framed(pm(3), False)) == DELIVERED
    assert sess.close_frame is None
    sess.on_refused(ERR_SERVER, "not stored", "c2")
    assert sess.close_frame == (1001, "going away") and not sess.writable
    assert [(f["cmd"], f.get("cid")) for f in out(sess)] == [
        (CMD_ACK, "c1"), (CMD_PRIVATE, None), (CMD_ERROR, "c2")]
    assert sess.deliver(pm(4), framed(pm(4), False)) == IGNORED
    sess.close(1000, "")  # a second close changes nothing
    assert sess.close_frame == (1001, "going away")


def test_a_close_with_nothing_in_flight_is_due_at_once_and_disconnected_ends_it() -> None:
    """any --disconnected()--> CLOSED: nothing is kept, nothing is written."""
    sess = Session(UID, Limits())
    sess.close(4000, "idle")
    assert sess.close_frame == (4000, "idle")
    submitted = Session(UID, Limits())
    submitted.on_here(frozenset(), 0)
    submit(submitted, "c1")
    submitted.disconnected()
    assert submitted.state is CLOSED and submitted.close_pending is None
    submitted.on_acked(1, 1, "c1", True)
    assert submitted.take_out() is None and not submitted.writable
    assert submitted.on_page([pm(1)], 1) is False


def test_the_connection_is_answered_in_the_encoding_it_last_used() -> None:
    sess = Session(UID, Limits())
    sess.on_here(frozenset(), 0)
    sess.binary = True
    sess.accept(Message(cmd=CMD_SYNC, id=0), 0)
    data = sess.take_out()
    assert data is not None and data[0] == 0x80 | OP_BINARY
    assert msgspec.msgpack.decode(data[2:]) == {"cmd": CMD_SYNC}
    sess.binary = False
    sess.accept(Message(cmd=CMD_SYNC, id=0), 0)
    sess.accept(Message(cmd=CMD_SYNC, id=0), 0)
    assert out(sess) == [{"cmd": CMD_SYNC}, {"cmd": CMD_SYNC}]  # one buffer, two frames


def test_fragments_are_reassembled_within_the_size_limit() -> None:
    sess = Session(UID, Limits(max_frame_bytes=10))
    assert sess.fragment(b"abc", False, True, True) is None
    assert sess.fragment(b"de", False, False, True) is None
    assert sess.frag_binary
    assert sess.fragment(b"f", True, False, True) == b"abcdef"
    with pytest.raises(ValueError):
        sess.fragment(b"x", True, False, False)  # nothing to continue
    sess.fragment(b"abc", False, True, False)
    with pytest.raises(ValueError):
        sess.fragment(b"abc", False, True, False)  # a new message inside one
    big = Session(UID, Limits(max_frame_bytes=4))
    big.fragment(b"abc", False, True, False)
    with pytest.raises(FrameError) as info:
        big.fragment(b"de", True, False, False)
    assert info.value.code == ERR_TOO_LARGE and big.frag is None


def test_flood_control_is_a_token_bucket() -> None:
    sess = Session(UID, Limits(rate_per_s=10.0, rate_burst=3), now=100.0)
    assert [sess.allow(100.0) for _ in range(4)] == [True, True, True, False]
    assert [sess.allow(100.25) for _ in range(3)] == [True, True, False]  # 2.5 tokens back
    assert [sess.allow(1000.0) for _ in range(4)] == [True, True, True, False]  # burst caps it
    free = Session(UID, Limits(rate_per_s=0.0, rate_burst=1))
    assert all(free.allow(0.0) for _ in range(10))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=6), st.booleans(), st.booleans(), st.booleans()),
                max_size=12))
def test_fragments_never_fail_but_as_documented(
        parts: list[tuple[bytes, bool, bool, bool]]) -> None:
    sess = Session(UID, Limits(max_frame_bytes=16))
    for payload, fin, first, binary in parts:
        try:
            whole = sess.fragment(payload, fin, first, binary)
        except FrameError as exc:
            assert exc.code == ERR_TOO_LARGE
        except ValueError:
            pass
        else:
            assert whole is None or len(whole) <= 16


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
    """A connection closed for a revocation gets no more live copies, but its
    messages' answers still go out: an ack of 3 after the copy of 2 was left
    out would make 3 the client's resume point, past 2. That ack becomes "send
    again" instead; one below every copy left out is still an ack."""
    sess = Session(UID, Limits())
    sess.on_here(frozenset(), 0)
    submit(sess, "c1")
    submit(sess, "c2")
    sess.close(4501, "token revoked")
    sess.on_acked(1, 1, "c1", True)  # nothing was left out below it
    assert sess.deliver(pm(2), framed(pm(2), False)) == IGNORED
    sess.on_acked(3, 3, "c2", True)
    assert [(f["cmd"], f.get("id"), f["cid"]) for f in out(sess)] == [
        (CMD_ACK, 1, "c1"), (CMD_ERROR, None, "c2")]
    assert sess.close_frame == (4501, "token revoked")


# --- the state machine ----------------------------------------------------------

@dataclass
class Explicit:
    """A replay the client asked for with cmd 4 on a live connection: it may
    repeat what the client has, but only ids in (after, bound], ascending."""

    after: int
    bound: int
    last: int
    got: set[int] = field(default_factory=set)


class SessionMachine(RuleBasedStateMachine):
    """One connection of user ``UID``, driven with every input a Session has.

    The rules are client frames (cmd 0/2/3/4/10/11, to groups it is and is not
    a member of, fresh cids and retries), the log's placement (``on_here``)
    and its restarts (the link lost, batches lost with it, then ``on_here``
    again with a higher bound), live copies (``deliver``) in id order, the
    log's answers (``on_acked`` / ``on_refused``), replay pages read from the
    model store (``replay_window``, then ``on_page`` as a second step: the
    shard's replay task awaits the store in between), routing changes
    (``joined`` / ``left``), ``close`` and ``disconnected``. They play the
    shard's part as ``chatd.shard`` does (``Shard.connected/_place/handle/
    on_batch/_replay/flush``).

    The checks play the client's: ``observe`` decodes every frame written and
    holds the connection to id order, no duplicates (but in a replay the
    client asked for with cmd 4), one answer per message and the cmd 4 rules;
    ``check_resume_point`` holds it to "the highest id the client holds is a
    safe resume point"; ``collect`` to the close frame's place; ``bounded``
    to the bounds.

    The model store holds every message committed on the node, by id;
    ``visible()`` is what ``SqliteStore.sync_page`` returns for the user:
    private messages to or from it, messages of its groups sent after it
    joined.
    """

    # --- the connection --------------------------------------------------------------

    @initialize(data=st.data())
    def connect(self, data: st.DataObject) -> None:
        draw = data.draw
        self.limits = Limits(
            held_max=draw(st.integers(1, 8), label="held_max"),
            waiting_max=draw(st.integers(1, 3), label="waiting_max"),
            rate_per_s=0.0,
        )
        self.page_size = draw(st.integers(1, 3), label="page_size")
        # the node's store: every message committed, by id
        self.msgs: dict[int, Message] = {}
        self.next_id = 0
        #: the user's groups in the store: gid -> joined_id
        self.member: dict[int, int] = {}
        #: own messages stored: cid -> id (a retry of one is a duplicate)
        self.stored_cids: dict[str, int] = {}
        #: cids the client may send again (answered with 503, or from an
        #: earlier connection whose ack was lost)
        self.retryable: list[str] = []
        for k in range(draw(st.integers(0, 6), label="stored before")):
            kind = draw(st.sampled_from(["in", "own", "group", "other"]))
            if kind == "own":
                cid = f"old{k}"
                msg = Message(userid=UID, cmd=CMD_PRIVATE, dstid=OTHER, media=1,
                              content=f"old {k}", cid=cid)
                self.store(msg)
                self.stored_cids[cid] = msg.id
                self.retryable.append(cid)
            else:
                self.store(self.message(kind, draw(st.sampled_from(GROUPS))))
        for gid in GROUPS:
            if draw(st.booleans()):
                self.member[gid] = draw(st.integers(0, self.next_id))
        resume = draw(st.one_of(st.just(-1), st.integers(0, self.next_id)), label="last=")
        self.resume = resume
        self.sess = Session(UID, self.limits, resume=resume)

        # the glue's view
        self.hw = self.next_id  # the shard's high-water
        self.placed = False  # the log routes the user here
        self.lost = False  # the link to the log is down (batches lost with it)
        self.stream: set[int] = set()  # the registry's group index for this connection
        self.sess_groups: frozenset[int] = frozenset()  # what the Session was told
        self.pending: list[Message] = []  # submitted, not answered by the log
        self.page: list[Message] | None = None  # read from the store, not handed over yet
        self.disc = False
        #: closed from LIVE with a code the client may come back after: the
        #: copies among the answers still due go out
        self.closing_live = False

        # the client's view
        self.base: int | None = resume if resume >= 0 else None
        self.highest = max(resume, 0)
        self.delivered: set[int] = set()  # ids the client holds: copies and acks
        self.copies: set[int] = set()  # ids received as message copies
        self.exempt: set[int] = set()  # group messages the connection left the stream of
        self.explicit: Explicit | None = None
        self.required: Counter[str] = Counter()  # cid -> answers owed
        self.answers: Counter[str] = Counter()
        self.expect: dict[str, tuple[str, int]] = {}  # cid -> ("ack"|"dup"|"err", id or code)
        self.syncs_asked = 0
        self.syncs_answered = 0
        self.close_sent = False
        self.cids = 0
        if draw(st.integers(0, 3), label="placed at once"):
            # the log's Here usually comes before the client says anything
            # (the ``here`` rule covers the others)
            self.place(self.next_id)
            self.collect()

    # --- the model store ---------------------------------------------------------------

    def store(self, msg: Message) -> Message:
        self.next_id += 1
        msg.id = msg.ts = self.next_id
        self.msgs[msg.id] = msg
        return msg

    def message(self, kind: str, gid: int) -> Message:
        if kind == "in":
            return Message(userid=OTHER, cmd=CMD_PRIVATE, dstid=UID, media=1, content="in")
        if kind == "device":  # the user's other device wrote to someone
            return Message(userid=UID, cmd=CMD_PRIVATE, dstid=OTHER, media=1, content="dev")
        if kind == "group":
            return Message(userid=OTHER, cmd=CMD_GROUP, dstid=gid, media=1, content="grp")
        return Message(userid=OTHER, cmd=CMD_PRIVATE, dstid=THIRD, media=1, content="x")

    def is_visible(self, msg: Message) -> bool:
        """Whether ``sync_page`` returns ``msg`` for the user (now)."""
        if msg.cmd == CMD_PRIVATE:
            return msg.dstid == UID or msg.userid == UID
        joined = self.member.get(msg.dstid)
        return joined is not None and msg.id > joined

    def visible(self) -> set[int]:
        return {i for i, m in self.msgs.items() if self.is_visible(m)}

    # --- the glue ------------------------------------------------------------------------

    def place(self, bound: int) -> None:
        """What ``Shard._place`` does with a ``Here``."""
        sess = self.sess
        before = sess.state
        old = sess.groups
        groups = frozenset(self.member)
        waiting, replay = sess.on_here(groups, bound)
        assert sess.groups == groups
        self.sess_groups = groups
        for gid in old - groups:
            self.stream.discard(gid)
        for gid in groups - old:
            self.stream.add(gid)
        if not self.placed:
            self.placed = True
            if self.base is None:
                self.base = bound  # a connection without last= is owed what follows
        if before is LOADING and self.resume >= 0:
            assert replay and sess.state is SYNCING
            self.syncs_asked += 1
        if before is LOADING and self.resume < 0:
            assert not replay and sess.state is LIVE
        if replay:
            assert sess.state is SYNCING
        if self.explicit is not None and sess.state is SYNCING:
            self.explicit.bound = max(self.explicit.bound, sess.replay_bound)
        self.hw = max(self.hw, bound)
        for msg in waiting:
            self.handle(msg)

    def next_cid(self) -> str:
        self.cids += 1
        return f"c{self.cids}"

    def frame(self, msg: Message, binary: bool) -> None:
        """A valid client frame arrives (``Conn.on_ws_frame`` → ``Shard.handle``)."""
        if self.sess.state is CLOSING or self.sess.state is CLOSED:
            return  # the glue reads nothing from a closing connection
        self.sess.binary = binary
        self.handle(msg)

    def handle(self, msg: Message) -> None:
        """``Shard.handle``, and what the Session must have decided."""
        sess = self.sess
        state = sess.state
        waiting = len(sess.waiting or ())
        verdict = sess.accept(msg, self.hw)
        cmd, cid = msg.cmd, msg.cid
        if state is CLOSING or state is CLOSED:
            assert verdict is Verdict.DONE
            return
        if state is LOADING:
            if waiting < self.limits.waiting_max:
                assert verdict is Verdict.WAIT
            else:
                assert verdict is Verdict.DONE
                self.owe(cid, ("err", ERR_BUSY))
            return
        if cmd == CMD_PRIVATE or (cmd == CMD_GROUP and msg.dstid in self.sess_groups):
            assert verdict is Verdict.SUBMIT
            assert msg.userid == UID and msg.id == 0 and msg.ts == 0
            if self.lost:  # the link is down: the glue answers 503 itself
                sess.refuse(ERR_BUSY, "server busy, retry later", cid)
                self.owe(cid, ("err", ERR_BUSY))
                return
            sess.submitted()
            self.required[cid] += 1
            self.pending.append(msg)
        elif cmd == CMD_GROUP:
            assert verdict is Verdict.DONE
            self.owe(cid, ("err", ERR_FORBIDDEN))
        elif cmd == CMD_GROUP_ENTER:
            if msg.dstid in self.sess_groups:
                assert verdict is Verdict.ENTER
                self.stream.add(msg.dstid)
            else:
                assert verdict is Verdict.DONE
                self.owe(cid, ("err", ERR_FORBIDDEN))
        elif cmd == CMD_GROUP_LEAVE:
            assert verdict is Verdict.LEAVE
            self.stream.discard(msg.dstid)
        elif cmd == CMD_SYNC:
            if state is SYNCING:
                assert verdict is Verdict.DONE
                self.owe(cid, ("err", ERR_CONFLICT))
            else:
                assert verdict in (Verdict.DONE, Verdict.REPLAY)
                self.syncs_asked += 1
                if verdict is Verdict.REPLAY:
                    assert sess.state is SYNCING
                    assert sess.replay_bound <= self.hw, "a replay past what the shard has"
                    self.explicit = Explicit(msg.id, sess.replay_bound, msg.id)
        else:
            assert cmd == CMD_HEARTBEAT and verdict is Verdict.DONE

    def owe(self, cid: str, answer: tuple[str, int]) -> None:
        self.required[cid] += 1
        self.expect[cid] = answer

    def overflowed(self) -> None:
        """The glue closes a connection that cannot hold more (slow consumer)."""
        self.sess.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def commit(self, msg: Message, routed: bool = True) -> None:
        """The log committed ``msg`` (from someone else); the shard gets it live."""
        self.store(msg)
        concerned = self.is_visible(msg)
        if self.lost:
            return  # its batch was lost with the link
        if concerned or routed:
            self.hw = msg.id
        if not (concerned and self.placed) or self.disc:
            return
        if msg.cmd == CMD_GROUP and msg.dstid not in self.stream:
            self.exempt.add(msg.id)  # the connection left that group's live stream
            return
        sess = self.sess
        done = sess.deliver(copy(msg), framed(msg, sess.binary))
        state = sess.state
        if state is LIVE or state is SYNCING:
            assert done in (DELIVERED, OVERFLOW)
        elif state is CLOSING and self.closing_live and self.pending:
            assert done == DELIVERED
        else:
            assert done == IGNORED
        if done == OVERFLOW:
            assert state is SYNCING and len(sess.held or ()) == self.limits.held_max
            self.overflowed()

    # --- the client ------------------------------------------------------------------------

    def collect(self) -> None:
        """``Shard.flush``: write what collected, then the close frame if due."""
        sess = self.sess
        data = sess.take_out()
        if data is not None and not self.disc:
            assert not self.close_sent, "a frame after the close frame"
            for frame in frames_of(data):
                self.observe(frame)
        if sess.close_frame is not None:
            assert not self.pending, "close frame due before every message was answered"
            assert self.answers == self.required, "close frame before some answers"
            assert not self.close_sent
            self.close_sent = True
            sess.close_frame = None
        self.check_resume_point()

    def observe(self, frame: dict[str, Any]) -> None:
        cmd = frame.get("cmd", 0)
        if cmd == CMD_ACK:
            cid = frame["cid"]
            self.answer(cid)
            kind, want = self.expect[cid]
            assert kind in ("ack", "dup") and frame["id"] == want, (frame, self.expect[cid])
            i = want
            explicit = self.explicit
            if kind == "ack":
                # a new message: above everything the client has, and never
                # replayed to it ahead of its ack
                assert i > self.highest, f"ack {i} after id {self.highest}"
                assert i not in self.copies, f"ack {i} after its copy"
                if explicit is not None and i <= explicit.bound:
                    # a log restart raised the bound past it: in order with the pages
                    assert explicit.last < i
                    explicit.last = i
                    explicit.got.add(i)
            elif explicit is not None and explicit.after < i <= explicit.bound:
                # a re-ack in the window: it carries the client's own message
                # (in its place among the pages, or at once if the client has it)
                explicit.got.add(i)
            # (a re-ack at or below what the client has carries an older id:
            # it may go at once, out of the order)
            self.delivered.add(i)
            self.highest = max(self.highest, i)
        elif cmd in (CMD_PRIVATE, CMD_GROUP):
            i = frame["id"]
            assert frame == as_dict(self.msgs[i]), "not the stored message"
            explicit = self.explicit
            if explicit is not None and i <= explicit.bound:
                # a page of the replay the client asked for: it may repeat ids
                assert explicit.after < i and explicit.last < i, (i, explicit)
                explicit.last = i
                explicit.got.add(i)
            else:
                assert i > self.highest, f"copy {i} after id {self.highest}"
                assert i not in self.copies, f"copy {i} twice"
            self.copies.add(i)
            self.delivered.add(i)
            self.highest = max(self.highest, i)
        elif cmd == CMD_SYNC:
            self.syncs_answered += 1
            assert self.syncs_answered <= self.syncs_asked, "a cmd 4 nobody asked for"
            top = frame.get("id", 0)
            assert top >= self.highest, f"cmd 4 id {top} below id {self.highest} delivered"
            explicit = self.explicit
            if explicit is not None:
                window = {i for i in self.visible() if explicit.after < i <= explicit.bound}
                missing = window - explicit.got
                assert not missing, f"the replay asked for missed {sorted(missing)}"
                self.explicit = None
            self.highest = top
            self.check_resume_point()
        elif cmd == CMD_ERROR:
            cid = frame.get("cid", "")
            if cid:
                self.answer(cid)
                kind, want = self.expect[cid]
                if kind != "err":
                    # a stored message whose ack cannot go out on a connection
                    # that closes before its replay reached the ack's id: the
                    # client sends it again (same cid, same id)
                    assert frame["amount"] == ERR_BUSY and want > self.highest, frame
                    assert self.sess.state is not LIVE
                    if cid not in self.retryable:
                        self.retryable.append(cid)
                else:
                    assert want == frame["amount"], (frame, self.expect[cid])
        else:
            raise AssertionError(f"unexpected frame {frame}")

    def answer(self, cid: str) -> None:
        self.answers[cid] += 1
        assert self.answers[cid] <= self.required[cid], f"{cid} answered twice"

    def check_resume_point(self) -> None:
        """The highest id the client holds is a safe resume point: everything
        the store holds for it up to there was delivered (what a connection
        without ``last=`` was never promised, below its first bound, and group
        messages of a live stream it left with cmd 3, aside)."""
        if self.base is None:
            return
        owed = {i for i in self.visible() if self.base < i <= self.highest} - self.exempt
        missing = owed - self.delivered
        assert not missing, f"client at {self.highest} misses {sorted(missing)}"

    # --- rules: client frames -----------------------------------------------------------

    @rule(cmd=st.sampled_from([CMD_HEARTBEAT, CMD_GROUP_ENTER, CMD_GROUP_LEAVE]),
          gid=st.sampled_from(GROUPS), binary=st.booleans())
    def control(self, cmd: int, gid: int, binary: bool) -> None:
        """A heartbeat, or cmd 2 / 3 (enter / leave a group's live stream)."""
        dstid = 0 if cmd == CMD_HEARTBEAT else gid
        self.frame(Message(cmd=cmd, dstid=dstid, cid=self.next_cid()), binary)
        self.collect()

    @rule(where=st.sampled_from(["highest", "highest", "zero", "any"]), pick=st.integers(0),
          binary=st.booleans())
    def sync(self, where: str, pick: int, binary: bool) -> None:
        # a client asks from what it has, or from further back (never beyond)
        after = {"highest": self.highest, "zero": 0,
                 "any": pick % (self.highest + 1)}[where]
        self.frame(Message(cmd=CMD_SYNC, id=after, cid=self.next_cid()), binary)
        self.collect()

    @rule(to=st.sampled_from([(CMD_PRIVATE, OTHER), (CMD_PRIVATE, UID), (CMD_PRIVATE, NO_USER),
                              *((CMD_GROUP, gid) for gid in GROUPS)]),
          retry=st.booleans(), pick=st.integers(), binary=st.booleans())
    def send(self, to: tuple[int, int], retry: bool, pick: int, binary: bool) -> None:
        """cmd 10 or 11, with a new cid or one sent before."""
        cmd, dstid = to
        self.frame(Message(cmd=cmd, dstid=dstid, media=1, content="hi",
                           cid=self.cid_for(retry, pick)), binary)
        self.collect()

    def cid_for(self, retry: bool, pick: int) -> str:
        # a retry reuses a cid that is not waiting for an answer right now
        free = [c for c in self.retryable if self.answers[c] == self.required[c]]
        if retry and free:
            return free[pick % len(free)]
        return self.next_cid()

    # --- rules: the log ---------------------------------------------------------------------

    @precondition(lambda self: not self.placed and not self.lost)
    @rule()
    def here(self) -> None:
        self.place(self.next_id)
        self.collect()

    @rule(kind=st.sampled_from(["in", "device", "group", "other"]), gid=st.sampled_from(GROUPS),
          routed=st.booleans())
    def committed(self, kind: str, gid: int, routed: bool) -> None:
        self.commit(self.message(kind, gid), routed)
        self.collect()

    @precondition(lambda self: self.pending and not self.lost)
    @rule(outcome=st.sampled_from(["stored", "stored", "stored", "busy", "failed"]))
    def log_answers(self, outcome: str) -> None:
        msg = self.pending.pop(0)
        sess = self.sess
        cid = msg.cid
        ok = True
        if cid in self.stored_cids:
            prior = self.stored_cids[cid]
            self.expect[cid] = ("dup", prior)
            ok = sess.on_acked(prior, prior, cid, False)
        elif msg.cmd == CMD_PRIVATE and msg.dstid == NO_USER:
            self.expect[cid] = ("err", ERR_NOT_FOUND)
            sess.on_refused(ERR_NOT_FOUND, f"no user {NO_USER}", cid)
        elif outcome == "stored":
            self.store(msg)
            self.stored_cids[cid] = msg.id
            self.hw = msg.id
            self.expect[cid] = ("ack", msg.id)
            ok = sess.on_acked(msg.id, msg.ts, cid, True)
        else:
            code = ERR_BUSY if outcome == "busy" else ERR_SERVER
            self.expect[cid] = ("err", code)
            sess.on_refused(code, "not stored, retry", cid)
        if code_retryable(self.expect[cid]) and cid not in self.retryable:
            self.retryable.append(cid)
        if not ok:
            assert sess.state is SYNCING
            self.overflowed()
        self.collect()

    def link_lost(self, stored: list[bool]) -> None:
        """The link to the log broke (``Shard.on_lost``): what it did not answer
        is refused with 503, though the log may have stored some of it."""
        self.lost = True
        pending, self.pending = self.pending, []
        for k, msg in enumerate(pending):
            if (k < len(stored) and stored[k] and msg.cid not in self.stored_cids
                    and not (msg.cmd == CMD_PRIVATE and msg.dstid == NO_USER)):
                self.store(msg)
                self.stored_cids[msg.cid] = msg.id
            self.expect[msg.cid] = ("err", ERR_BUSY)
            if msg.cid not in self.retryable:
                self.retryable.append(msg.cid)
            self.sess.on_refused(ERR_BUSY, "server busy, retry", msg.cid)
        self.collect()

    @precondition(lambda self: self.lost)
    @rule()
    def log_back(self) -> None:
        """The log is back (``Shard.on_welcome``): its ``Here`` places the user again,
        with the bound where its stream starts."""
        self.lost = False
        self.hw = max(self.hw, self.next_id)
        self.place(self.next_id)
        self.collect()

    @precondition(lambda self: not self.lost)
    @rule(stored=st.lists(st.booleans(), max_size=3),
          kinds=st.lists(st.sampled_from(["in", "device", "group", "other"]), max_size=3),
          gid=st.sampled_from(GROUPS), back=st.booleans())
    def log_restarts(self, stored: list[bool], kinds: list[str], gid: int, back: bool) -> None:
        """The link to the log breaks (some of what was in flight stored all the
        same), messages are committed meanwhile and lost with it; the log is
        back at once (``log_back``), or later (the link stays down)."""
        self.link_lost(stored)
        for kind in kinds:
            self.commit(self.message(kind, gid))
        if back:
            self.log_back()

    @rule(gid=st.sampled_from(GROUPS))
    def membership(self, gid: int) -> None:
        """The user joins or leaves ``gid`` through the log (``Joined`` / ``Left``
        at their place in the order; lost with the link while it is down)."""
        told = self.placed and not self.lost and not self.disc
        if gid not in self.member:
            self.member[gid] = self.next_id  # joined_id: what the store had then
            if told:
                self.sess.joined(gid)
                self.sess_groups = self.sess_groups | {gid}
                self.stream.add(gid)
        else:
            del self.member[gid]
            if told:
                self.sess.left(gid)
                self.sess_groups = self.sess_groups - {gid}
                self.stream.discard(gid)
        self.collect()

    # --- rules: the replay ----------------------------------------------------------------

    @precondition(lambda self: self.page is None and self.sess.state is SYNCING)
    @rule()
    def read_page(self) -> None:
        after, before = self.sess.replay_window()
        ids = sorted(i for i in self.visible() if after < i < before)[: self.page_size]
        self.page = [copy(self.msgs[i]) for i in ids]

    @precondition(lambda self: self.page is not None)
    @rule(fails=st.sampled_from([False] * 7 + [True]))
    def hand_page(self, fails: bool) -> None:
        page, self.page = self.page, None
        assert page is not None
        if fails:
            self.sess.replay_failed()
        else:
            more = self.sess.on_page(page, self.page_size)
            if more:
                assert self.sess.state is SYNCING
        self.collect()

    # --- rules: the end ---------------------------------------------------------------------

    @precondition(lambda self: self.sess.state is not CLOSING and self.sess.state is not CLOSED)
    @rule(code=st.sampled_from([1000, 1001, 4000, 4501, 0]), now=st.integers(0, 3))
    def close(self, code: int, now: int) -> None:
        """``close`` (idle, drain, revoked, ...), or (code 0) ``disconnected``.

        Only one time in four: the session is of little interest once closed,
        and a run should get somewhere first."""
        if now:
            return
        if code:
            self.closing_live = self.sess.state is LIVE and code < 4500
            self.sess.close(code, "bye")
            assert self.sess.state is CLOSING or self.sess.state is CLOSED
        else:
            self.sess.disconnected()
            self.disc = True
            assert self.sess.state is CLOSED
        self.collect()

    # --- checks after every step --------------------------------------------------------------

    @invariant()
    def bounded(self) -> None:
        sess = self.sess
        assert len(sess.held or ()) <= self.limits.held_max
        assert len(sess.waiting or ()) <= self.limits.waiting_max
        assert sess.inflight == len(self.pending)

    def teardown(self) -> None:
        if not hasattr(self, "sess"):
            return
        # the log answers everything, a running replay reads to its end
        for _ in range(10_000):
            if self.page is not None:
                self.hand_page(False)
            elif self.sess.state is SYNCING:
                self.read_page()
            elif self.lost:
                self.log_back()
            elif self.pending:
                self.log_answers("stored")
            else:
                break
            self.bounded()
        if not self.disc:
            assert self.answers == self.required, "a message without its answer"
            if self.sess.state is LIVE:
                assert self.syncs_answered == self.syncs_asked, "a cmd 4 without its answer"


def code_retryable(answer: tuple[str, int]) -> bool:
    return answer[0] == "err" and answer[1] in (ERR_BUSY, ERR_SERVER)


# about 10 s here (more under coverage); every run draws new sequences, and the
# bugs it found are kept above as examples
SessionMachine.TestCase.settings = settings(
    max_examples=700, stateful_step_count=40, deadline=None
)
TestSession = SessionMachine.TestCase
