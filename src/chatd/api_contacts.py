"""HTTP API: friends, groups (the seed's "communities") and history pages.

A membership change goes through the node's log (``ctx.control``), which
commits it at its place in the order of the messages: the user's live
connections enter or leave the group's stream exactly there, with every
group message committed after a join and none after a leave.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import web

from chatd.api_accounts import MAX_URL_CHARS, public_profile
from chatd.api_common import (
    CTX,
    ApiError,
    authenticate,
    integer,
    ok,
    ok_list,
    read_fields,
    text,
)
from chatd.errors import NotFoundError

MAX_GROUP_NAME_CHARS: Final = 64
MAX_MEMO_CHARS: Final = 1024
#: most messages in one history page
MAX_HISTORY_PAGE: Final = 200
DEFAULT_HISTORY_PAGE: Final = 50
_NO_BOUND: Final = (1 << 63) - 1


def group_view(row: dict[str, Any]) -> dict[str, Any]:
    """A group as the seed's clients read it."""
    return {
        "id": row["id"],
        "name": row["name"],
        "ownerid": row["ownerid"],
        "icon": row["icon"],
        "cate": row["cate"],
        "memo": row["memo"],
        "createat": row["created_ms"],
    }


async def handle_addfriend(request: web.Request) -> web.Response:
    """dstid -> friendship both ways (idempotent); not with oneself, not with nobody."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    dstid = integer(fields, "dstid")
    if dstid == uid:
        raise ApiError(400, "you cannot befriend yourself")
    try:
        added = await ctx.store.add_friend(uid, dstid)
    except NotFoundError:
        raise ApiError(404, "no such user") from None
    return ok({"id": dstid, "added": added}, "friend added" if added else "already friends")


async def handle_loadfriend(request: web.Request) -> web.Response:
    """The caller's friends (public profiles)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    return ok_list([public_profile(u) for u in await ctx.store.friends(uid)])


async def handle_createcommunity(request: web.Request) -> web.Response:
    """name, icon, cate, memo -> a group owned by the caller, who is its first member."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    owner = fields.get("ownerid")
    if owner not in (None, "") and str(owner).strip() != str(uid):
        raise ApiError(403, "ownerid does not match the token")
    name = text(fields, "name", required=True, max_chars=MAX_GROUP_NAME_CHARS)
    icon = text(fields, "icon", max_chars=MAX_URL_CHARS)
    cate = integer(fields, "cate", required=False, low=0, high=1 << 31)
    memo = text(fields, "memo", max_chars=MAX_MEMO_CHARS)
    try:
        gid = await ctx.control.create_group(name, uid, icon, cate, memo)
    except NotFoundError:
        raise ApiError(401, "no such user") from None
    row = await ctx.store.group_by_id(gid)
    assert row is not None
    return ok(group_view(row), "group created")


async def handle_joincommunity(request: web.Request) -> web.Response:
    """dstid (a group) -> the caller is a member; live connections enter it at once."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    gid = integer(fields, "dstid")
    try:
        added = await ctx.control.join_group(gid, uid)
    except NotFoundError:
        raise ApiError(404, "no such group") from None
    return ok({"id": gid, "joined": added}, "joined" if added else "already a member")


async def handle_quitcommunity(request: web.Request) -> web.Response:
    """dstid (a group) -> the caller leaves it; its live connections stop receiving it."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    gid = integer(fields, "dstid")
    group = await ctx.store.group_by_id(gid)
    if group is None:
        raise ApiError(404, "no such group")
    if group["ownerid"] == uid:
        raise ApiError(403, "the owner cannot leave the group")
    if not await ctx.control.leave_group(gid, uid):
        raise ApiError(404, "you are not a member of this group")
    return ok({"id": gid}, "left the group")


async def handle_loadcommunity(request: web.Request) -> web.Response:
    """The groups the caller is a member of."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    return ok_list([group_view(g) for g in await ctx.store.groups_of(uid)])


async def handle_members(request: web.Request) -> web.Response:
    """dstid (a group the caller is in) -> its members (public profiles)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    key = "gid" if fields.get("gid") not in (None, "") else "dstid"
    gid = integer(fields, key)
    if await ctx.store.group_by_id(gid) is None:
        raise ApiError(404, "no such group")
    if await ctx.store.joined_id(gid, uid) is None:
        raise ApiError(403, "you are not a member of this group")
    return ok_list([public_profile(u) for u in await ctx.store.members_of(gid)])


async def handle_history(request: web.Request) -> web.Response:
    """A page of a conversation the caller is part of, oldest first.

    ``dstid`` (a user: the private conversation with them) or ``gid`` (a group
    the caller is in: only what was sent since the caller joined); ``before``
    and/or ``after`` a message id (exclusive); ``limit`` up to 200. With only
    ``after`` the page is the oldest messages after it, otherwise the newest
    before ``before``. ``data.more`` says whether the range holds more.
    """
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    limit = integer(fields, "limit", required=False, default=DEFAULT_HISTORY_PAGE,
                    high=MAX_HISTORY_PAGE)
    after = integer(fields, "after", required=False, default=0, low=0)
    before = integer(fields, "before", required=False, default=_NO_BOUND)
    newest = fields.get("after") in (None, "") or fields.get("before") not in (None, "")
    has_gid = fields.get("gid") not in (None, "")
    has_dst = fields.get("dstid") not in (None, "")
    if has_gid == has_dst:
        raise ApiError(400, "give exactly one of dstid (a user) or gid (a group)")
    store = ctx.store
    if has_gid:
        gid = integer(fields, "gid")
        if await store.group_by_id(gid) is None:
            raise ApiError(404, "no such group")
        joined = await store.joined_id(gid, uid)
        if joined is None:
            raise ApiError(403, "you are not a member of this group")
        rows = await store.group_history(gid, max(after, joined), before, limit + 1, newest)
    else:
        peer = integer(fields, "dstid")
        if await store.user_by_id(peer) is None:
            raise ApiError(404, "no such user")
        rows = await store.private_history(uid, peer, after, before, limit + 1, newest)
    more = len(rows) > limit
    if more:
        rows = rows[1:] if newest else rows[:-1]
    return ok_list([msgspec.to_builtins(m) for m in rows], more=more)
