"""HTTP API: accounts. Register, log in, find a user, refresh and revoke tokens.

Passwords are hashed and checked with scrypt (``chatd.auth``) in a worker
thread, never on the event loop. Login answers the same way, after the same
work, whether the mobile number is unknown or the password is wrong.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from chatd import auth
from chatd.api_common import CTX, ApiError, Ctx, authenticate, ok, parse_request, read_fields
from chatd.api_schema import (
    AuthRequest,
    FindRequest,
    LoginRequest,
    Me,
    MeReply,
    RegisterRequest,
    Revoked,
    RevokedReply,
    TokenInfo,
    TokenReply,
    User,
    UserReply,
)
from chatd.store import UserRecord

LOGIN_FAILED: Final = "wrong mobile number or password"


def public_profile(user: UserRecord) -> User:
    """What anyone may see of a user: never the password hash, mobile or token state."""
    return User(id=user.id, nickname=user.nickname, avatar=user.avatar,
                sex=user.sex, memo=user.memo)


def own_profile(user: UserRecord, token: str) -> Me:
    """What the user sees of itself at login: the public profile, mobile and token."""
    return Me(id=user.id, nickname=user.nickname, avatar=user.avatar,
              sex=user.sex, memo=user.memo, mobile=user.mobile,
              createat=user.created_ms, token=token)


def _issue(ctx: Ctx, uid: int, version: int) -> str:
    return auth.issue_token(ctx.secret, uid, version, ctx.cfg.token_ttl_s)


async def _hash(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, auth.hash_password, password)


async def _verify(password: str, stored: str) -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, auth.verify_password, password, stored)


async def handle_register(request: web.Request) -> web.Response:
    """mobile, passwd, nickname, avatar, sex -> the new user and a token (409 if taken)."""
    ctx = request.app[CTX]
    req = parse_request(await read_fields(request), RegisterRequest)
    # cheap refusal first; the UNIQUE index still decides a race
    if await ctx.store.user_by_mobile(req.mobile) is not None:
        raise ApiError(409, "this mobile number is already registered")
    uid = await ctx.store.add_user(req.mobile, await _hash(req.passwd), req.nickname,
                                   req.avatar, req.sex)
    if uid is None:
        raise ApiError(409, "this mobile number is already registered")
    user = await ctx.store.user_by_id(uid)
    assert user is not None
    me = own_profile(user, _issue(ctx, uid, user.token_version))
    return ok(MeReply(msg="registered", data=me))


async def handle_login(request: web.Request) -> web.Response:
    """mobile, passwd -> the user and a fresh token; one answer for every failure."""
    ctx = request.app[CTX]
    req = parse_request(await read_fields(request), LoginRequest)
    user = await ctx.store.user_by_mobile(req.mobile)
    if user is None:
        # the same work as a wrong password, so timing does not tell which it was
        await _verify(req.passwd, ctx.dummy_hash)
        raise ApiError(401, LOGIN_FAILED)
    if not await _verify(req.passwd, user.passwd):
        raise ApiError(401, LOGIN_FAILED)
    if user.banned:
        raise ApiError(403, "this user is banned")
    return ok(MeReply(data=own_profile(user, _issue(ctx, user.id, user.token_version))))


async def handle_find(request: web.Request) -> web.Response:
    """id -> that user's public profile (404 if none)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    await authenticate(request, fields)
    req = parse_request(fields, FindRequest)
    user = await ctx.store.user_by_id(req.uid)
    if user is None:
        raise ApiError(404, "no such user")
    return ok(UserReply(data=public_profile(user)))


async def handle_refresh(request: web.Request) -> web.Response:
    """A new token (new expiry, same version) for the caller."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    parse_request(fields, AuthRequest)
    user = await ctx.store.user_by_id(uid)
    if user is None:
        raise ApiError(401, "no such user")
    token = _issue(ctx, uid, user.token_version)
    return ok(TokenReply(data=TokenInfo(id=uid, token=token, expires_in=ctx.cfg.token_ttl_s)))


async def handle_revoke(request: web.Request) -> web.Response:
    """Void every token of the caller (this one too) and close its live connections."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    parse_request(fields, AuthRequest)
    await ctx.control.revoke_tokens(uid)
    return ok(RevokedReply(msg="every token of this user is revoked; log in again",
                           data=Revoked(id=uid)))
