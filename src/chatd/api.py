"""The HTTP API (DESIGN §4): accounts, contacts, groups, history, uploads.

``make_app`` builds the aiohttp application; what the API changes that
affects live routing (group membership, revoked tokens) goes to ``control``,
the node's log, which orders it with the messages and tells the shards.

Routes keep the seed's names and its reply envelope (see ``api_common``);
handlers live in ``api_accounts``, ``api_contacts``, ``api_media`` and
``api_web`` (the web client), the request and reply types in ``api_schema``,
the OpenAPI description generated from them in ``api_openapi``. Every
refusal is a JSON envelope with ``code: -1`` and an HTTP status; an
unexpected error is logged with its traceback and answered 500 without one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Final

from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from chatd import auth, media, metrics
from chatd.api_accounts import (
    handle_find,
    handle_login,
    handle_refresh,
    handle_register,
    handle_revoke,
)
from chatd.api_common import CTX, MAX_BODY_BYTES, ApiError, Ctx, fail, reply
from chatd.api_contacts import (
    handle_addfriend,
    handle_createcommunity,
    handle_history,
    handle_joincommunity,
    handle_loadcommunity,
    handle_loadfriend,
    handle_members,
    handle_quitcommunity,
)
from chatd.api_media import handle_media, handle_upload
from chatd.api_openapi import build_spec
from chatd.api_schema import ROUTES, Health
from chatd.api_web import WEB_FILES, handle_config, handle_index, handle_static, load_files
from chatd.bus import Control
from chatd.config import Config
from chatd.errors import StoreUnavailable
from chatd.store import Store

log = logging.getLogger("chatd.api")

#: worker threads for previews (Pillow releases the GIL while it decodes and resizes)
DEFAULT_WORKERS: Final = 2
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the app's own metrics registry, over the snapshot the supervisor last sent
METRICS: Final = web.AppKey("chatd.metrics", CollectorRegistry)

_HANDLERS: Final[dict[str, Handler]] = {
    "/user/register": handle_register,
    "/user/login": handle_login,
    "/user/find": handle_find,
    "/user/refresh": handle_refresh,
    "/user/revoke": handle_revoke,
    "/contact/addfriend": handle_addfriend,
    "/contact/loadfriend": handle_loadfriend,
    "/contact/createcommunity": handle_createcommunity,
    "/contact/joincommunity": handle_joincommunity,
    "/contact/quitcommunity": handle_quitcommunity,
    "/contact/loadcommunity": handle_loadcommunity,
    "/contact/members": handle_members,
    "/chat/history": handle_history,
    "/attach/upload": handle_upload,
}


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every refusal into the JSON envelope; add the security headers."""
    try:
        response = await handler(request)
    except ApiError as exc:
        response = fail(exc.status, exc.msg)
    except StoreUnavailable as exc:
        log.warning("%s %s: store unavailable: %s", request.method, request.path, exc)
        response = fail(503, "service unavailable, retry")
        response.headers["Retry-After"] = "1"
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = fail(exc.status, exc.reason)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = fail(500, "internal server error")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def handle_healthz(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}`` when the store answers, else 503."""
    try:
        await request.app[CTX].store.max_message_id()
    except Exception as exc:
        log.error("healthz: store failed: %s", exc)
        return reply(503, Health(status="error"))
    return reply(200, Health(status="ok"))


async def handle_metrics(request: web.Request) -> web.Response:
    """The node's figures in Prometheus text (see ``chatd.metrics``)."""
    body = metrics.render(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def handle_openapi(request: web.Request) -> web.Response:
    return reply(200, build_spec())


def make_app(
    cfg: Config,
    store: Store,
    secret: bytes,
    control: Control,
    *,
    executor: Executor | None = None,
    max_upload_bytes: int = media.MAX_UPLOAD_BYTES,
    chat_port: int | None = None,
) -> web.Application:
    """The API application over ``store``; routing changes go to ``control``
    (the node's log), so that they are ordered with the messages.

    ``executor`` runs previews (default: a pool of ``DEFAULT_WORKERS`` threads,
    shut down with the app); ``max_upload_bytes`` bounds an upload;
    ``chat_port`` is the websocket's port that clients are told (default
    ``cfg.chat_port``).
    """
    own_pool = executor is None
    pool: Executor = executor or ThreadPoolExecutor(DEFAULT_WORKERS, "chatd-media")
    ctx = Ctx(
        cfg=cfg,
        store=store,
        secret=secret,
        control=control,
        executor=pool,
        media_dir=cfg.data_path / "media",
        max_upload_bytes=max_upload_bytes,
        chat_port=cfg.chat_port if chat_port is None else chat_port,
    )
    app = web.Application(middlewares=[envelope_middleware], client_max_size=MAX_BODY_BYTES)
    app[CTX] = ctx
    app[METRICS] = metrics.make_registry(lambda: ctx.metrics)
    app[WEB_FILES] = load_files()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        ctx.media_dir.mkdir(parents=True, exist_ok=True)
        ctx.dummy_hash = await loop.run_in_executor(None, auth.hash_password, "not a password")
        yield
        if own_pool:
            pool.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    for path, handler in _HANDLERS.items():
        for method in ROUTES[path].methods:
            app.router.add_route(method, path, handler)
    app.router.add_get("/media/{name}", handle_media)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/openapi.json", handle_openapi)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/config.json", handle_config)
    app.router.add_get("/", handle_index)
    app.router.add_get("/static/{name}", handle_static)
    return app
