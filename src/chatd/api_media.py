"""HTTP API: uploads (``/attach/upload``) and serving them (``/media/<name>``).

An upload is a multipart body with a ``file`` part. Its size is checked
against the limit from ``Content-Length`` before anything is read, and
counted while the part streams in, so a body past the limit is refused (413)
without being buffered. Sniffing, decoding, the preview and the write happen
in the API's worker pool (``chatd.media.store_upload``).

Served resources are never HTML or script to a browser: the Content-Type is
the sniffed kind's, ``X-Content-Type-Options: nosniff``,
``Content-Security-Policy: default-src 'none'``, and anything but an image is
an attachment. Names are only those the server chose (hex digest + extension);
anything else is 404, so no path leaves the media folder.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import BodyPartReader, web

from chatd import media
from chatd.api_common import (
    CTX,
    ApiError,
    authenticate,
    in_executor,
    ok,
    parse_request,
    token_of,
)
from chatd.api_schema import UploadForm, UploadReply

#: room for the multipart framing and small text fields around the file
MULTIPART_SLACK_BYTES: Final = 16 * 1024
MAX_FIELD_BYTES: Final = 4096
CHUNK_BYTES: Final = 64 * 1024
CACHE_FOREVER: Final = "public, max-age=31536000, immutable"


async def _read_part(part: BodyPartReader, limit: int, what: str) -> bytes:
    """The part's bytes, refusing (413) as soon as they pass ``limit``."""
    buf = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        if len(buf) + len(chunk) > limit:
            raise ApiError(413, f"{what} is larger than {limit} bytes")
        buf += chunk
    return bytes(buf)


async def handle_upload(request: web.Request) -> web.Response:
    """multipart ``file`` -> ``url``, ``pic`` (preview), media, size, width, height."""
    ctx = request.app[CTX]
    limit = ctx.max_upload_bytes
    length = request.content_length
    if length is not None and length > limit + MULTIPART_SLACK_BYTES:
        raise ApiError(413, f"the file is larger than {limit} bytes")
    if request.content_type != "multipart/form-data":
        raise ApiError(400, "send multipart/form-data with a file field")
    fields: dict[str, Any] = dict(request.query)
    if token_of(request, fields):
        # refuse a stranger before reading the body
        await authenticate(request, fields)
    data: bytes | None = None
    # one budget for the whole body, so that a chunked body (no Content-Length)
    # of many small fields is refused as soon as it is too big, not after
    budget = limit + MULTIPART_SLACK_BYTES
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "nested multipart bodies are not accepted")
        if part.name == "file":
            if data is not None:
                raise ApiError(400, "send one file per upload")
            data = await _read_part(part, min(limit, budget), "the file")
            budget -= len(data)
        elif part.name:
            if budget < MAX_FIELD_BYTES:
                raise ApiError(413, f"the body is larger than {limit} bytes")
            raw = await _read_part(part, MAX_FIELD_BYTES, f"field {part.name}")
            budget -= len(raw)
            fields[part.name] = raw.decode("utf-8", "replace")
        else:
            await part.release()
    await authenticate(request, fields)
    parse_request(fields, UploadForm)
    if data is None:
        raise ApiError(400, "file is required")
    try:
        upload: media.Upload = await in_executor(ctx, media.store_upload, data, ctx.media_dir)
    except media.MediaError as exc:
        raise ApiError(exc.status, exc.reason) from None
    # the seed's front-end reads ``data`` as the url string; the rest rides
    # beside it in the envelope for clients that want the preview and sizes
    return ok(UploadReply(data=upload.url, url=upload.url, pic=upload.pic,
                          media=upload.kind.media, mime=upload.kind.mime, size=upload.size,
                          width=upload.width, height=upload.height))


async def handle_media(request: web.Request) -> web.StreamResponse:
    """A stored upload or preview by the name the server gave it, with cache headers."""
    ctx = request.app[CTX]
    name = request.match_info.get("name", "")
    parsed = media.parse_name(name)
    if parsed is None:
        raise ApiError(404, "not found")
    path = ctx.media_dir / name
    if not path.is_file():
        raise ApiError(404, "not found")
    kind = parsed[1]
    headers = {
        "Content-Type": kind.mime,
        "Cache-Control": CACHE_FOREVER,
        "Content-Disposition": "inline" if kind.is_image else f'attachment; filename="{name}"',
    }
    return web.FileResponse(path, headers=headers)
