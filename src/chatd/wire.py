"""The wire schema: the ``Message`` struct, its codecs and its validation.

This module is pure: it imports nothing that does I/O. Every frame on the
chat websocket is one ``Message``; a text frame carries it as JSON, a binary
frame as MessagePack, with the same field names. Fields equal to their default
(0 or "") are left out on the wire, as the seed protocol does.

Decoding and validation are one step (``decode_json`` / ``decode_msgpack``):
they either return a ``Message`` that the server may act on, or raise
``FrameError`` carrying the error code and reason for the error frame (cmd 5)
that answers it. See docs/protocol.md for the whole contract.
"""

from __future__ import annotations

import struct
from typing import Annotated, Final

import msgspec

from chatd.errors import FrameError

# --- cmd values --------------------------------------------------------------
CMD_HEARTBEAT: Final = 0
CMD_ACK: Final = 1
CMD_GROUP_ENTER: Final = 2
CMD_GROUP_LEAVE: Final = 3
CMD_SYNC: Final = 4
CMD_ERROR: Final = 5
CMD_PRIVATE: Final = 10
CMD_GROUP: Final = 11

#: cmds a client may send
CLIENT_CMDS: Final = frozenset(
    {CMD_HEARTBEAT, CMD_GROUP_ENTER, CMD_GROUP_LEAVE, CMD_SYNC, CMD_PRIVATE, CMD_GROUP}
)

# --- media values (the seed's) -------------------------------------------------
MEDIA_TEXT: Final = 1
MEDIA_NEWS: Final = 2
MEDIA_VOICE: Final = 3
MEDIA_IMAGE: Final = 4
MEDIA_REDPACKET: Final = 5
MEDIA_EMOJI: Final = 6
MEDIA_LINK: Final = 7
MEDIA_VIDEO: Final = 8
MEDIA_CARD: Final = 9
MEDIA_APP: Final = 100
MEDIAS: Final = frozenset(range(1, 10)) | {MEDIA_APP}
#: media whose message is meaningless without a resource url
MEDIA_NEEDS_URL: Final = frozenset({MEDIA_VOICE, MEDIA_IMAGE, MEDIA_LINK, MEDIA_VIDEO})
#: media whose message is meaningless without content
MEDIA_NEEDS_CONTENT: Final = frozenset({MEDIA_TEXT, MEDIA_EMOJI, MEDIA_CARD})

# --- error codes carried in ``amount`` of a cmd-5 frame -----------------------
ERR_BAD_FRAME: Final = 400  # not decodable, or a field of the wrong type
ERR_FORBIDDEN: Final = 403  # e.g. group message from a non-member
ERR_NOT_FOUND: Final = 404  # receiver does not exist
ERR_CONFLICT: Final = 409  # e.g. a sync already running on this connection
ERR_TOO_LARGE: Final = 413  # a field over its limit
ERR_INVALID: Final = 422  # decodable but not meaningful (unknown cmd, media, ...)
ERR_SERVER: Final = 500  # the store failed; the message was not stored, retry
ERR_BUSY: Final = 503  # server overloaded or draining; not stored, retry later

# --- websocket close codes ----------------------------------------------------
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_TEXT: Final = 1007  # invalid UTF-8 in a text message (RFC 6455 §8.1)
CLOSE_TOO_BIG: Final = 1009
CLOSE_SERVER_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_TRY_AGAIN: Final = 1013
CLOSE_IDLE: Final = 4000
CLOSE_KICKED: Final = 4001  # an operator closed it (chatd admin kick); it may reconnect
CLOSE_RATE_LIMITED: Final = 4008
CLOSE_SLOW_CONSUMER: Final = 4009
CLOSE_REPLACED: Final = 4010
CLOSE_REVOKED: Final = 4501
CLOSE_BANNED: Final = 4502


def valid_close_code(code: int) -> bool:
    """Whether a peer may put ``code`` in a close frame (RFC 6455 §7.4).

    1000-1003 and 1007-1014 are the registered codes a peer may send (1004 is
    reserved; 1005, 1006 and 1015 say "no code", "abnormal" and "TLS failed"
    and never go on the wire); 3000-4999 are for libraries and applications.
    Anything else fails the connection with 1002.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999

# --- limits -------------------------------------------------------------------
MAX_CONTENT_CHARS: Final = 8192
MAX_URL_CHARS: Final = 2048
MAX_MEMO_CHARS: Final = 1024
MAX_CID_CHARS: Final = 64

#: every integer on the wire is an int64 (the seed's Go types, and SQLite's)
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Content = Annotated[str, msgspec.Meta(max_length=MAX_CONTENT_CHARS)]
_Url = Annotated[str, msgspec.Meta(max_length=MAX_URL_CHARS)]
_Memo = Annotated[str, msgspec.Meta(max_length=MAX_MEMO_CHARS)]
_Cid = Annotated[str, msgspec.Meta(max_length=MAX_CID_CHARS)]


class Message(msgspec.Struct, omit_defaults=True, gc=False):
    """One chat frame. Seed fields first, then chatd's extensions (cid, ts)."""

    id: _Int64 = 0
    userid: _Int64 = 0
    cmd: _Int64 = 0
    dstid: _Int64 = 0
    media: _Int64 = 0
    content: _Content = ""
    pic: _Url = ""
    url: _Url = ""
    memo: _Memo = ""
    amount: _Int64 = 0
    cid: _Cid = ""
    ts: _Int64 = 0


class _CidOnly(msgspec.Struct):
    """Lenient view of a bad frame, to echo its cid in the error frame."""

    cid: object = ""


_json_decode = msgspec.json.Decoder(Message).decode
_msgpack_decode = msgspec.msgpack.Decoder(Message).decode
_json_cid = msgspec.json.Decoder(_CidOnly).decode
_msgpack_cid = msgspec.msgpack.Decoder(_CidOnly).decode
encode_json = msgspec.json.Encoder().encode
encode_msgpack = msgspec.msgpack.Encoder().encode

_URL_PREFIXES: Final = ("http://", "https://", "/")


def _bad_frame_cid(data: bytes | memoryview | str, binary: bool) -> str:
    try:
        if isinstance(data, str):
            cid = _json_cid(data).cid
        else:
            cid = (_msgpack_cid if binary else _json_cid)(data).cid
    except (msgspec.MsgspecError, ValueError):
        return ""
    return cid[:MAX_CID_CHARS] if isinstance(cid, str) else ""


def _decode_error(exc: Exception, data: bytes | memoryview | str, binary: bool) -> FrameError:
    reason = str(exc)
    code = ERR_TOO_LARGE if "length <=" in reason else ERR_BAD_FRAME
    return FrameError(code, reason, _bad_frame_cid(data, binary))


def decode_json(data: bytes | memoryview | str) -> Message:
    """Decode and validate a text frame; raise ``FrameError`` if it is bad.

    ``data`` may be the frame's text already (the shard checks a text frame's
    UTF-8 before it decodes it: invalid UTF-8 closes the connection, 1007).
    """
    try:
        msg = _json_decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise _decode_error(exc, data, False) from None
    validate(msg)
    return msg


def decode_msgpack(data: bytes | memoryview) -> Message:
    """Decode and validate a binary frame; raise ``FrameError`` if it is bad."""
    try:
        msg = _msgpack_decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise _decode_error(exc, data, True) from None
    validate(msg)
    return msg


def validate(msg: Message) -> None:
    """Check the rules that the types alone cannot; raise ``FrameError``."""
    cmd = msg.cmd
    if cmd not in CLIENT_CMDS:
        raise FrameError(ERR_INVALID, f"unknown cmd {cmd}", msg.cid)
    if cmd in (CMD_PRIVATE, CMD_GROUP):
        if msg.dstid <= 0:
            raise FrameError(ERR_INVALID, "dstid is required", msg.cid)
        media = msg.media
        if media not in MEDIAS:
            raise FrameError(ERR_INVALID, f"unknown media {media}", msg.cid)
        if media in MEDIA_NEEDS_CONTENT and not msg.content:
            raise FrameError(ERR_INVALID, f"media {media} needs content", msg.cid)
        if media in MEDIA_NEEDS_URL and not msg.url:
            raise FrameError(ERR_INVALID, f"media {media} needs url", msg.cid)
        # a url that a web client would follow must not be javascript: or data:
        if msg.url and not msg.url.startswith(_URL_PREFIXES):
            raise FrameError(ERR_INVALID, "url must be http(s) or a server path", msg.cid)
        if msg.pic and not msg.pic.startswith(_URL_PREFIXES):
            raise FrameError(ERR_INVALID, "pic must be http(s) or a server path", msg.cid)
    elif cmd in (CMD_GROUP_ENTER, CMD_GROUP_LEAVE):
        if msg.dstid <= 0:
            raise FrameError(ERR_INVALID, "dstid is required", msg.cid)
    elif cmd == CMD_SYNC and msg.id < 0:
        raise FrameError(ERR_INVALID, "sync id must be >= 0", msg.cid)


def error_frame(err: FrameError) -> Message:
    """The cmd-5 frame that tells a client what was wrong with its frame."""
    return Message(cmd=CMD_ERROR, amount=err.code, memo=err.reason[:MAX_MEMO_CHARS], cid=err.cid)


# --- websocket framing of what the server sends (RFC 6455 §5.2) -------------

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack
#: the 2-byte headers of short frames, built once (most chat frames are short)
_SHORT_HEADERS: Final = {
    op: [bytes((0x80 | op, n)) for n in range(126)] for op in (OP_TEXT, OP_BINARY)
}


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server-to-client websocket frame.

    chatd frames its own output so that everything one commit produces for a
    connection goes out in one write (see ``chatd.fanout``).
    """
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[opcode][n] + payload
    if n < 65536:
        return _pack_16(0x80 | opcode, 126, n) + payload
    return _pack_64(0x80 | opcode, 127, n) + payload


def framed(msg: Message, binary: bool) -> bytes:
    """``msg`` encoded (MessagePack if ``binary``, else JSON) and framed."""
    if binary:
        return ws_frame(OP_BINARY, encode_msgpack(msg))
    return ws_frame(OP_TEXT, encode_json(msg))
