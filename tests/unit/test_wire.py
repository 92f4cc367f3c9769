"""The wire schema: codecs, validation and error frames (pure, no I/O)."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.errors import FrameError
from chatd.wire import (
    CLIENT_CMDS,
    CMD_ERROR,
    ERR_BAD_FRAME,
    ERR_INVALID,
    ERR_TOO_LARGE,
    MAX_CID_CHARS,
    MAX_CONTENT_CHARS,
    MAX_MEMO_CHARS,
    MAX_URL_CHARS,
    MEDIA_NEEDS_CONTENT,
    MEDIA_NEEDS_URL,
    MEDIAS,
    Message,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
    error_frame,
    valid_close_code,
    validate,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

DECODERS = [
    pytest.param(decode_json, encode_json, lambda o: json.dumps(o).encode(), id="json"),
    pytest.param(decode_msgpack, encode_msgpack, msgspec.msgpack.encode, id="msgpack"),
]


def frame_error(decode, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(data)
    return info.value


# --- encoding -----------------------------------------------------------------


def test_defaults_are_omitted_on_the_wire() -> None:
    assert encode_json(Message()) == b"{}"
    assert json.loads(encode_json(Message(cmd=10, dstid=2, media=1, content="hi"))) == {
        "cmd": 10,
        "dstid": 2,
        "media": 1,
        "content": "hi",
    }
    assert msgspec.msgpack.decode(encode_msgpack(Message(cmd=1, id=7, cid="c"))) == {
        "id": 7,
        "cmd": 1,
        "cid": "c",
    }


def test_seed_field_names_are_used() -> None:
    full = Message(1, 2, 10, 3, 2, "t", "/p", "/u", "m", 5, "c", 9)
    assert set(json.loads(encode_json(full))) == {
        "id", "userid", "cmd", "dstid", "media", "content", "pic", "url", "memo", "amount",
        "cid", "ts",
    }


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
def test_round_trip_of_a_private_message(decode, encode, raw) -> None:
    msg = Message(cmd=10, dstid=42, media=1, content="héllo 你好 🎉", cid="abc")
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
def test_unknown_fields_are_ignored(decode, encode, raw) -> None:
    msg = decode(raw({"cmd": 10, "dstid": 2, "media": 1, "content": "x", "extra": [1, 2]}))
    assert msg == Message(cmd=10, dstid=2, media=1, content="x")


# --- decoding errors --------------------------------------------------------------


def test_bad_json_is_400_without_cid() -> None:
    err = frame_error(decode_json, b'{"cmd": 10, "cid": "c1"')
    assert err.code == ERR_BAD_FRAME and err.reason and err.cid == ""


def test_bad_msgpack_is_400() -> None:
    err = frame_error(decode_msgpack, b"\xc1\x00\x01")
    assert err.code == ERR_BAD_FRAME and err.reason


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
@pytest.mark.parametrize(
    "fields",
    [
        {"cmd": "10"},
        {"cmd": 10.5},
        {"cmd": 10, "dstid": "2"},
        {"cmd": 10, "dstid": 2, "media": 1, "content": 5},
        {"cmd": 10, "dstid": 2, "media": None},
        {"cmd": True},
    ],
)
def test_wrong_types_are_400_and_keep_the_cid(decode, encode, raw, fields) -> None:
    err = frame_error(decode, raw({**fields, "cid": "c-7"}))
    assert err.code == ERR_BAD_FRAME
    assert err.cid == "c-7"


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
@pytest.mark.parametrize("value", [[], "x", 5, None])
def test_a_frame_that_is_not_an_object_is_400(decode, encode, raw, value) -> None:
    assert frame_error(decode, raw(value)).code == ERR_BAD_FRAME


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
def test_cid_of_the_wrong_type_is_not_echoed(decode, encode, raw) -> None:
    err = frame_error(decode, raw({"cmd": "x", "cid": 12}))
    assert err.code == ERR_BAD_FRAME and err.cid == ""


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
@pytest.mark.parametrize(
    "field,limit",
    [("content", MAX_CONTENT_CHARS), ("url", MAX_URL_CHARS), ("pic", MAX_URL_CHARS),
     ("memo", MAX_MEMO_CHARS)],
)
def test_fields_over_their_limit_are_413(decode, encode, raw, field, limit) -> None:
    base = {"cmd": 10, "dstid": 2, "media": 100, "cid": "big"}
    value = "/" + "x" * (limit - 1)
    assert decode(raw({**base, field: value})).cid == "big"  # exactly at the limit: fine
    err = frame_error(decode, raw({**base, field: value + "x"}))
    assert err.code == ERR_TOO_LARGE and err.cid == "big"


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
def test_content_limit_counts_characters_not_bytes(decode, encode, raw) -> None:
    text = "你" * MAX_CONTENT_CHARS  # 3 bytes each in UTF-8
    msg = decode(raw({"cmd": 10, "dstid": 2, "media": 1, "content": text}))
    assert msg.content == text


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
def test_cid_over_its_limit_is_413(decode, encode, raw) -> None:
    err = frame_error(decode, raw({"cmd": 0, "cid": "c" * (MAX_CID_CHARS + 1)}))
    assert err.code == ERR_TOO_LARGE
    assert len(err.cid) <= MAX_CID_CHARS


def test_invalid_utf8_in_a_json_frame_is_a_frame_error() -> None:
    data = b'{"cmd":10,"dstid":2,"media":1,"content":"\xff\xfe","cid":"u1"}'
    err = frame_error(decode_json, data)
    assert err.code == ERR_BAD_FRAME


def test_invalid_utf8_in_a_msgpack_string_is_a_frame_error() -> None:
    good = msgspec.msgpack.encode({"cmd": 10, "dstid": 2, "media": 1, "content": "ab"})
    data = good[:-2] + b"\xff\xfe"  # same length, the content is no longer UTF-8
    err = frame_error(decode_msgpack, data)
    assert err.code == ERR_BAD_FRAME


@pytest.mark.parametrize("decode,encode,raw", DECODERS)
def test_integers_outside_int64_are_refused(decode, encode, raw) -> None:
    """dstid, amount (stored) and id (a sync's bound) reach SQLite as INTEGER,
    an int64: a larger value must be a client error (FrameError), not a Python
    int that overflows later inside the store."""
    accepted = []
    cases = [("dstid", {"cmd": 10}), ("amount", {"cmd": 10}), ("id", {"cmd": 4})]
    for field, base in cases:
        for value in (2**63, 2**64 - 1):
            fields = {"dstid": 2, "media": 1, "content": "x", "cid": "big", **base, field: value}
            try:
                decode(raw(fields))
            except FrameError as exc:
                assert exc.code in (ERR_BAD_FRAME, ERR_INVALID, ERR_TOO_LARGE)
                assert exc.cid == "big"
            else:
                accepted.append((field, value))
    assert accepted == []


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize("cmd", sorted(CLIENT_CMDS))
def test_every_client_cmd_has_a_valid_form(cmd: int) -> None:
    msg = Message(cmd=cmd, dstid=3, media=1, content="x")
    validate(msg)


@pytest.mark.parametrize("cmd", [1, 5, 6, 7, 9, 12, -1, 99])
def test_unknown_or_server_only_cmd_is_422(cmd: int) -> None:
    with pytest.raises(FrameError) as info:
        validate(Message(cmd=cmd, dstid=3, media=1, content="x", cid="k"))
    assert info.value.code == ERR_INVALID and info.value.cid == "k"
    assert str(cmd) in info.value.reason


@pytest.mark.parametrize("cmd", [10, 11])
@pytest.mark.parametrize("media", [0, 10, 11, 99, 101, -1])
def test_unknown_media_is_422(cmd: int, media: int) -> None:
    with pytest.raises(FrameError) as info:
        validate(Message(cmd=cmd, dstid=3, media=media, content="x", url="/u", cid="m"))
    assert info.value.code == ERR_INVALID and info.value.cid == "m"


@pytest.mark.parametrize("cmd", [2, 3, 10, 11])
@pytest.mark.parametrize("dstid", [0, -5])
def test_missing_dstid_is_422(cmd: int, dstid: int) -> None:
    with pytest.raises(FrameError) as info:
        validate(Message(cmd=cmd, dstid=dstid, media=1, content="x", cid="d"))
    assert info.value.code == ERR_INVALID and info.value.cid == "d"


@pytest.mark.parametrize("media", sorted(MEDIA_NEEDS_CONTENT))
def test_media_that_needs_content(media: int) -> None:
    with pytest.raises(FrameError):
        validate(Message(cmd=10, dstid=3, media=media, url="/u"))
    validate(Message(cmd=10, dstid=3, media=media, content="c", url="/u"))


@pytest.mark.parametrize("media", sorted(MEDIA_NEEDS_URL))
def test_media_that_needs_url(media: int) -> None:
    with pytest.raises(FrameError):
        validate(Message(cmd=10, dstid=3, media=media, content="c"))
    validate(Message(cmd=10, dstid=3, media=media, content="c", url="https://x/y"))


@pytest.mark.parametrize("field", ["url", "pic"])
@pytest.mark.parametrize("value", ["javascript:alert(1)", "data:text/html,x", "ftp://x", "x"])
def test_urls_must_be_http_or_a_server_path(field: str, value: str) -> None:
    with pytest.raises(FrameError) as info:
        validate(Message(cmd=10, dstid=3, media=100, **{field: value}))
    assert info.value.code == ERR_INVALID


def test_sync_id_must_not_be_negative() -> None:
    validate(Message(cmd=4, id=0))
    with pytest.raises(FrameError) as info:
        validate(Message(cmd=4, id=-1, cid="s"))
    assert info.value.code == ERR_INVALID and info.value.cid == "s"


def test_error_frame_carries_code_reason_and_cid() -> None:
    frame = error_frame(FrameError(413, "too big", "c9"))
    assert frame == Message(cmd=CMD_ERROR, amount=413, memo="too big", cid="c9")
    long = error_frame(FrameError(400, "r" * 5000))
    assert len(long.memo) == MAX_MEMO_CHARS


# --- properties --------------------------------------------------------------------

int64 = st.integers(INT64_MIN, INT64_MAX)
pos64 = st.integers(1, INT64_MAX)
urls = st.one_of(
    st.just(""),
    st.builds(lambda p, s: p + s, st.sampled_from(["http://", "https://", "/"]),
              st.text(max_size=60)),
)


@st.composite
def valid_messages(draw: st.DrawFn) -> Message:
    cmd = draw(st.sampled_from(sorted(CLIENT_CMDS)))
    media = draw(st.sampled_from(sorted(MEDIAS)))
    content = draw(st.text(max_size=200))
    url = draw(urls)
    if media in MEDIA_NEEDS_CONTENT and not content:
        content = "c"
    if media in MEDIA_NEEDS_URL and not url:
        url = "/r"
    return Message(
        id=draw(st.integers(0, INT64_MAX)),
        userid=draw(int64),
        cmd=cmd,
        dstid=draw(pos64),
        media=media,
        content=content,
        pic=draw(urls),
        url=url,
        memo=draw(st.text(max_size=50)),
        amount=draw(int64),
        cid=draw(st.text(max_size=MAX_CID_CHARS)),
        ts=draw(int64),
    )


any_messages = st.builds(
    Message,
    id=int64, userid=int64, cmd=st.integers(-3, 20), dstid=int64, media=st.integers(-1, 120),
    content=st.text(max_size=100), pic=st.text(max_size=20), url=st.text(max_size=20),
    memo=st.text(max_size=20), amount=int64, cid=st.text(max_size=MAX_CID_CHARS), ts=int64,
)


@given(valid_messages())
def test_valid_messages_round_trip_through_json(msg: Message) -> None:
    validate(msg)
    assert decode_json(encode_json(msg)) == msg


@given(valid_messages())
def test_valid_messages_round_trip_through_msgpack(msg: Message) -> None:
    validate(msg)
    assert decode_msgpack(encode_msgpack(msg)) == msg


@given(any_messages)
def test_any_message_round_trips_or_is_refused_by_validation(msg: Message) -> None:
    try:
        validate(msg)
    except FrameError as exc:
        for decode, encode in ((decode_json, encode_json), (decode_msgpack, encode_msgpack)):
            with pytest.raises(FrameError) as info:
                decode(encode(msg))
            assert info.value.code == exc.code
        return
    assert decode_json(encode_json(msg)) == msg
    assert decode_msgpack(encode_msgpack(msg)) == msg


def _decodes_or_frame_error(decode, data: bytes) -> None:
    try:
        msg = decode(data)
    except FrameError as exc:
        assert isinstance(exc.code, int) and exc.reason
        assert isinstance(exc.cid, str) and len(exc.cid) <= MAX_CID_CHARS
    else:
        assert isinstance(msg, Message)


# arbitrary bytes, and arbitrary bytes inside an otherwise well-formed string
# field (random bytes alone rarely get past the first byte of the parser)
json_bytes = st.binary(max_size=300) | st.builds(
    lambda b: b'{"cmd":0,"content":"' + b + b'"}', st.binary(max_size=40)
)
msgpack_bytes = st.binary(max_size=300) | st.builds(
    lambda b: b"\x81\xa7content\xd9" + bytes([len(b)]) + b, st.binary(max_size=40)
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(json_bytes)
def test_arbitrary_bytes_to_decode_json_give_a_message_or_frame_error(data: bytes) -> None:
    _decodes_or_frame_error(decode_json, data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_bytes)
def test_arbitrary_bytes_to_decode_msgpack_give_a_message_or_frame_error(data: bytes) -> None:
    _decodes_or_frame_error(decode_msgpack, data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
field_names = st.sampled_from(
    ["id", "userid", "cmd", "dstid", "media", "content", "pic", "url", "memo", "amount", "cid",
     "ts"]
)


@given(st.dictionaries(field_names, json_values, max_size=12))
def test_objects_with_seed_fields_of_any_value_decode_or_frame_error(fields) -> None:
    """Structured fuzz: right field names, any values (reaches deeper than bytes)."""
    _decodes_or_frame_error(decode_json, json.dumps(fields).encode())
    _decodes_or_frame_error(decode_msgpack, msgspec.msgpack.encode(fields))


wide_ints = st.integers(-(2**63), 2**64 - 1)


@given(
    st.fixed_dictionaries(
        {"cmd": st.sampled_from([0, 4])},
        optional={k: wide_ints for k in ("id", "userid", "dstid", "media", "amount", "ts")},
    )
)
def test_a_decoded_message_has_only_int64_integers(fields) -> None:
    """Whatever decodes is storable: no integer field outside SQLite's int64."""
    for decode, data in ((decode_json, json.dumps(fields).encode()),
                         (decode_msgpack, msgspec.msgpack.encode(fields))):
        try:
            msg = decode(data)
        except FrameError:
            continue
        for name in ("id", "userid", "cmd", "dstid", "media", "amount", "ts"):
            assert INT64_MIN <= getattr(msg, name) <= INT64_MAX, name


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                  1013, 1014, 3000, 3999, 4000, 4999])
def test_close_codes_a_peer_may_send(code: int) -> None:
    assert valid_close_code(code)


@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_close_codes_that_fail_the_connection(code: int) -> None:
    assert not valid_close_code(code)


def test_a_text_frame_decodes_from_its_text_as_from_its_bytes() -> None:
    raw = '{"cmd":10,"dstid":2,"media":1,"content":"é世","cid":"t"}'
    assert decode_json(raw) == decode_json(raw.encode())
    err = frame_error(decode_json, '{"cmd": "ten", "cid": "t9"}')
    assert (err.code, err.cid) == (ERR_BAD_FRAME, "t9")
