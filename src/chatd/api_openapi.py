"""The OpenAPI 3 description of the HTTP API, served at ``/openapi.json``.

Written by hand as a table (``ENDPOINTS``) from which ``build_spec`` makes the
document; ``chatd.api`` registers the calls' routes from the same table, so
a call cannot exist without being described.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "string" or "integer"
    doc: str
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Endpoint:
    summary: str
    fields: tuple[Field, ...] = ()
    methods: tuple[str, ...] = ("POST",)
    auth: bool = True
    data: str = "object"  # schema name of ``data`` in the reply, or "list"
    errors: tuple[int, ...] = (400,)


_S, _I = "string", "integer"
_DSTID_USER = Field("dstid", _I, "the other user's id", True)
_DSTID_GROUP = Field("dstid", _I, "the group's id", True)
_READ: Final = ("GET", "POST")

ENDPOINTS: Final[dict[str, Endpoint]] = {
    "/user/register": Endpoint(
        "Create an account; answers the user and a token",
        (Field("mobile", _S, "mobile number (the login name)", True),
         Field("passwd", _S, "password, 6 to 128 characters", True),
         Field("nickname", _S, "display name"), Field("avatar", _S, "avatar URL"),
         Field("sex", _S, "M, W, F or U")),
        auth=False, data="Me", errors=(400, 409)),
    "/user/login": Endpoint(
        "Log in; answers the user and a token",
        (Field("mobile", _S, "mobile number", True), Field("passwd", _S, "password", True)),
        auth=False, data="Me", errors=(400, 401, 403)),
    "/user/find": Endpoint(
        "A user's public profile", (Field("id", _I, "the user's id", True),),
        methods=_READ, data="User", errors=(400, 404)),
    "/user/refresh": Endpoint("A new token for the caller", data="Token"),
    "/user/revoke": Endpoint(
        "Revoke every token of the caller; its live connections are closed (4501)"),
    "/contact/addfriend": Endpoint(
        "Befriend a user (both ways, idempotent)", (_DSTID_USER,), errors=(400, 404)),
    "/contact/loadfriend": Endpoint("The caller's friends", methods=_READ, data="list:User"),
    "/contact/createcommunity": Endpoint(
        "Create a group; the caller owns it and is its first member",
        (Field("name", _S, "group name", True), Field("icon", _S, "icon URL"),
         Field("cate", _I, "category"), Field("memo", _S, "description")),
        data="Group"),
    "/contact/joincommunity": Endpoint(
        "Join a group; live connections receive it at once", (_DSTID_GROUP,),
        errors=(400, 404)),
    "/contact/quitcommunity": Endpoint(
        "Leave a group (not its owner); live connections stop receiving it", (_DSTID_GROUP,),
        errors=(400, 403, 404)),
    "/contact/loadcommunity": Endpoint(
        "The groups the caller is a member of", methods=_READ, data="list:Group"),
    "/contact/members": Endpoint(
        "Members of a group the caller is in", (_DSTID_GROUP,), methods=_READ,
        data="list:User", errors=(400, 403, 404)),
    "/chat/history": Endpoint(
        "A page of a private conversation (dstid) or of a group (gid), oldest first",
        (Field("dstid", _I, "the other user (private conversation)"),
         Field("gid", _I, "the group (only messages since the caller joined)"),
         Field("before", _I, "only messages with a smaller id"),
         Field("after", _I, "only messages with a larger id"),
         Field("limit", _I, "page size, 1 to 200 (default 50)")),
        methods=_READ, data="list:Message", errors=(400, 403, 404)),
    "/attach/upload": Endpoint(
        "Upload an image, voice or video file (multipart field file)",
        data="Upload", errors=(400, 413, 415)),
}

_STRING: Final = {"type": "string"}
_INT: Final = {"type": "integer", "format": "int64"}

_SCHEMAS: Final[dict[str, Any]] = {
    "Envelope": {
        "type": "object",
        "required": ["code", "msg"],
        "properties": {
            "code": {"type": "integer", "enum": [0, -1], "description": "0 ok, -1 refused"},
            "msg": _STRING,
            "data": {"nullable": True},
            "rows": {"type": "array", "items": {}, "description": "lists only (seed form)"},
            "total": {"type": "integer", "description": "lists only (seed form)"},
        },
    },
    "User": {
        "type": "object",
        "properties": {"id": _INT, "nickname": _STRING, "avatar": _STRING, "sex": _STRING,
                       "memo": _STRING},
    },
    "Me": {
        "allOf": [
            {"$ref": "#/components/schemas/User"},
            {"type": "object",
             "properties": {"mobile": _STRING, "createat": _INT, "token": _STRING}},
        ]
    },
    "Token": {
        "type": "object",
        "properties": {"id": _INT, "token": _STRING, "expires_in": _INT},
    },
    "Group": {
        "type": "object",
        "properties": {"id": _INT, "name": _STRING, "ownerid": _INT, "icon": _STRING,
                       "cate": _INT, "memo": _STRING, "createat": _INT},
    },
    "Message": {
        "type": "object",
        "description": "a stored chat message (docs/protocol.md); empty fields are left out",
        "properties": {name: _INT for name in ("id", "userid", "cmd", "dstid", "media",
                                                "amount", "ts")}
        | {name: _STRING for name in ("content", "pic", "url", "memo", "cid")},
    },
    "Upload": {
        "type": "object",
        "properties": {"url": _STRING, "pic": _STRING, "media": _INT, "mime": _STRING,
                       "size": _INT, "width": _INT, "height": _INT},
    },
    "object": {"type": "object"},
}

_STATUS_TEXT: Final = {
    400: "a field is missing or bad",
    401: "no token, or a bad, expired or revoked one",
    403: "not allowed",
    404: "unknown user or group",
    409: "already exists",
    413: "too large",
    415: "unsupported type",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _reply(data: str) -> dict[str, Any]:
    if data.startswith("list:"):
        item = _ref(data[5:])
        inner: dict[str, Any] = {
            "type": "object",
            "properties": {"rows": {"type": "array", "items": item}, "total": _INT},
        }
    elif data == "Upload":
        # the seed's clients read data as the url: the details ride beside it
        seed = {"type": "string", "description": "the url, as the seed's clients read it"}
        schema = {"allOf": [_ref("Envelope"), {"type": "object", "properties": {"data": seed}},
                            _ref("Upload")]}
        return {"description": "code 0", "content": {"application/json": {"schema": schema}}}
    else:
        inner = _ref(data)
    schema = {"allOf": [_ref("Envelope"), {"type": "object", "properties": {"data": inner}}]}
    return {"description": "code 0", "content": {"application/json": {"schema": schema}}}


def _operation(path: str, ep: Endpoint, method: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": ep.summary,
        "operationId": method.lower() + path.replace("/", "_"),
        "responses": {"200": _reply(ep.data)},
    }
    errors = set(ep.errors) | ({401} if ep.auth else set())
    for status in sorted(errors):
        op["responses"][str(status)] = {
            "description": _STATUS_TEXT[status] + " (code -1)",
            "content": {"application/json": {"schema": _ref("Envelope")}},
        }
    if not ep.auth:
        op["security"] = []
    auth_fields = (
        (Field("userid", _I, "the caller's id (seed form; must match the token)"),
         Field("token", _S, "the token (seed form; or the Authorization header)"))
        if ep.auth else ()
    )
    fields = ep.fields + auth_fields
    if method == "GET":
        op["parameters"] = [
            {"name": f.name, "in": "query", "required": f.required, "description": f.doc,
             "schema": _INT if f.kind == _I else _STRING}
            for f in fields
        ]
        return op
    props = {f.name: {**(_INT if f.kind == _I else _STRING), "description": f.doc}
             for f in fields}
    schema: dict[str, Any] = {"type": "object", "properties": props}
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    if path == "/attach/upload":
        content = {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}, **props}}}}
    else:
        content = {"application/x-www-form-urlencoded": {"schema": schema},
                   "application/json": {"schema": schema}}
    op["requestBody"] = {"required": bool(required) or path == "/attach/upload",
                         "content": content}
    return op


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.0 document of every route the API serves."""
    paths: dict[str, Any] = {}
    for path, ep in ENDPOINTS.items():
        paths[path] = {m.lower(): _operation(path, ep, m) for m in ep.methods}
    paths["/media/{name}"] = {"get": {
        "summary": "An uploaded file or preview, by the name the upload answered",
        "operationId": "get_media",
        "security": [],
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string",
                                   "pattern": r"^[0-9a-f]{64}\.[a-z0-9.]+$"}}],
        "responses": {
            "200": {"description": "the bytes, with immutable cache headers",
                    "content": {"application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"}}}},
            "304": {"description": "not modified (If-None-Match)"},
            "404": {"description": "no such file",
                    "content": {"application/json": {"schema": _ref("Envelope")}}},
        },
    }}
    paths["/healthz"] = {"get": {
        "summary": "Liveness: the API and its store answer", "operationId": "get_healthz",
        "security": [],
        "responses": {"200": {"description": "ok"}, "503": {"description": "store failing"}},
    }}
    paths["/openapi.json"] = {"get": {
        "summary": "This document", "operationId": "get_openapi", "security": [],
        "responses": {"200": {"description": "OpenAPI 3 document"}},
    }}
    paths["/metrics"] = {"get": {
        "summary": "The node's figures, Prometheus text format 0.0.4",
        "operationId": "get_metrics", "security": [],
        "responses": {"200": {"description": "Prometheus text",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}},
    }}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "chatd HTTP API",
            "version": "1",
            "description": "Accounts, contacts, groups, history and uploads. Replies are "
                           '{"code": 0|-1, "msg": ..., "data": ...}; lists also carry '
                           "rows and total. Bodies may be form-urlencoded or JSON.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
