"""What every HTTP API handler shares: the context, the reply envelope, input
fields and authentication.

Replies keep the seed's envelope ``{"code": 0|-1, "msg": "...", "data": ...}``;
a list is ``{"rows": [...], "total": N}`` both inside ``data`` and, as the
seed wrote it, at the top level. A refused call answers ``code: -1`` with an
HTTP status that says why (400 bad field, 401 no or bad token, 403 not
allowed, 404 unknown, 409 duplicate, 413 too large, 415 unsupported type).

Inputs come from the query string and the body (form-urlencoded, multipart
text fields or a JSON object), the body winning; ``parse_request`` checks
them against the call's request type in ``chatd.api_schema``, which also
holds the reply types. The acting user is always
the token's: ``Authorization: Bearer TOKEN`` or the seed's ``token`` field; a
``userid`` field that names someone else is refused (403).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from chatd import api_schema
from chatd.auth import TokenChecker
from chatd.bus import Control
from chatd.config import Config
from chatd.errors import AuthError, ChatdError
from chatd.store import Store

log = logging.getLogger("chatd.api")

#: largest JSON or form body (uploads are counted separately)
MAX_BODY_BYTES: Final = 64 * 1024

Fields = Mapping[str, Any]
S = TypeVar("S", bound=msgspec.Struct)


class ApiError(ChatdError):
    """A call that is refused; answered with ``status`` and ``code: -1``."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


@dataclasses.dataclass
class Ctx:
    """The API's state, shared by every handler (``request.app[CTX]``)."""

    cfg: Config
    store: Store
    secret: bytes
    #: the node's log: group joins and leaves, revocations go through it
    control: Control
    executor: Executor
    media_dir: Path
    max_upload_bytes: int
    #: the chat websocket's port, for clients (``/config.json``, the page's CSP)
    chat_port: int = 0
    #: checks signature and expiry; revocation is checked against the store
    checker: TokenChecker = dataclasses.field(init=False)
    #: a hash to verify against when a mobile is unknown, so login takes as long
    dummy_hash: str = ""
    #: the node's latest figures from the supervisor (``metrics.SnapshotCollector``)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checker = TokenChecker(self.secret)


CTX: Final = web.AppKey("chatd.api", Ctx)

_encode = msgspec.json.Encoder().encode


def reply(status: int, body: Any) -> web.Response:
    """A JSON reply: a Struct of ``chatd.api_schema`` or a plain document."""
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def ok(body: msgspec.Struct) -> web.Response:
    """A call that succeeded: ``body`` is its reply envelope (``api_schema.*Reply``)."""
    return reply(200, body)


def fail(status: int, msg: str) -> web.Response:
    return reply(status, api_schema.ErrorReply(code=-1, msg=msg))


# --- input fields ----------------------------------------------------------------


async def read_fields(request: web.Request) -> dict[str, Any]:
    """The call's input: query string, then the form or JSON body over it."""
    fields: dict[str, Any] = dict(request.query)
    if request.method not in ("POST", "PUT") or not request.body_exists:
        return fields
    ctype = request.content_type
    if ctype == "application/json":
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        fields.update(body)
    elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data", ""):
        form = await request.post()
        for key, value in form.items():
            if isinstance(value, str):
                fields[key] = value
    else:
        raise ApiError(415, f"unsupported body type {ctype}")
    return fields


def parse_request(fields: Fields, kind: type[S]) -> S:
    """The call's ``fields`` as request type ``kind`` (``chatd.api_schema``); 400 if
    they do not fit, with the field's name and why."""
    try:
        return api_schema.parse(fields, kind)
    except api_schema.SchemaError as exc:
        raise ApiError(400, str(exc)) from None


# --- authentication ----------------------------------------------------------------


def token_of(request: web.Request, fields: Fields) -> str:
    """The call's token: the Bearer header, else the seed's ``token`` field."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = fields.get("token")
    return token if isinstance(token, str) else ""


async def authenticate(request: web.Request, fields: Fields) -> int:
    """The acting user's id, from the token; ``ApiError`` 401/403 if there is none.

    The token must be well signed, unexpired and of the user's current token
    version (a revoked one is refused at once, by any API worker, because the
    version is read from the store); a ``userid`` field must name the same user.
    """
    ctx = request.app[CTX]
    token = token_of(request, fields)
    if not token:
        raise ApiError(401, "a token is required")
    try:
        uid = ctx.checker.check(token)
        version = int(token.split(".")[2])
    except (AuthError, ValueError) as exc:
        raise ApiError(401, f"bad token: {exc}") from None
    user = await ctx.store.user_by_id(uid)
    if user is None:
        raise ApiError(401, "bad token: no such user")
    if user.banned:
        raise ApiError(403, "this user is banned")
    if version != user.token_version:
        raise ApiError(401, "bad token: token revoked")
    claimed = fields.get("userid")
    if claimed not in (None, "") and str(claimed).strip() != str(uid):
        raise ApiError(403, "userid does not match the token")
    return uid


async def in_executor(ctx: Ctx, fn: Any, *args: Any) -> Any:
    """Run blocking ``fn(*args)`` in the API's worker pool."""
    return await asyncio.get_running_loop().run_in_executor(ctx.executor, fn, *args)
