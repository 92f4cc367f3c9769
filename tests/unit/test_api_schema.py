"""The HTTP API's schema (``chatd.api_schema``): how form and JSON input are
fitted to the request types, what a refusal says, and that the OpenAPI
document is generated from the same types."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd import api_schema
from chatd.api_openapi import build_spec
from chatd.api_schema import (
    ROUTES,
    CreateGroupRequest,
    FindRequest,
    HistoryRequest,
    LoginRequest,
    RegisterRequest,
    SchemaError,
    UserRequest,
    parse,
)


def test_form_text_becomes_the_field_types() -> None:
    req = parse({"mobile": " 13800000001 ", "passwd": " secret1 ", "nickname": " bob ",
                 "sex": "w", "avatar": ""}, RegisterRequest)
    # text is stripped, except a password; an empty field is an absent one
    assert req == RegisterRequest(mobile="13800000001", passwd=" secret1 ", nickname="bob",
                                  avatar="", sex="W")
    assert parse({"dstid": "42", "userid": "7", "token": "t"}, UserRequest) == UserRequest(
        dstid=42, userid=7, token="t")
    group = parse({"name": "g", "cate": "3", "ownerid": ""}, CreateGroupRequest)
    assert (group.cate, group.ownerid) == (3, None)


def test_json_numbers_where_the_seed_sends_digits() -> None:
    assert parse({"mobile": 13800000001, "passwd": "secret1"}, LoginRequest).mobile == (
        "13800000001")
    assert parse({"dstid": 5}, UserRequest).dstid == 5


def test_unknown_fields_are_ignored() -> None:
    assert parse({"dstid": "1", "whatever": [1, 2], "cmd": "x"}, UserRequest).dstid == 1


@pytest.mark.parametrize(("fields", "kind", "message"), [
    ({"passwd": "secret1"}, RegisterRequest, "mobile is required"),
    ({"mobile": "1 2", "passwd": "secret1"}, RegisterRequest, "mobile: expected `str` matching"),
    ({"mobile": "12", "passwd": "short"}, RegisterRequest, "passwd: expected `str` of length >= 6"),
    ({"mobile": "12", "passwd": ["x"]}, RegisterRequest, "passwd: expected `str`, got `array`"),
    ({"mobile": "12", "passwd": "secret1", "sex": "X"}, RegisterRequest, "sex: expected"),
    ({"dstid": "x"}, UserRequest, "dstid: expected `int`, got `str`"),
    ({"dstid": True}, UserRequest, "dstid: expected `int`, got `bool`"),
    ({"dstid": "0"}, UserRequest, "dstid: expected `int` >= 1"),
    ({"dstid": str(1 << 63)}, UserRequest, "dstid: expected `int` <= "),
    ({}, UserRequest, "dstid is required"),
    ({}, FindRequest, "id is required"),
    ({"dstid": "1", "gid": "2"}, HistoryRequest, "give exactly one of dstid"),
    ({"dstid": "1", "limit": "201"}, HistoryRequest, "limit: expected `int` <= 200"),
    ({"gid": "1", "after": "-1"}, HistoryRequest, "after: expected `int` >= 0"),
    ({"name": "x" * 65}, CreateGroupRequest, "name: expected `str` of length <= 64"),
])
def test_refusals_name_the_field(fields: dict[str, Any], kind: type[msgspec.Struct],
                                 message: str) -> None:
    with pytest.raises(SchemaError) as err:
        parse(fields, kind)
    assert str(err.value).startswith(message), str(err.value)


def test_history_newest_or_oldest() -> None:
    assert parse({"dstid": "1"}, HistoryRequest).newest is True
    assert parse({"dstid": "1", "after": "5"}, HistoryRequest).newest is False
    assert parse({"dstid": "1", "after": "5", "before": "9"}, HistoryRequest).newest is True


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["mobile", "passwd", "nickname", "sex", "dstid", "x"]),
                       st.one_of(st.text(max_size=40), st.integers(), st.booleans(),
                                 st.none(), st.lists(st.integers(), max_size=2)),
                       max_size=5))
def test_any_input_fits_or_is_refused_with_schema_error(fields: dict[str, Any]) -> None:
    for kind in (RegisterRequest, UserRequest, HistoryRequest):
        try:
            parse(fields, kind)
        except SchemaError as exc:
            assert str(exc)


def test_openapi_components_are_the_structs() -> None:
    spec = build_spec()
    assert spec["openapi"] == "3.1.0"
    schemas = spec["components"]["schemas"]
    _, direct = msgspec.json.schema_components(
        [RegisterRequest, api_schema.MeReply], ref_template="#/components/schemas/{name}")
    for name, schema in direct.items():
        assert schemas[name] == schema
    # every route's request and reply type is described, and used
    for path, route in ROUTES.items():
        for method in route.methods:
            op = spec["paths"][path][method.lower()]
            assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{route.reply.__name__}"}
            if method == "POST" and not route.multipart:
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body == {"$ref": f"#/components/schemas/{route.request.__name__}"}
    get_history = spec["paths"]["/chat/history"]["get"]["parameters"]
    limit = next(p for p in get_history if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 200 and limit["required"] is False
