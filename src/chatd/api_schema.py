"""The HTTP API's one schema: every request and reply body as a msgspec Struct.

The server validates each call's input with these types (``parse``), builds
its replies from them, and generates ``/openapi.json`` from them
(``chatd.api_openapi``); the Python SDK (``chatd.client``) sends and decodes
the same types. So a field cannot be accepted, answered or documented in one
place and not the others.

Input arrives as form fields (text) or a JSON object; ``parse`` makes both
fit: text is stripped (passwords excepted), empty text counts as absent,
decimal text becomes an integer and a JSON number becomes text where the
field is text, as the seed's forms need. Anything else that does not fit
is refused with 400 and the field's name.

This module is pure: it imports msgspec and chatd's wire schema, nothing
that does I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Generic, TypeVar

import msgspec

from chatd.wire import Message

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

MAX_MOBILE_CHARS: Final = 32
MIN_PASSWD_CHARS: Final = 6
MAX_PASSWD_CHARS: Final = 128
MAX_NICKNAME_CHARS: Final = 64
MAX_URL_CHARS: Final = 2048
MAX_GROUP_NAME_CHARS: Final = 64
MAX_MEMO_CHARS: Final = 1024
#: most messages in one history page
MAX_HISTORY_PAGE: Final = 200
DEFAULT_HISTORY_PAGE: Final = 50
MOBILE_PATTERN: Final = r"^\+?[0-9A-Za-z_.@-]{1,32}$"
SEXES: Final = frozenset({"M", "W", "F", "U"})
INT64_MAX: Final = (1 << 63) - 1

Id = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX, description="a user, group or message id")]
Url = Annotated[str, msgspec.Meta(max_length=MAX_URL_CHARS)]


class SchemaError(ValueError):
    """Input that does not fit its request type; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        sep = " " if reason.startswith("is ") else ": "
        super().__init__(f"{field}{sep}{reason}" if field else reason)
        self.field = field
        self.reason = reason


# --- requests ----------------------------------------------------------------------


class Request(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Base of every request body."""

    #: fields whose text is taken as it is, never stripped
    RAW: ClassVar[frozenset[str]] = frozenset()


class Authed(Request, kw_only=True):
    """Base of the calls that need a token. ``userid`` and ``token`` are the
    seed's way to authenticate (a Bearer header does the same); ``userid``
    must be the token's user."""

    userid: Annotated[int | None, msgspec.Meta(
        description="the caller's id (seed form; must match the token)")] = None
    token: Annotated[str, msgspec.Meta(
        description="the token (seed form; or the Authorization: Bearer header)")] = ""


class RegisterRequest(Request, kw_only=True):
    """Create an account."""

    RAW: ClassVar[frozenset[str]] = frozenset({"passwd"})

    mobile: Annotated[str, msgspec.Meta(
        pattern=MOBILE_PATTERN, description="mobile number, the login name: digits, "
        "letters and + _ . @ -, at most 32")]
    passwd: Annotated[str, msgspec.Meta(
        min_length=MIN_PASSWD_CHARS, max_length=MAX_PASSWD_CHARS,
        description="password, 6 to 128 characters")]
    nickname: Annotated[str, msgspec.Meta(max_length=MAX_NICKNAME_CHARS,
                                          description="display name")] = ""
    avatar: Annotated[Url, msgspec.Meta(description="avatar URL")] = ""
    sex: Annotated[str, msgspec.Meta(pattern="^[MWFUmwfu]$",
                                     description="M, W, F or U (unknown)")] = "U"

    def __post_init__(self) -> None:
        self.sex = self.sex.upper()


class LoginRequest(Request, kw_only=True):
    """Log in with mobile number and password."""

    RAW: ClassVar[frozenset[str]] = frozenset({"passwd"})

    mobile: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MOBILE_CHARS,
                                        description="mobile number")]
    passwd: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PASSWD_CHARS,
                                        description="password")]


class AuthRequest(Authed, kw_only=True):
    """A call that needs nothing but the caller's token."""


class FindRequest(Authed, kw_only=True):
    """A user by id (``dstid`` is accepted for ``id``, as some seed clients send it)."""

    id: Annotated[Id | None, msgspec.Meta(description="the user's id")] = None
    dstid: Annotated[Id | None, msgspec.Meta(description="the same, another name")] = None

    def __post_init__(self) -> None:
        if self.id is None and self.dstid is None:
            raise ValueError("id is required")

    @property
    def uid(self) -> int:
        uid = self.id if self.id is not None else self.dstid
        assert uid is not None
        return uid


class UserRequest(Authed, kw_only=True):
    """A call about another user."""

    dstid: Annotated[Id, msgspec.Meta(description="the other user's id")]


class GroupRequest(Authed, kw_only=True):
    """A call about a group (the seed names the group ``dstid``)."""

    dstid: Annotated[Id, msgspec.Meta(description="the group's id")]


class MembersRequest(Authed, kw_only=True):
    """The members of a group; ``gid`` is accepted for ``dstid``."""

    dstid: Annotated[Id | None, msgspec.Meta(description="the group's id")] = None
    gid: Annotated[Id | None, msgspec.Meta(description="the same, another name")] = None

    def __post_init__(self) -> None:
        if self.dstid is None and self.gid is None:
            raise ValueError("dstid is required")

    @property
    def group(self) -> int:
        gid = self.gid if self.gid is not None else self.dstid
        assert gid is not None
        return gid


class CreateGroupRequest(Authed, kw_only=True):
    """Create a group; the caller owns it."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GROUP_NAME_CHARS,
                                      description="group name")]
    icon: Annotated[Url, msgspec.Meta(description="icon URL")] = ""
    cate: Annotated[int, msgspec.Meta(ge=0, le=1 << 31, description="category")] = 0
    memo: Annotated[str, msgspec.Meta(max_length=MAX_MEMO_CHARS,
                                      description="description")] = ""
    ownerid: Annotated[int | None, msgspec.Meta(
        description="the owner (seed form; must be the caller)")] = None


class HistoryRequest(Authed, kw_only=True):
    """A page of a private conversation (``dstid``) or of a group (``gid``).

    With only ``after`` the page is the oldest messages after it, otherwise
    the newest before ``before`` (or the newest of all).
    """

    dstid: Annotated[Id | None, msgspec.Meta(
        description="the other user (private conversation)")] = None
    gid: Annotated[Id | None, msgspec.Meta(
        description="the group (only messages since the caller joined)")] = None
    before: Annotated[Id | None, msgspec.Meta(description="only messages with a smaller id")] = None
    after: Annotated[
        Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | None,
        msgspec.Meta(description="only messages with a larger id")] = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_HISTORY_PAGE,
                                       description="page size, 1 to 200")] = DEFAULT_HISTORY_PAGE

    def __post_init__(self) -> None:
        if (self.dstid is None) == (self.gid is None):
            raise ValueError("give exactly one of dstid (a user) or gid (a group)")

    @property
    def newest(self) -> bool:
        """Whether the page is the newest of its range (else the oldest)."""
        return self.after is None or self.before is not None


class UploadForm(Authed, kw_only=True):
    """The text fields that may ride with an upload's ``file`` part."""


# --- replies: the data ---------------------------------------------------------------


class User(msgspec.Struct, kw_only=True):
    """What anyone may see of a user (never the mobile or the password hash)."""

    id: int
    nickname: str = ""
    avatar: str = ""
    sex: str = "U"
    memo: str = ""


class Me(User, kw_only=True):
    """What a user sees of itself at register and login: with the mobile and a token."""

    mobile: str
    createat: Annotated[int, msgspec.Meta(description="ms since the epoch")] = 0
    token: Annotated[str, msgspec.Meta(
        description="for the Authorization header and the chat websocket")]


class TokenInfo(msgspec.Struct, kw_only=True):
    """A fresh token for the caller."""

    id: int
    token: str
    expires_in: Annotated[int, msgspec.Meta(description="seconds")]


class Revoked(msgspec.Struct, kw_only=True):
    """Every token of user ``id`` is void."""

    id: int


class Befriended(msgspec.Struct, kw_only=True):
    """The friendship with ``id``; ``added`` is false when it existed already."""

    id: int
    added: bool


class Joined(msgspec.Struct, kw_only=True):
    """Membership of group ``id``; ``joined`` is false when it existed already."""

    id: int
    joined: bool


class Left(msgspec.Struct, kw_only=True):
    """The caller left group ``id``."""

    id: int


class Group(msgspec.Struct, kw_only=True):
    """A group (the seed's "community")."""

    id: int
    name: str
    ownerid: int
    icon: str = ""
    cate: int = 0
    memo: str = ""
    createat: Annotated[int, msgspec.Meta(description="ms since the epoch")] = 0


class UserList(msgspec.Struct, kw_only=True):
    rows: list[User]
    total: int


class GroupList(msgspec.Struct, kw_only=True):
    rows: list[Group]
    total: int


class HistoryPage(msgspec.Struct, kw_only=True):
    """Messages oldest first; ``more``: the range holds more than this page."""

    rows: list[Message]
    total: int
    more: bool


# --- replies: the envelopes --------------------------------------------------------------


class Reply(msgspec.Struct, Generic[T], kw_only=True):
    """The seed's envelope: ``code`` 0 (done) or -1 (refused), ``msg``, ``data``."""

    code: Annotated[int, msgspec.Meta(description="0 done, -1 refused")] = 0
    msg: str = ""
    data: T


class ErrorReply(Reply[None], kw_only=True):
    """A refused call: ``code`` -1, ``msg`` says why, the HTTP status says the same."""

    data: None = None


class MeReply(Reply[Me], kw_only=True):
    pass


class UserReply(Reply[User], kw_only=True):
    pass


class TokenReply(Reply[TokenInfo], kw_only=True):
    pass


class RevokedReply(Reply[Revoked], kw_only=True):
    pass


class BefriendedReply(Reply[Befriended], kw_only=True):
    pass


class GroupReply(Reply[Group], kw_only=True):
    pass


class JoinedReply(Reply[Joined], kw_only=True):
    pass


class LeftReply(Reply[Left], kw_only=True):
    pass


class UserListReply(Reply[UserList], kw_only=True):
    """A list: ``rows`` and ``total`` also at the top, where the seed's clients read them."""

    rows: list[User]
    total: int


class GroupListReply(Reply[GroupList], kw_only=True):
    """A list: ``rows`` and ``total`` also at the top, where the seed's clients read them."""

    rows: list[Group]
    total: int


class HistoryReply(Reply[HistoryPage], kw_only=True):
    """A page: ``rows`` and ``total`` also at the top, where the seed's clients read them."""

    rows: list[Message]
    total: int


class UploadReply(Reply[str], kw_only=True):
    """A stored upload. ``data`` is its url, as the seed's clients read it; the
    details ride beside it."""

    url: str
    pic: Annotated[str, msgspec.Meta(description="the preview's url (images only)")] = ""
    media: Annotated[int, msgspec.Meta(description="the message media: 3, 4 or 8")]
    mime: str
    size: Annotated[int, msgspec.Meta(description="bytes")]
    width: int = 0
    height: int = 0


# --- plain (not enveloped) documents ------------------------------------------------


class ClientConfig(msgspec.Struct, kw_only=True):
    """What a client needs to find the chat websocket: it listens on the same
    host name as the api, on ``chat_port``, at ``ws_path``."""

    chat_port: int
    ws_path: str = "/chat"


class Health(msgspec.Struct, kw_only=True):
    status: Annotated[str, msgspec.Meta(description='"ok", or "error" with status 503')]


# --- the routes ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Route:
    """One enveloped call: its request and reply types, for the server and the docs."""

    summary: str
    request: type[Request]
    reply: type[msgspec.Struct]
    methods: tuple[str, ...] = ("POST",)
    auth: bool = True
    errors: tuple[int, ...] = (400,)
    multipart: bool = False


_READ: Final = ("GET", "POST")

ROUTES: Final[dict[str, Route]] = {
    "/user/register": Route(
        "Create an account; answers the user and a token", RegisterRequest, MeReply,
        auth=False, errors=(400, 409)),
    "/user/login": Route(
        "Log in; answers the user and a token (one answer for every failure)",
        LoginRequest, MeReply, auth=False, errors=(400, 401, 403)),
    "/user/find": Route("A user's public profile", FindRequest, UserReply, _READ,
                        errors=(400, 404)),
    "/user/refresh": Route("A new token for the caller", AuthRequest, TokenReply),
    "/user/revoke": Route(
        "Revoke every token of the caller; its live connections are closed (4501)",
        AuthRequest, RevokedReply),
    "/contact/addfriend": Route("Befriend a user (both ways, idempotent)", UserRequest,
                                BefriendedReply, errors=(400, 404)),
    "/contact/loadfriend": Route("The caller's friends", AuthRequest, UserListReply, _READ),
    "/contact/createcommunity": Route(
        "Create a group; the caller owns it and is its first member", CreateGroupRequest,
        GroupReply, errors=(400, 403)),
    "/contact/joincommunity": Route(
        "Join a group; live connections receive it at once", GroupRequest, JoinedReply,
        errors=(400, 404)),
    "/contact/quitcommunity": Route(
        "Leave a group (not its owner); live connections stop receiving it", GroupRequest,
        LeftReply, errors=(400, 403, 404)),
    "/contact/loadcommunity": Route("The groups the caller is a member of", AuthRequest,
                                    GroupListReply, _READ),
    "/contact/members": Route("Members of a group the caller is in", MembersRequest,
                              UserListReply, _READ, errors=(400, 403, 404)),
    "/chat/history": Route(
        "A page of a private conversation (dstid) or of a group (gid), oldest first",
        HistoryRequest, HistoryReply, _READ, errors=(400, 403, 404)),
    "/attach/upload": Route(
        "Upload an image, voice or video file (multipart field file)", UploadForm,
        UploadReply, errors=(400, 413, 415), multipart=True),
}


# --- parsing -----------------------------------------------------------------------------


@functools.cache
def _field_kinds(kind: type[msgspec.Struct]) -> dict[str, str]:
    """Each field of ``kind`` -> "str", "int" or "other", from msgspec's own view."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    out: dict[str, str] = {}
    for field in info.fields:
        t: Any = field.type
        while isinstance(t, msgspec.inspect.Metadata):
            t = t.type
        if isinstance(t, msgspec.inspect.UnionType):
            inner = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
            t = inner[0] if len(inner) == 1 else t
            while isinstance(t, msgspec.inspect.Metadata):
                t = t.type
        if isinstance(t, msgspec.inspect.StrType):
            out[field.encode_name] = "str"
        elif isinstance(t, msgspec.inspect.IntType):
            out[field.encode_name] = "int"
        else:
            out[field.encode_name] = "other"
    return out


_LOCATION: Final = re.compile(r"^(?P<why>.*?)(?: - at `\$\.(?P<field>[A-Za-z_]+)[^`]*`)?$")
_MISSING: Final = re.compile(r"^Object missing required field `(?P<field>[A-Za-z_]+)`$")


def _error(exc: msgspec.ValidationError) -> SchemaError:
    text = str(exc)
    missing = _MISSING.match(text)
    if missing:
        return SchemaError(missing["field"], "is required")
    m = _LOCATION.match(text)
    assert m is not None  # the pattern matches any text
    why = m["why"]
    return SchemaError(m["field"] or "", why[:1].lower() + why[1:])


def parse(fields: Mapping[str, Any], kind: type[S]) -> S:
    """The request ``fields`` as a ``kind``; ``SchemaError`` names what does not fit.

    ``fields`` are the call's query, form or JSON fields. Unknown fields are
    ignored (the seed's clients send more than they need).
    """
    kinds = _field_kinds(kind)
    raw: frozenset[str] = getattr(kind, "RAW", frozenset())
    clean: dict[str, Any] = {}
    for key, value in fields.items():
        want = kinds.get(key)
        if want is None:
            continue
        if isinstance(value, str):
            if key not in raw:
                value = value.strip()
            if value == "":
                continue  # an empty form field is an absent one
        elif want == "str" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a JSON number where the seed's form sends digits
        clean[key] = value
    try:
        return msgspec.convert(clean, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise _error(exc) from None


def dump(reply: msgspec.Struct) -> bytes:
    """The JSON body of a reply."""
    return _encode(reply)


_encode = msgspec.json.Encoder().encode
