"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Generated, not written: the schemas are msgspec's JSON Schema of the request
and reply Structs in ``chatd.api_schema`` (``msgspec.json.schema_components``),
and the operations come from its ``ROUTES`` table, from which ``chatd.api``
also registers the routes. So a call cannot exist without being described,
and its description is the type the server validates with.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec

from chatd.api_schema import ROUTES, ClientConfig, ErrorReply, Health, Route

_REF: Final = "#/components/schemas/{name}"

_STATUS_TEXT: Final = {
    400: "a field is missing or bad",
    401: "no token, or a bad, expired or revoked one",
    403: "not allowed",
    404: "unknown user or group",
    409: "already exists",
    413: "too large",
    415: "unsupported type",
}

#: the documents that are not enveloped calls
_PLAIN: Final = (ErrorReply, ClientConfig, Health)


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=kind.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


@functools.cache
def _components() -> dict[str, Any]:
    types: list[Any] = [*_PLAIN]
    for route in ROUTES.values():
        types += [route.request, route.reply]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    return components


def _parameters(route: Route) -> list[dict[str, Any]]:
    """The request type's fields as query parameters (the GET form of a read)."""
    schema = _components()[route.request.__name__]
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
        if "description" in prop:
            param["description"] = prop.pop("description")
        param["schema"] = prop
        params.append(param)
    return params


def _operation(path: str, route: Route, method: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": method.lower() + path.replace("/", "_"),
        "responses": {"200": {"description": "done (code 0)",
                              "content": _json(_ref(route.reply))}},
    }
    errors = set(route.errors) | ({401} if route.auth else set())
    for status in sorted(errors):
        op["responses"][str(status)] = {
            "description": _STATUS_TEXT[status] + " (code -1)",
            "content": _json(_ref(ErrorReply)),
        }
    if not route.auth:
        op["security"] = []
    if method == "GET":
        op["parameters"] = _parameters(route)
        return op
    body = _ref(route.request)
    if route.multipart:
        file = {"type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary",
                                        "description": "the file (at most 20 MiB)"}}}
        content: dict[str, Any] = {"multipart/form-data": {"schema": {"allOf": [body, file]}}}
    else:
        content = {"application/x-www-form-urlencoded": {"schema": body},
                   "application/json": {"schema": body}}
    required = bool(_components()[route.request.__name__].get("required")) or route.multipart
    op["requestBody"] = {"required": required, "content": content}
    return op


def _get(summary: str, op_id: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "operationId": op_id, "security": [],
                    "responses": responses, **extra}}


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the API serves."""
    paths: dict[str, Any] = {}
    for path, route in ROUTES.items():
        paths[path] = {m.lower(): _operation(path, route, m) for m in route.methods}
    not_found = {"description": "no such file", "content": _json(_ref(ErrorReply))}
    paths["/media/{name}"] = _get(
        "An uploaded file or preview, by the name the upload answered", "get_media",
        {"200": {"description": "the bytes, with immutable cache headers",
                 "content": {"application/octet-stream": {
                     "schema": {"type": "string", "format": "binary"}}}},
         "304": {"description": "not modified (If-None-Match)"},
         "404": not_found},
        parameters=[{"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": r"^[0-9a-f]{64}\.[a-z0-9.]+$"}}])
    paths["/healthz"] = _get(
        "Liveness: the API and its store answer", "get_healthz",
        {"200": {"description": "ok", "content": _json(_ref(Health))},
         "503": {"description": "store failing", "content": _json(_ref(Health))}})
    paths["/openapi.json"] = _get(
        "This document", "get_openapi", {"200": {"description": "OpenAPI 3.1 document"}})
    paths["/metrics"] = _get(
        "The node's figures, Prometheus text format 0.0.4", "get_metrics",
        {"200": {"description": "Prometheus text",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}})
    paths["/config.json"] = _get(
        "Where the chat websocket is: the same host name, on chat_port", "get_config",
        {"200": {"description": "the client configuration", "content": _json(_ref(ClientConfig))}})
    paths["/"] = _get(
        "The web chat client", "get_webapp",
        {"200": {"description": "the page", "content": {"text/html": {
            "schema": {"type": "string"}}}}})
    paths["/static/{name}"] = _get(
        "The web client's files; /static/chatd.js is the JavaScript client library",
        "get_static",
        {"200": {"description": "the file"}, "304": {"description": "not modified"},
         "404": not_found},
        parameters=[{"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string"}}])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatd HTTP API",
            "version": "1",
            "description": "Accounts, contacts, groups, history and uploads. Replies are "
                           '{"code": 0|-1, "msg": ..., "data": ...}; lists also carry '
                           "rows and total. Bodies may be form-urlencoded or JSON.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
