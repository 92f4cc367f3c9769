"""HTTP API: accounts. Register, log in, find a user, refresh and revoke tokens.

Passwords are hashed and checked with scrypt (``chatd.auth``) in a worker
thread, never on the event loop. Login answers the same way, after the same
work, whether the mobile number is unknown or the password is wrong.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Final

from aiohttp import web

from chatd import auth
from chatd.api_common import CTX, ApiError, Ctx, authenticate, integer, ok, read_fields, text

MAX_MOBILE_CHARS: Final = 32
MIN_PASSWD_CHARS: Final = 6
MAX_PASSWD_CHARS: Final = 128
MAX_NICKNAME_CHARS: Final = 64
MAX_URL_CHARS: Final = 2048
SEXES: Final = frozenset({"M", "W", "F", "U"})
_MOBILE_RE: Final = re.compile(r"\+?[0-9A-Za-z_.@-]{1,32}")
LOGIN_FAILED: Final = "wrong mobile number or password"


def public_profile(user: dict[str, Any]) -> dict[str, Any]:
    """What anyone may see of a user: never the password hash, mobile or token state."""
    return {
        "id": user["id"],
        "nickname": user["nickname"],
        "avatar": user["avatar"],
        "sex": user["sex"],
        "memo": user["memo"],
    }


def own_profile(user: dict[str, Any], token: str) -> dict[str, Any]:
    """What the user sees of itself at login: the public profile, mobile and token."""
    return {
        **public_profile(user),
        "mobile": user["mobile"],
        "createat": user["created_ms"],
        "token": token,
    }


def _issue(ctx: Ctx, uid: int, version: int) -> str:
    return auth.issue_token(ctx.secret, uid, version, ctx.cfg.token_ttl_s)


async def _hash(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, auth.hash_password, password)


async def _verify(password: str, stored: str) -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, auth.verify_password, password, stored)


def _credentials(fields: dict[str, Any]) -> tuple[str, str]:
    mobile = text(fields, "mobile", required=True, max_chars=MAX_MOBILE_CHARS)
    passwd = fields.get("passwd")
    if not isinstance(passwd, str) or not passwd:
        raise ApiError(400, "passwd is required")
    if len(passwd) > MAX_PASSWD_CHARS:
        raise ApiError(400, f"passwd is longer than {MAX_PASSWD_CHARS} characters")
    return mobile, passwd


async def handle_register(request: web.Request) -> web.Response:
    """mobile, passwd, nickname, avatar, sex -> the new user and a token (409 if taken)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    mobile, passwd = _credentials(fields)
    if not _MOBILE_RE.fullmatch(mobile):
        raise ApiError(400, "mobile may hold only digits, letters and + _ . @ -")
    if len(passwd) < MIN_PASSWD_CHARS:
        raise ApiError(400, f"passwd must have at least {MIN_PASSWD_CHARS} characters")
    nickname = text(fields, "nickname", max_chars=MAX_NICKNAME_CHARS)
    avatar = text(fields, "avatar", max_chars=MAX_URL_CHARS)
    sex = text(fields, "sex", max_chars=1, default="U").upper()
    if sex not in SEXES:
        raise ApiError(400, "sex must be M, W, F or U")
    # cheap refusal first; the UNIQUE index still decides a race
    if await ctx.store.user_by_mobile(mobile) is not None:
        raise ApiError(409, "this mobile number is already registered")
    uid = await ctx.store.add_user(mobile, await _hash(passwd), nickname, avatar, sex)
    if uid is None:
        raise ApiError(409, "this mobile number is already registered")
    user = await ctx.store.user_by_id(uid)
    assert user is not None
    return ok(own_profile(user, _issue(ctx, uid, user["token_version"])), "registered")


async def handle_login(request: web.Request) -> web.Response:
    """mobile, passwd -> the user and a fresh token; one answer for every failure."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    mobile, passwd = _credentials(fields)
    user = await ctx.store.user_by_mobile(mobile)
    if user is None:
        # the same work as a wrong password, so timing does not tell which it was
        await _verify(passwd, ctx.dummy_hash)
        raise ApiError(401, LOGIN_FAILED)
    if not await _verify(passwd, user["passwd"]):
        raise ApiError(401, LOGIN_FAILED)
    if user["banned"]:
        raise ApiError(403, "this user is banned")
    return ok(own_profile(user, _issue(ctx, user["id"], user["token_version"])))


async def handle_find(request: web.Request) -> web.Response:
    """id -> that user's public profile (404 if none)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    await authenticate(request, fields)
    key = "id" if fields.get("id") not in (None, "") else "dstid"
    user = await ctx.store.user_by_id(integer(fields, key))
    if user is None:
        raise ApiError(404, "no such user")
    return ok(public_profile(user))


async def handle_refresh(request: web.Request) -> web.Response:
    """A new token (new expiry, same version) for the caller."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    user = await ctx.store.user_by_id(uid)
    if user is None:
        raise ApiError(401, "no such user")
    token = _issue(ctx, uid, user["token_version"])
    return ok({"id": uid, "token": token, "expires_in": ctx.cfg.token_ttl_s})


async def handle_revoke(request: web.Request) -> web.Response:
    """Void every token of the caller (this one too) and close its live connections."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    await ctx.control.revoke_tokens(uid)
    return ok({"id": uid}, "every token of this user is revoked; log in again")
