"""HTTP API: friends and groups, the seed's request shapes (form posts with
``userid``, ``token``, ``dstid``) and its list envelope."""

from __future__ import annotations

import asyncio

import api_helpers
from api_helpers import Api

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


async def _count(api: Api, sql: str, *params: object) -> int:
    async with api.store._r.execute(sql, params) as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_addfriend_both_ways_seed_form(api: Api) -> None:
    alice = await api.register("alice")
    bob = await api.register("bob")
    data = await api.ok("/contact/addfriend", data={
        "userid": alice["id"], "token": alice["token"], "dstid": bob["id"]})
    assert data == {"id": bob["id"], "added": True}
    status, body = await api.call("/contact/loadfriend",
                                  data={"userid": alice["id"], "token": alice["token"]})
    assert status == 200 and body["code"] == 0
    # the seed's clients read rows/total at the top; chatd's inside data too
    assert body["total"] == 1 and body["rows"][0]["id"] == bob["id"]
    assert body["data"]["rows"] == body["rows"] and body["data"]["total"] == 1
    assert "passwd" not in body["rows"][0] and "mobile" not in body["rows"][0]
    rows = (await api.ok("/contact/loadfriend", token=bob["token"]))["rows"]
    assert [r["id"] for r in rows] == [alice["id"]]


async def test_addfriend_is_idempotent_also_when_concurrent(api: Api) -> None:
    a, a_token = await api.user()
    b, b_token = await api.user()
    results = await asyncio.gather(
        *(api.call("/contact/addfriend", data={"dstid": b}, token=a_token) for _ in range(5)),
        *(api.call("/contact/addfriend", json={"dstid": a}, token=b_token) for _ in range(5)))
    assert all(s == 200 for s, _ in results)
    assert sum(body["data"]["added"] for _, body in results) == 1
    assert await _count(api, "SELECT count(*) FROM friends WHERE ownerid=? AND dstid=?", a, b) == 1
    assert await _count(api, "SELECT count(*) FROM friends WHERE ownerid=? AND dstid=?", b, a) == 1
    assert (await api.ok("/contact/loadfriend", token=a_token))["total"] == 1


async def test_addfriend_refusals(api: Api) -> None:
    a, token = await api.user()
    for fields, want in [({"dstid": a}, 400), ({"dstid": 9999}, 404), ({}, 400),
                         ({"dstid": "x"}, 400), ({"dstid": -3}, 400)]:
        status, body = await api.call("/contact/addfriend", data=fields, token=token)
        assert (status, body["code"]) == (want, -1), fields
    assert await _count(api, "SELECT count(*) FROM friends") == 0


async def test_groups_create_join_members_quit(api: Api) -> None:
    owner, owner_token = await api.user("owner")
    bob, bob_token = await api.user("bob")
    carol, carol_token = await api.user("carol")
    group = await api.ok("/contact/createcommunity", data={
        "userid": owner, "token": owner_token, "name": "hikers", "icon": "/i.png",
        "cate": "2", "memo": "we walk"})
    gid = group["id"]
    assert group["ownerid"] == owner and group["name"] == "hikers" and group["cate"] == 2
    rows = (await api.ok("/contact/loadcommunity", token=owner_token))["rows"]
    assert [g["id"] for g in rows] == [gid]

    assert (await api.ok("/contact/joincommunity", data={
        "userid": bob, "token": bob_token, "dstid": gid}))["joined"] is True
    assert (await api.ok("/contact/joincommunity", data={"dstid": gid}, token=bob_token)
            )["joined"] is False
    members = await api.ok("/contact/members", data={"dstid": gid}, token=bob_token)
    assert [m["id"] for m in members["rows"]] == [owner, bob] and members["total"] == 2

    status, _ = await api.call("/contact/members", data={"dstid": gid}, token=carol_token)
    assert status == 403
    status, _ = await api.call("/contact/quitcommunity", data={"dstid": gid}, token=carol_token)
    assert status == 404
    status, _ = await api.call("/contact/quitcommunity", data={"dstid": gid}, token=owner_token)
    assert status == 403

    await api.ok("/contact/quitcommunity", data={"dstid": gid}, token=bob_token)
    assert (await api.ok("/contact/loadcommunity", token=bob_token))["rows"] == []
    members = await api.ok("/contact/members", data={"dstid": gid}, token=owner_token)
    assert [m["id"] for m in members["rows"]] == [owner]


async def test_group_refusals(api: Api) -> None:
    uid, token = await api.user()
    other, _ = await api.user()
    cases = [
        ("/contact/createcommunity", {}, 400),
        ("/contact/createcommunity", {"name": "x" * 65}, 400),
        ("/contact/createcommunity", {"name": "g", "cate": "many"}, 400),
        ("/contact/createcommunity", {"name": "g", "ownerid": other}, 403),
        ("/contact/joincommunity", {"dstid": 4242}, 404),
        ("/contact/joincommunity", {}, 400),
        ("/contact/quitcommunity", {"dstid": 4242}, 404),
        ("/contact/members", {"dstid": 4242}, 404),
    ]
    for path, fields, want in cases:
        status, body = await api.call(path, data=fields, token=token)
        assert (status, body["code"]) == (want, -1), (path, fields, body)
    status, _ = await api.call("/contact/createcommunity", data={"name": "g"})
    assert status == 401
    assert await _count(api, "SELECT count(*) FROM communities") == 0
