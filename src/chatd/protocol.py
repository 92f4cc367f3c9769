"""One connection's protocol state, without I/O.

A ``Session`` is everything chatd knows about one websocket connection of an
authenticated user: whether it is waiting for its place in the node's order,
replaying what it missed, live, or closing; the live copies it holds while a
replay runs; where its replay must stop; its resume point; its groups; the
frames waiting for it to be ready; its flood control and the fragments of a
message being reassembled. It imports no picows, asyncio or store: the shard
(``chatd.shard``, thin picows glue) feeds it decoded frames, the log's items
and replay pages, and writes what collects in ``out`` (framed bytes, in
order); it reads ``close_frame`` to know when to send the close frame.

States (``State``)::

    LOADING --Here--> LIVE <--------------------------+
       |               |  cmd 4 / log restart         |
       +--Here+last--> SYNCING --last page + held ----+
    any --close()--> CLOSING (answers to sent messages still go out)
    any --disconnected()--> CLOSED

The ordering rules it keeps (docs/design.md, invariants 3 and 4):

- ``bound``: a replay reads the store up to the point where the shard's
  stream takes over (``Here``'s ``hw``, or the shard's high-water for a user
  already present); everything above it arrives live. Live copies and acks
  that come during a replay are held and go out after it, dropping those the
  replay already sent, so the connection sees ids in ascending order and the
  highest id it holds is a safe resume point.
- ``live_from``: everything for the connection above it went out live (or
  was held), so a later cmd 4 replays only up to it. A connection that left
  a group's live stream (cmd 3) gives that up (``partial``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from chatd.errors import FrameError
from chatd.wire import (
    CMD_ACK,
    CMD_GROUP,
    CMD_GROUP_ENTER,
    CMD_GROUP_LEAVE,
    CMD_PRIVATE,
    CMD_SYNC,
    ERR_BUSY,
    ERR_CONFLICT,
    ERR_FORBIDDEN,
    ERR_SERVER,
    ERR_TOO_LARGE,
    Message,
    error_frame,
    framed,
)


class State(enum.Enum):
    LOADING = "loading"  # waiting for its place in the node's order (Here)
    SYNCING = "syncing"  # a replay from the store runs; live copies are held
    LIVE = "live"
    CLOSING = "closing"  # we started the closing handshake
    CLOSED = "closed"  # the transport is gone


LOADING: Final = State.LOADING
SYNCING: Final = State.SYNCING
LIVE: Final = State.LIVE
CLOSING: Final = State.CLOSING
CLOSED: Final = State.CLOSED


class Verdict(enum.Enum):
    """What the glue must do after ``Session.accept``."""

    DONE = "done"  # nothing more (a heartbeat, or an answer is in ``out``)
    SUBMIT = "submit"  # hand the message to the log, then call ``submitted``/``refuse``
    REPLAY = "replay"  # start the replay task
    ENTER = "enter"  # put the connection in the live stream of group ``msg.dstid``
    LEAVE = "leave"  # take it out of that stream
    WAIT = "wait"  # queued until the session is ready


@dataclass(frozen=True)
class Limits:
    """The bounds of a session; one object shared by every session of a shard."""

    #: largest message (reassembled from fragments) accepted
    max_frame_bytes: int = 65_536
    #: token bucket: frames per second and burst; rate 0 switches it off
    rate_per_s: float = 300.0
    rate_burst: int = 600
    #: live copies and acks held during one replay; past it: slow consumer
    held_max: int = 4_096
    #: frames that wait while the session is LOADING; past it: error 503
    waiting_max: int = 256


_NO_GROUPS: Final[frozenset[int]] = frozenset()
NO_BOUND: Final = -1
#: what ``Session.deliver`` did with a live copy
DELIVERED: Final = 1
IGNORED: Final = 0
OVERFLOW: Final = -1


def _by_id(msg: Message) -> int:
    return msg.id


class Session:
    """The protocol state of one connection. See the module docstring."""

    __slots__ = (
        "uid",
        "limits",
        "state",
        "binary",
        "groups",
        "partial",
        "resume",
        "top",
        "live_from",
        "replay_after",
        "replay_bound",
        "replay_read",
        "replay_answer",
        "held",
        "waiting",
        "inflight",
        "close_pending",
        "close_frame",
        "closing_live",
        "acks_upto",
        "tokens",
        "stamp",
        "frag",
        "frag_binary",
        "out",
        "tick",
        "conn",
    )

    def __init__(self, uid: int, limits: Limits, *, resume: int = -1, now: float = 0.0,
                 conn: Any = None) -> None:
        self.uid = uid
        self.limits = limits
        self.state = LOADING
        #: the encoding of the last frame the client sent (MessagePack if true)
        self.binary = False
        self.groups: frozenset[int] = _NO_GROUPS
        #: the connection left some group's live stream (cmd 3)
        self.partial = False
        #: ``last`` of the handshake (-1: none): the client has every message
        #: up to it, so a replay starts there and no copy at or below it is
        #: sent (a client that comes from another node of a cluster may be
        #: ahead of this node's stream, which then still has those to release)
        self.resume = resume
        #: the highest id sent on this connection
        self.top = 0
        self.live_from = NO_BOUND
        self.replay_after = 0
        self.replay_bound = 0
        #: the end of the window the page in flight was read for (exclusive)
        self.replay_read = 0
        self.replay_answer = False
        self.held: list[Message] | None = None
        #: made when the first frame has to wait (most connections never wait)
        self.waiting: list[Message] | None = None
        #: messages handed to the log whose answer has not come back
        self.inflight = 0
        #: (code, reason) of a close that waits for those answers
        self.close_pending: tuple[int, str] | None = None
        #: (code, reason) once the close frame must go out (after ``out``)
        self.close_frame: tuple[int, str] | None = None
        #: closed from LIVE with a code the client may reconnect after: live
        #: copies still go out until the close frame is due (see ``close``)
        self.closing_live = False
        #: once closing, no ack above this id goes out: the client misses
        #: something above it (a replay cut short, a live copy not sent)
        self.acks_upto: int | None = None
        # a full bucket; the shared int, not a float per connection (the first
        # ``allow`` refills to ``rate_burst`` whatever ``stamp`` was)
        self.tokens: float = limits.rate_burst
        self.stamp = now
        self.frag: bytearray | None = None
        self.frag_binary = False
        #: framed bytes to write, in order (None: nothing)
        self.out: list[bytes] | None = None
        #: the shard's liveness tick of the last frame received
        self.tick = 0
        #: the glue's object for this connection (opaque here)
        self.conn = conn

    # --- output -------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Queue ``msg`` for the client, in the connection's encoding."""
        data = framed(msg, self.binary)
        if self.out is None:
            self.out = [data]
        else:
            self.out.append(data)

    def take_out(self) -> bytes | None:
        """Everything queued for the client, as one buffer (None: nothing)."""
        out = self.out
        if out is None:
            return None
        self.out = None
        return out[0] if len(out) == 1 else b"".join(out)

    def error(self, code: int, reason: str, cid: str = "") -> None:
        self.send(error_frame(FrameError(code, reason, cid)))

    @property
    def writable(self) -> bool:
        """Whether anything may still be written (not closed, close frame not due)."""
        state = self.state
        return state is LIVE or state is SYNCING or state is LOADING or (
            state is CLOSING and self.close_pending is not None
        )

    # --- frames in -----------------------------------------------------------

    def allow(self, now: float) -> bool:
        """Spend one token of the flood control; False: the client floods (4008)."""
        rate = self.limits.rate_per_s
        if not rate:
            return True
        burst = self.limits.rate_burst
        tokens = self.tokens + (now - self.stamp) * rate
        if tokens > burst:
            tokens = burst
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

    def fragment(self, payload: bytes, fin: bool, first: bool, binary: bool) -> bytes | None:
        """Feed one frame of a fragmented message; the whole message once ``fin``.

        ``first`` is true for the opening (text/binary, fin=0) frame. Raises
        ``FrameError`` (ERR_TOO_LARGE: close 1009) when the message grows past
        ``max_frame_bytes``, ``ValueError`` (close 1002) for a continuation
        without an opening frame or a new message inside one.
        """
        if first:
            if self.frag is not None:
                raise ValueError("new message started inside a fragmented one")
            self.frag = bytearray()
            self.frag_binary = binary
        elif self.frag is None:
            raise ValueError("continuation frame without a message to continue")
        buf = self.frag
        buf += payload
        limit = self.limits.max_frame_bytes
        if len(buf) > limit:
            self.frag = None
            raise FrameError(ERR_TOO_LARGE, f"message larger than {limit} bytes")
        if not fin:
            return None
        self.frag = None
        return bytes(buf)

    def accept(self, msg: Message, hw: int) -> Verdict:
        """Act on one decoded, valid client frame; ``hw``: the shard's high-water.

        For ``SUBMIT`` the message is ready for the log (``userid`` is the
        connection's, ``id``/``ts`` cleared); the glue then calls
        ``submitted`` or ``refuse``.
        """
        state = self.state
        if state is CLOSING or state is CLOSED:
            return Verdict.DONE
        if state is LOADING:
            waiting = self.waiting
            if waiting is None:
                waiting = self.waiting = []
            if len(waiting) >= self.limits.waiting_max:
                self.error(ERR_BUSY, "connection not ready yet, retry", msg.cid)
                return Verdict.DONE
            waiting.append(msg)
            return Verdict.WAIT
        cmd = msg.cmd
        if cmd in (CMD_PRIVATE, CMD_GROUP):
            if cmd == CMD_GROUP and msg.dstid not in self.groups:
                self.error(ERR_FORBIDDEN, f"not a member of group {msg.dstid}", msg.cid)
                return Verdict.DONE
            msg.userid = self.uid  # never trust the client's userid
            msg.id = msg.ts = 0
            return Verdict.SUBMIT
        if cmd == CMD_SYNC:
            return self._start_sync(msg, hw)
        if cmd == CMD_GROUP_ENTER:
            if msg.dstid not in self.groups:
                self.error(ERR_FORBIDDEN, f"not a member of group {msg.dstid}", msg.cid)
                return Verdict.DONE
            return Verdict.ENTER
        if cmd == CMD_GROUP_LEAVE:
            # group messages now skip this connection: a later replay must not
            # assume that everything after live_from went out live
            self.partial = True
            return Verdict.LEAVE
        return Verdict.DONE  # a heartbeat: receiving it was the point

    def submitted(self) -> None:
        """The log took the message that ``accept`` passed (its answer will come)."""
        self.inflight += 1

    def _start_sync(self, msg: Message, hw: int) -> Verdict:
        if self.state is SYNCING:
            self.error(ERR_CONFLICT, "a sync is already running", msg.cid)
            return Verdict.DONE
        after = msg.id
        # everything above live_from went out live; with a partial stream, up
        # to everything this shard has seen
        bound = hw if self.partial or self.live_from < 0 else self.live_from
        if after >= bound:
            self.send(Message(cmd=CMD_SYNC, id=max(after, self.top)))
            return Verdict.DONE
        self._begin_replay(after, bound, answer=True)
        return Verdict.REPLAY

    # --- the node's order ----------------------------------------------------------

    def on_here(self, groups: frozenset[int], bound: int) -> tuple[list[Message], bool]:
        """The session has its place in the order: the user's ``groups`` and the
        id up to which the store has its messages (above it: the stream).

        Returns the frames that waited (to ``accept`` now) and whether a replay
        must start. For a session that was already live (the log restarted),
        a replay catches up on what the stream may have lost.
        """
        self.groups = groups
        state = self.state
        if state is LOADING:
            waiting, self.waiting = self.waiting or [], None
            if self.resume >= 0:
                self._begin_replay(self.resume, bound, answer=True)
                return waiting, True
            self.state = LIVE
            self.live_from = bound
            return waiting, False
        if state is LIVE:
            start = max(self.top, self.live_from)
            if start < bound:
                self._begin_replay(start, bound, answer=False)
                return [], True
            return [], False
        if state is SYNCING and bound > self.replay_bound:
            # the running replay reads on to the new bound; held copies it
            # covers are dropped when it ends
            self.replay_bound = bound
        return [], False

    def _begin_replay(self, after: int, bound: int, answer: bool) -> None:
        self.state = SYNCING
        self.held = []
        self.replay_after = after
        self.replay_bound = bound
        self.replay_read = bound + 1
        self.replay_answer = answer

    def replay_window(self) -> tuple[int, int]:
        """The next page to read: ids strictly between these two."""
        self.replay_read = self.replay_bound + 1
        return self.replay_after, self.replay_read

    def on_page(self, msgs: Iterable[Message], page_size: int) -> bool:
        """A page of the running replay arrived (in id order); True: read another.

        When the replay is complete, the held copies go out (those it covered
        are dropped), then cmd 4 with the high-water id if the client asked.
        """
        if self.state is not SYNCING:
            return False
        # acks are held above the bound; only a log restart that raised the
        # bound past some (on_here) puts one among the pages
        first_ack = self._first_held_ack()
        n = 0
        for msg in msgs:
            n += 1
            if msg.id > self.replay_after:
                self.replay_after = msg.id
            if first_ack is not None and msg.id >= first_ack:
                # the acks up to it go first, in id order; the client's own
                # message comes as its ack, not as a copy (as it does live)
                acked = self._send_acks_up_to(msg.id)
                first_ack = self._first_held_ack()
                if acked:
                    continue
            self.send(msg)
        if n < page_size and self.replay_read - 1 > self.replay_after:
            # the store has nothing more in the window this page was read for;
            # a log restart may have raised the bound since (on_here)
            self.replay_after = self.replay_read - 1
        if self.replay_after > self.top:
            self.top = self.replay_after
        if self.replay_after < self.replay_bound:
            return True
        self._end_replay()
        return False

    def _first_held_ack(self) -> int | None:
        acks = [m.id for m in self.held or () if m.cmd == CMD_ACK]
        return min(acks) if acks else None

    def _send_acks_up_to(self, id: int) -> bool:
        """Send the held acks with ids up to ``id``, in id order; whether one
        of them was for ``id`` itself."""
        held = self.held
        assert held is not None
        due = sorted((m for m in held if m.cmd == CMD_ACK and m.id <= id), key=_by_id)
        for ack in due:
            self.send(ack)
        self.held = [m for m in held if m.cmd != CMD_ACK or m.id > id]
        return any(m.id == id for m in due)

    def _end_replay(self) -> None:
        held, self.held = self.held or [], None
        bound = self.replay_bound
        # the client has everything up to where it resumed from, too
        top = max(self.top, bound, self.resume)
        for msg in held:
            if msg.cmd == CMD_ACK:
                self.send(msg)  # the client needs its ack whatever its id
                if msg.id > top:
                    top = msg.id
            elif msg.id > top:
                self.send(msg)
                top = msg.id
        self.top = top
        if not self.partial:
            self.live_from = max(self.live_from, bound)
        self.state = LIVE
        if self.replay_answer:
            self.send(Message(cmd=CMD_SYNC, id=top))

    def replay_failed(self) -> None:
        """The store could not give a page: the gap cannot be filled here, and
        sending what is held would make the client's highest id a false resume
        point: close (1011) so that it reconnects and resumes. (``close`` sends
        no held copy, and answers the held acks without passing that point.)"""
        self.close(1011, "sync failed, reconnect")

    # --- the log's items -----------------------------------------------------------

    def deliver(self, msg: Message, data: bytes) -> int:
        """A live copy (``data``: it framed in this session's encoding).

        ``DELIVERED`` (written to ``out``, or held during a replay),
        ``IGNORED`` (loading: its replay covers it; or closing), or
        ``OVERFLOW``: holding it would pass ``held_max``, the glue closes the
        connection as a slow consumer (it catches up by sync).
        """
        state = self.state
        if msg.id <= self.resume:
            # the client had it before it came here (from a node whose stream
            # was ahead of this one's)
            return IGNORED
        if state is LIVE:
            if self.out is None:
                self.out = [data]
            else:
                self.out.append(data)
            if msg.id > self.top:
                self.top = msg.id
            return DELIVERED
        if state is SYNCING:
            return DELIVERED if self._hold(msg) else OVERFLOW
        if state is CLOSING and self.closing_live and self.close_pending is not None:
            # acks with higher ids are still to go out: so must the copies
            # between them, or the highest id would skip these
            if self.out is None:
                self.out = [data]
            else:
                self.out.append(data)
            return DELIVERED
        if state is CLOSING and self.acks_upto is None:
            # the client will not get it: no ack above it may go out now
            self.acks_upto = msg.id - 1
        return IGNORED

    def _hold(self, msg: Message) -> bool:
        held = self.held
        assert held is not None
        if len(held) >= self.limits.held_max:
            return False
        held.append(msg)
        return True

    def on_acked(self, id: int, ts: int, cid: str, stored: bool) -> bool:
        """The log stored the message (``stored`` false: it was a retry of a
        stored one, answered with the original's id). False: slow consumer."""
        self.inflight -= 1
        ack = Message(cmd=CMD_ACK, id=id, cid=cid, ts=ts)
        ok = True
        state = self.state
        if state is SYNCING and (stored or id > self._client_has()):
            # after the replay, with the held copies: frames stay in id order
            # (a re-ack too, if the original is above what the client has: it
            # was stored while the client was away, and the replay is not there)
            ok = self._hold(ack)
            if not ok:
                # the glue closes this slow consumer before the replay is through
                self._unconfirmed(cid)
        elif self.writable:
            if self.acks_upto is not None and id > self.acks_upto:
                self._unconfirmed(cid)
            else:
                self.send(ack)
                if stored and id > self.top and state is LIVE:
                    self.top = id
        self._answered()
        return ok

    def refuse(self, code: int, reason: str, cid: str) -> None:
        """A message was not stored (error frame ``code``); also for one the
        glue could not hand to the log (then ``submitted`` was not called)."""
        if self.writable:
            self.error(code, reason, cid)

    def on_refused(self, code: int, reason: str, cid: str) -> None:
        """The log's answer: the message ``submitted`` earlier was not stored."""
        self.inflight -= 1
        self.refuse(code, reason, cid)
        self._answered()

    def _answered(self) -> None:
        if not self.inflight and self.close_pending is not None:
            self.close_frame, self.close_pending = self.close_pending, None

    def joined(self, gid: int) -> None:
        self.groups = self.groups | {gid}

    def left(self, gid: int) -> None:
        self.groups = self.groups - {gid}

    # --- the end ---------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Start closing with ``code``: nothing more is read; the answers to
        messages already handed to the log still go out (with the live copies
        among them, ``closing_live``), then the close frame (``close_frame`` is
        set once it is due). An ack above a message the client will not get
        here (``acks_upto``) goes as "send again" instead, so that its highest
        id stays a safe resume point."""
        state = self.state
        if state is CLOSING or state is CLOSED:
            return
        if state is SYNCING:
            # an ack held for after the replay goes out only if the replay has
            # passed its id: one above the part not replayed would make the
            # client resume past that part (docs/design.md §5, 4). The others,
            # and those still to come, are answered "send again": the client's
            # retry (same cid) is acked again with the same id.
            has = self.acks_upto = self._client_has()
            for msg in self.held or ():
                if msg.cmd == CMD_ACK:
                    if msg.id > has:
                        self._unconfirmed(msg.cid)
                    else:
                        self.send(msg)
        self.held = None
        self.waiting = None
        # a client that may reconnect resumes from the highest id it got: the
        # acks still due after the close carry ids, so the live copies among
        # them go out too (the close frame follows the last answer). After a
        # revocation or a ban (4500+) nothing more is delivered.
        self.closing_live = state is LIVE and code < 4500
        self.state = CLOSING
        if self.inflight:
            self.close_pending = (code, reason)
        else:
            self.close_frame = (code, reason)

    def _client_has(self) -> int:
        """While a replay runs (or when one was cut short): the id up to which
        the client has everything (where it resumed from, or the pages)."""
        return max(self.top, self.replay_after)

    def _unconfirmed(self, cid: str) -> None:
        """The answer to a stored message whose ack may not go out (its id is
        above a message the client will not get here): "send again". The
        retry, same cid, is acked with the same id."""
        self.error(ERR_BUSY, "closing: not confirmed here, send it again", cid)

    def disconnected(self) -> None:
        """The transport is gone."""
        self.state = CLOSED
        self.held = self.waiting = self.out = None
        self.close_pending = None

    def server_error(self) -> None:
        """Our bug broke this session: tell the client to come back (1011)."""
        self.error(ERR_SERVER, "server error, reconnect")
        self.close(1011, "server error")
