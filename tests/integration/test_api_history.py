"""HTTP API: history pages (``/chat/history``). Messages are sent through the
real shard by websocket clients, then read back over HTTP."""

from __future__ import annotations

import api_helpers
from api_helpers import Api
from conftest import connect, send_acked

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


async def _ids(api: Api, token: str, **fields: object) -> list[int]:
    data = await api.ok("/chat/history", data=fields, token=token)
    assert data["total"] == len(data["rows"])
    return [m["id"] for m in data["rows"]]


async def test_private_history_pages(api: Api) -> None:
    a, a_token = await api.user()
    b, b_token = await api.user()
    c, c_token = await api.user()
    ca, cb, cc = [await connect(api.node.url(u)) for u in (a, b, c)]
    ab = [x["id"] for x in await send_acked(ca, b, 5, prefix="ab")]
    ba = [x["id"] for x in await send_acked(cb, a, 2, prefix="ba")]
    other = [x["id"] for x in await send_acked(cc, a, 1, prefix="ca")]
    conv = sorted(ab + ba)

    assert await _ids(api, a_token, dstid=b) == conv
    assert await _ids(api, b_token, dstid=a) == conv
    # pages: the newest first page, then older ones with before, newer with after
    page = await api.ok("/chat/history", data={"dstid": b, "limit": 3}, token=a_token)
    assert [m["id"] for m in page["rows"]] == conv[-3:] and page["more"] is True
    assert await _ids(api, a_token, dstid=b, limit=3, before=conv[-3]) == conv[-6:-3]
    last = await api.ok("/chat/history", data={"dstid": b, "limit": 3, "before": conv[1]},
                        token=a_token)
    assert [m["id"] for m in last["rows"]] == conv[:1] and last["more"] is False
    assert await _ids(api, a_token, dstid=b, limit=2, after=conv[2]) == conv[3:5]
    assert await _ids(api, a_token, dstid=b, after=conv[1], before=conv[4]) == conv[2:4]
    # the message itself as stored, with the seed's field names
    msg = (await api.ok("/chat/history", data={"dstid": b, "limit": 1}, token=a_token))["rows"][0]
    assert msg["userid"] == b and msg["dstid"] == a and msg["cmd"] == 10 and msg["ts"] > 0
    # c sees only its own conversation with a, never a's with b
    assert await _ids(api, c_token, dstid=a) == other
    assert await _ids(api, c_token, dstid=b) == []
    for client in (ca, cb, cc):
        client.tr.disconnect()


async def test_group_history_only_for_members_since_joining(api: Api) -> None:
    a, a_token = await api.user()
    b, b_token = await api.user()
    late, late_token = await api.user()
    stranger, stranger_token = await api.user()
    gid = await api.node.group(a, b)
    ca = await connect(api.node.url(a))
    before_join = [x["id"] for x in await send_acked(ca, gid, 3, cmd=11, prefix="g1")]
    await api.ok("/contact/joincommunity", data={"dstid": gid}, token=late_token)
    after_join = [x["id"] for x in await send_acked(ca, gid, 2, cmd=11, prefix="g2")]

    assert await _ids(api, b_token, gid=gid) == before_join + after_join
    assert await _ids(api, late_token, gid=gid) == after_join
    assert await _ids(api, late_token, gid=gid, after=0, limit=200) == after_join
    status, body = await api.call("/chat/history", data={"gid": gid}, token=stranger_token)
    assert (status, body["code"]) == (403, -1)
    await api.ok("/contact/quitcommunity", data={"dstid": gid}, token=late_token)
    status, _ = await api.call("/chat/history", data={"gid": gid}, token=late_token)
    assert status == 403
    assert stranger and a_token
    ca.tr.disconnect()


async def test_history_refusals(api: Api) -> None:
    a, token = await api.user()
    for fields, want in [
        ({}, 400),
        ({"dstid": a, "gid": 1}, 400),
        ({"dstid": a, "limit": 201}, 400),
        ({"dstid": a, "limit": 0}, 400),
        ({"dstid": a, "before": "soon"}, 400),
        ({"dstid": a, "after": -1}, 400),
        ({"dstid": 9999}, 404),
        ({"gid": 9999}, 404),
    ]:
        status, body = await api.call("/chat/history", data=fields, token=token)
        assert (status, body["code"]) == (want, -1), fields
    status, _ = await api.call("/chat/history", data={"dstid": a})
    assert status == 401
    # GET with a query string works too
    status, body = await api.call(f"/chat/history?dstid={a}", method="GET", token=token)
    assert status == 200 and body["rows"] == []
