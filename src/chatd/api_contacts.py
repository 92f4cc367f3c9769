"""HTTP API: friends, groups (the seed's "communities") and history pages.

A membership change goes through the node's log (``ctx.control``), which
commits it at its place in the order of the messages: the user's live
connections enter or leave the group's stream exactly there, with every
group message committed after a join and none after a leave.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from chatd.api_accounts import public_profile
from chatd.api_common import CTX, ApiError, authenticate, ok, parse_request, read_fields
from chatd.api_schema import (
    AuthRequest,
    Befriended,
    BefriendedReply,
    CreateGroupRequest,
    Group,
    GroupList,
    GroupListReply,
    GroupReply,
    GroupRequest,
    HistoryPage,
    HistoryReply,
    HistoryRequest,
    Joined,
    JoinedReply,
    Left,
    LeftReply,
    MembersRequest,
    User,
    UserList,
    UserListReply,
    UserRequest,
)
from chatd.errors import NotFoundError
from chatd.store import GroupRecord

_NO_BOUND: Final = (1 << 63) - 1


def group_view(row: GroupRecord) -> Group:
    """A group as the seed's clients read it."""
    return Group(id=row.id, name=row.name, ownerid=row.ownerid, icon=row.icon,
                 cate=row.cate, memo=row.memo, createat=row.created_ms)


def _users(rows: list[User]) -> UserListReply:
    return UserListReply(data=UserList(rows=rows, total=len(rows)), rows=rows, total=len(rows))


async def handle_addfriend(request: web.Request) -> web.Response:
    """dstid -> friendship both ways (idempotent); not with oneself, not with nobody."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    dstid = parse_request(fields, UserRequest).dstid
    if dstid == uid:
        raise ApiError(400, "you cannot befriend yourself")
    try:
        added = await ctx.store.add_friend(uid, dstid)
    except NotFoundError:
        raise ApiError(404, "no such user") from None
    return ok(BefriendedReply(msg="friend added" if added else "already friends",
                              data=Befriended(id=dstid, added=added)))


async def handle_loadfriend(request: web.Request) -> web.Response:
    """The caller's friends (public profiles)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    parse_request(fields, AuthRequest)
    return ok(_users([public_profile(u) for u in await ctx.store.friends(uid)]))


async def handle_createcommunity(request: web.Request) -> web.Response:
    """name, icon, cate, memo -> a group owned by the caller, who is its first member."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    req = parse_request(fields, CreateGroupRequest)
    if req.ownerid is not None and req.ownerid != uid:
        raise ApiError(403, "ownerid does not match the token")
    try:
        gid = await ctx.control.create_group(req.name, uid, req.icon, req.cate, req.memo)
    except NotFoundError:
        raise ApiError(401, "no such user") from None
    row = await ctx.store.group_by_id(gid)
    assert row is not None
    return ok(GroupReply(msg="group created", data=group_view(row)))


async def handle_joincommunity(request: web.Request) -> web.Response:
    """dstid (a group) -> the caller is a member; live connections enter it at once."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    gid = parse_request(fields, GroupRequest).dstid
    try:
        added = await ctx.control.join_group(gid, uid)
    except NotFoundError:
        raise ApiError(404, "no such group") from None
    return ok(JoinedReply(msg="joined" if added else "already a member",
                          data=Joined(id=gid, joined=added)))


async def handle_quitcommunity(request: web.Request) -> web.Response:
    """dstid (a group) -> the caller leaves it; its live connections stop receiving it."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    gid = parse_request(fields, GroupRequest).dstid
    group = await ctx.store.group_by_id(gid)
    if group is None:
        raise ApiError(404, "no such group")
    if group.ownerid == uid:
        raise ApiError(403, "the owner cannot leave the group")
    if not await ctx.control.leave_group(gid, uid):
        raise ApiError(404, "you are not a member of this group")
    return ok(LeftReply(msg="left the group", data=Left(id=gid)))


async def handle_loadcommunity(request: web.Request) -> web.Response:
    """The groups the caller is a member of."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    parse_request(fields, AuthRequest)
    rows = [group_view(g) for g in await ctx.store.groups_of(uid)]
    return ok(GroupListReply(data=GroupList(rows=rows, total=len(rows)), rows=rows,
                             total=len(rows)))


async def handle_members(request: web.Request) -> web.Response:
    """dstid (a group the caller is in) -> its members (public profiles)."""
    ctx = request.app[CTX]
    fields = await read_fields(request)
    uid = await authenticate(request, fields)
    gid = parse_request(fields, MembersRequest).group
    if await ctx.store.group_by_id(gid) is None:
        raise ApiError(404, "no such group")
    if await ctx.store.joined_id(gid, uid) is None:
        raise ApiError(403, "you are not a member of this group")
    return ok(_users([public_profile(u) for u in await ctx.store.members_of(gid)]))


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
    req = parse_request(fields, HistoryRequest)
    limit = req.limit
    after = req.after or 0
    before = req.before if req.before is not None else _NO_BOUND
    store = ctx.store
    if req.gid is not None:
        gid = req.gid
        if await store.group_by_id(gid) is None:
            raise ApiError(404, "no such group")
        joined = await store.joined_id(gid, uid)
        if joined is None:
            raise ApiError(403, "you are not a member of this group")
        rows = await store.group_history(gid, max(after, joined), before, limit + 1, req.newest)
    else:
        assert req.dstid is not None
        peer = req.dstid
        if await store.user_by_id(peer) is None:
            raise ApiError(404, "no such user")
        rows = await store.private_history(uid, peer, after, before, limit + 1, req.newest)
    more = len(rows) > limit
    if more:
        rows = rows[1:] if req.newest else rows[:-1]
    page = HistoryPage(rows=rows, total=len(rows), more=more)
    return ok(HistoryReply(data=page, rows=rows, total=len(rows)))
