"""What every HTTP API handler shares: the context, the reply envelope, input
fields and authentication.

Replies keep the seed's envelope ``{"code": 0|-1, "msg": "...", "data": ...}``;
a list is ``{"rows": [...], "total": N}`` both inside ``data`` and, as the
seed wrote it, at the top level. A refused call answers ``code: -1`` with an
HTTP status that says why (400 bad field, 401 no or bad token, 403 not
allowed, 404 unknown, 409 duplicate, 413 too large, 415 unsupported type).

Inputs come from the query string and the body (form-urlencoded, multipart
text fields or a JSON object), the body winning. The acting user is always
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
from typing import Any, Final

import msgspec
from aiohttp import web

from chatd.auth import TokenChecker
from chatd.bus import Control
from chatd.config import Config
from chatd.errors import AuthError, ChatdError
from chatd.store import Store

log = logging.getLogger("chatd.api")

#: largest JSON or form body (uploads are counted separately)
MAX_BODY_BYTES: Final = 64 * 1024
MAX_TEXT_CHARS: Final = 2048

Fields = Mapping[str, Any]


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


def reply(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def ok(data: Any = None, msg: str = "") -> web.Response:
    """The success envelope around ``data``."""
    return reply(200, {"code": 0, "msg": msg, "data": data})


def ok_list(rows: list[Any], **extra: Any) -> web.Response:
    """The success envelope of a list (seed clients read ``rows``/``total`` at the top)."""
    data = {"rows": rows, "total": len(rows), **extra}
    return reply(200, {"code": 0, "msg": "", "data": data, "rows": rows, "total": len(rows)})


def fail(status: int, msg: str) -> web.Response:
    return reply(status, {"code": -1, "msg": msg, "data": None})


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


def text(fields: Fields, name: str, *, required: bool = False, max_chars: int = MAX_TEXT_CHARS,
         default: str = "") -> str:
    """A text field, stripped; 400 if missing (when required), not text, or too long."""
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise ApiError(400, f"{name} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ApiError(400, f"{name} must be text")
    value = str(value).strip()
    if required and not value:
        raise ApiError(400, f"{name} is required")
    if len(value) > max_chars:
        raise ApiError(400, f"{name} is longer than {max_chars} characters")
    return value


def integer(fields: Fields, name: str, *, required: bool = True, default: int = 0,
            low: int = 1, high: int = (1 << 63) - 1) -> int:
    """An integer field (a number or its decimal text) in ``low..high``; 400 if not."""
    value = fields.get(name)
    if value is None or value == "":
        if required:
            raise ApiError(400, f"{name} is required")
        return default
    if isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer")
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise ApiError(400, f"{name} must be an integer") from None
    if not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer")
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return value


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
    if user["banned"]:
        raise ApiError(403, "this user is banned")
    if version != user["token_version"]:
        raise ApiError(401, "bad token: token revoked")
    claimed = fields.get("userid")
    if claimed not in (None, "") and str(claimed).strip() != str(uid):
        raise ApiError(403, "userid does not match the token")
    return uid


async def in_executor(ctx: Ctx, fn: Any, *args: Any) -> Any:
    """Run blocking ``fn(*args)`` in the API's worker pool."""
    return await asyncio.get_running_loop().run_in_executor(ctx.executor, fn, *args)
