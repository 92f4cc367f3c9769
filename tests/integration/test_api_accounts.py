"""HTTP API: register, login, find, refresh, revoke, a ban, the envelope and the
OpenAPI document, through real HTTP with the seed front-end's request shapes."""

from __future__ import annotations

import asyncio

import api_helpers
from api_helpers import Api
from conftest import Node, connect, http_request

from chatd import auth

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


async def test_register_then_login_seed_form(api: Api) -> None:
    user = await api.ok("/user/register", data={
        "mobile": "13900001111", "passwd": "secret1", "nickname": "alice", "sex": "W",
        "avatar": "/media/a.png"})
    assert user["mobile"] == "13900001111" and user["nickname"] == "alice"
    assert user["sex"] == "W" and user["avatar"] == "/media/a.png"
    assert "passwd" not in user and user["token"]
    status, body = await api.call("/user/login",
                                  data={"mobile": "13900001111", "passwd": "secret1"})
    assert status == 200 and body["code"] == 0 and body["data"]["id"] == user["id"]
    token = body["data"]["token"]
    assert auth.TokenChecker(api.node.secret).check(token, user["id"]) == user["id"]
    # the token opens the chat websocket
    client = await connect(api.node.url(user["id"], token))
    client.tr.disconnect()


async def test_register_and_login_json(api: Api) -> None:
    user = await api.ok("/user/register", json={"mobile": "13900002222", "passwd": "secret1"})
    assert user["sex"] == "U"
    data = await api.ok("/user/login", json={"mobile": "13900002222", "passwd": "secret1"})
    assert data["id"] == user["id"]


async def test_login_does_not_tell_unknown_mobile_from_wrong_password(api: Api) -> None:
    await api.register()
    wrong = await api.call("/user/login", data={"mobile": "13900000001", "passwd": "nope123"})
    unknown = await api.call("/user/login", data={"mobile": "13999999999", "passwd": "nope123"})
    assert wrong == unknown
    assert wrong[0] == 401 and wrong[1]["code"] == -1


async def test_duplicate_mobile_refused(api: Api) -> None:
    await api.ok("/user/register", data={"mobile": "13900003333", "passwd": "secret1"})
    status, body = await api.call("/user/register",
                                  data={"mobile": "13900003333", "passwd": "other12"})
    assert status == 409 and body["code"] == -1


async def test_concurrent_registrations_of_one_mobile(api: Api) -> None:
    results = await asyncio.gather(*(
        api.call("/user/register", data={"mobile": "13900004444", "passwd": f"secret{i}"})
        for i in range(20)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] + [409] * 19
    async with api.store._r.execute(
            "SELECT count(*) FROM users WHERE mobile = '13900004444'") as cur:
        assert (await cur.fetchone()) == (1,)


async def test_bad_input_gets_a_clear_answer(api: Api) -> None:
    cases = [
        ({"data": {"passwd": "secret1"}}, 400),
        ({"data": {"mobile": "13900005555"}}, 400),
        ({"data": {"mobile": "13900005555", "passwd": "short"}}, 400),
        ({"data": {"mobile": "1390 0005555", "passwd": "secret1"}}, 400),
        ({"data": {"mobile": "13900005555", "passwd": "secret1", "sex": "X"}}, 400),
        ({"data": {"mobile": "13900005555", "passwd": "secret1", "nickname": "n" * 65}}, 400),
        ({"json": ["not", "an", "object"]}, 400),
        ({"json": {"mobile": 13900005555, "passwd": ["x"]}}, 400),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"data": b"x" * 100_000, "headers": {"Content-Type": "application/json"}}, 413),
        ({"data": b"<xml/>", "headers": {"Content-Type": "text/xml"}}, 415),
    ]
    for kwargs, want in cases:
        status, body = await api.call("/user/register", **kwargs)  # type: ignore[arg-type]
        assert (status, body["code"]) == (want, -1), (kwargs, body)
        assert body["msg"]


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    status, body = await api.call("/no/such/thing")
    assert (status, body["code"]) == (404, -1)
    status, body = await api.call("/user/register", method="GET")
    assert (status, body["code"]) == (405, -1)


async def test_find_needs_a_token_and_hides_secrets(api: Api) -> None:
    alice = await api.register("alice")
    bob_id, bob_token = await api.user("bob")
    status, body = await api.call("/user/find", data={"id": alice["id"]})
    assert (status, body["code"]) == (401, -1)
    status, _ = await api.call("/user/find", data={"id": alice["id"]}, token="1.2.3.4")
    assert status == 401
    # the seed's way: userid + token form fields
    found = await api.ok("/user/find",
                         data={"id": alice["id"], "userid": bob_id, "token": bob_token})
    assert found == {"id": alice["id"], "nickname": "alice", "avatar": "", "sex": "U",
                     "memo": ""}
    # the Bearer header, and GET
    assert await api.ok("/user/find", data={"id": alice["id"]}, token=bob_token) == found
    assert await api.ok(f"/user/find?id={alice['id']}", method="GET", token=bob_token) == found
    status, _ = await api.call("/user/find", data={"id": 999}, token=bob_token)
    assert status == 404
    status, _ = await api.call("/user/find", data={"id": "abc"}, token=bob_token)
    assert status == 400


async def test_a_token_never_acts_for_another_user(api: Api) -> None:
    alice_id, alice_token = await api.user("alice")
    bob_id, _ = await api.user("bob")
    status, body = await api.call("/contact/loadfriend",
                                  data={"userid": bob_id, "token": alice_token})
    assert (status, body["code"]) == (403, -1)
    # a token signed with another secret, or expired, is refused
    forged = auth.issue_token(b"x" * 32, bob_id, 0)
    status, _ = await api.call("/contact/loadfriend", data={"userid": bob_id, "token": forged})
    assert status == 401
    expired = auth.issue_token(api.node.secret, bob_id, 0, ttl_s=-10)
    status, _ = await api.call("/contact/loadfriend", token=expired)
    assert status == 401
    # a token for a user that does not exist
    ghost = auth.issue_token(api.node.secret, 9999, 0)
    status, _ = await api.call("/contact/loadfriend", token=ghost)
    assert status == 401
    assert alice_id != bob_id


async def test_refresh_and_revoke(api: Api) -> None:
    user = await api.register()
    old = user["token"]
    refreshed = await api.ok("/user/refresh", token=old)
    assert refreshed["id"] == user["id"] and refreshed["token"]
    await api.ok("/user/revoke", data={"userid": user["id"], "token": old})
    for token in (old, refreshed["token"]):
        status, body = await api.call("/user/refresh", token=token)
        assert (status, body["code"]) == (401, -1)
    again = await api.ok("/user/login", data={"mobile": user["mobile"], "passwd": "secret1"})
    assert again["token"] != old
    await api.ok("/user/refresh", token=again["token"])


async def test_a_banned_user_is_refused_until_unbanned(api: Api) -> None:
    user = await api.register()
    uid, token = user["id"], user["token"]
    login = {"mobile": user["mobile"], "passwd": "secret1"}
    assert (await api.ok("/user/find", data={"id": uid}, token=token))["id"] == uid
    assert await api.node.log.set_banned(uid, True) is True  # as `chatd admin user ban`
    banned = (403, {"code": -1, "msg": "this user is banned", "data": None})
    assert await api.call("/user/find", data={"id": uid}, token=token) == banned
    # the seed's userid + token fields, and a fresh token from refresh: the same
    assert await api.call("/user/find", data={"id": uid, "userid": uid, "token": token}) == banned
    assert await api.call("/user/refresh", token=token) == banned
    assert await api.call("/user/login", data=login) == banned
    # a wrong password is told nothing about the ban
    wrong = await api.call("/user/login", data={**login, "passwd": "guess123"})
    assert wrong[0] == 401 and wrong[1]["msg"] != banned[1]["msg"]
    assert await api.node.log.set_banned(uid, False) is True
    assert (await api.ok("/user/find", data={"id": uid}, token=token))["id"] == uid
    assert (await api.ok("/user/login", data=login))["id"] == uid


async def test_healthz(api: Api) -> None:
    async with api.session.get(api.base + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_openapi_lists_every_route(api: Api, node: Node) -> None:
    async with api.session.get(api.base + "/openapi.json") as resp:
        assert resp.status == 200
        spec = await resp.json()
    from openapi_spec_validator import validate

    validate(spec)
    status, _, body = await http_request(api.port, b"GET /openapi.json HTTP/1.1\r\n"
                                         b"Host: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and body
    from chatd.api import make_app

    app = make_app(node.cfg, api.store, node.secret, node.log)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    described = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert routes == described
