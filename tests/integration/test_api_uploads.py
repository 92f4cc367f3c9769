"""HTTP API: uploads ("content => url") and serving them: previews, limits,
sniffing, bombs, traversal, and the headers that keep uploads inert."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import api_helpers
from api_helpers import Api, image_bytes
from conftest import http_request
from PIL import Image

from chatd.media import preview_url_for

# the API fixtures (api_helpers)
api = api_helpers.api
api_factory = api_helpers.api_factory


def _form(data: bytes, filename: str = "x.bin", ctype: str = "application/octet-stream",
          **fields: Any) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, str(value))
    form.add_field("file", data, filename=filename, content_type=ctype)
    return form


async def _upload_ok(api: Api, **kwargs: Any) -> dict[str, Any]:
    """The reply of an upload that must succeed: the url in ``data`` (as the
    seed reads it) and the details beside it."""
    status, body = await api.call("/attach/upload", **kwargs)
    assert (status, body["code"]) == (200, 0), body
    assert body["data"] == body["url"]
    return body


async def _upload(api: Api, token: str, data: bytes, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    return await api.call("/attach/upload", data=_form(data, **kwargs), token=token)


async def _get(api: Api, path: str, **headers: str) -> tuple[int, Any, bytes]:
    async with api.session.get(api.base + path, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_image_upload_gives_url_and_preview(api: Api) -> None:
    _, token = await api.user()
    png = image_bytes("PNG", (600, 300), "RGBA", (0, 128, 255, 100))
    status, body = await _upload(api, token, png, filename="evil.html", ctype="text/html")
    assert status == 200, body
    assert body["data"] == body["url"]  # the seed reads data as the url
    data = body
    assert data["media"] == 4 and data["size"] == len(png)
    assert (data["width"], data["height"]) == (600, 300)
    assert data["url"].startswith("/media/") and data["url"].endswith(".png")
    assert data["pic"] == data["url"][:-4] + ".preview.jpg"

    status, headers, got = await _get(api, data["url"])
    assert status == 200 and got == png
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    etag = headers["ETag"]
    status, headers, got = await _get(api, data["url"], **{"If-None-Match": etag})
    assert status == 304 and got == b""

    status, headers, preview = await _get(api, data["pic"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    with Image.open(io.BytesIO(preview)) as im:
        assert im.format == "JPEG" and im.size == (256, 128)

    # the same bytes again: the same resource
    again = (await _upload(api, token, png))[1]
    assert again == data
    # the shard's mapping for media-4 messages without pic
    assert preview_url_for(data["url"], api.node.cfg.data_path / "media") == data["pic"]


async def test_jpeg_preview_bounded(api: Api) -> None:
    _, token = await api.user()
    jpeg = image_bytes("JPEG", (1200, 1600), quality=90)
    data = await _upload_ok(api, data=_form(jpeg), token=token)
    assert data["url"].endswith(".jpg") and (data["width"], data["height"]) == (1200, 1600)
    _, _, preview = await _get(api, data["pic"])
    with Image.open(io.BytesIO(preview)) as im:
        assert max(im.size) == 256


async def test_voice_and_video_are_opaque_attachments(api: Api) -> None:
    _, token = await api.user()
    files = [
        (b"OggS\x00\x02" + b"\x00" * 100, 3, "audio/ogg"),
        (b"#!AMR\n" + b"\x3c" * 100, 3, "audio/amr"),
        (b"ID3\x04\x00" + b"\x00" * 100, 3, "audio/mpeg"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + b"\x00" * 100, 3, "audio/mp4"),
        (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00" + b"\x00" * 100, 8, "video/mp4"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm" + b"\x00" * 100, 8,
         "video/webm"),
    ]
    for raw, media, mime in files:
        data = await _upload_ok(api, data=_form(raw, filename="a.png",
                                                         ctype="image/png"), token=token)
        assert (data["media"], data["pic"], data["width"]) == (media, "", 0), mime
        status, headers, got = await _get(api, data["url"])
        assert status == 200 and got == raw
        assert headers["Content-Type"] == mime
        assert headers["Content-Disposition"].startswith("attachment")
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert preview_url_for(data["url"], api.node.cfg.data_path / "media") is None


async def test_unsupported_or_disguised_types_refused(api: Api) -> None:
    _, token = await api.user()
    html = b"<!DOCTYPE html><html><script>alert(1)</script></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    for raw in (html, svg, b"%PDF-1.7\n", b"PK\x03\x04zip", b"\x7fELF", b"hello",
                image_bytes("BMP"), image_bytes("TIFF")):
        status, body = await _upload(api, token, raw, filename="cat.png", ctype="image/png")
        assert (status, body["code"]) == (415, -1), raw[:10]
    # a PNG signature followed by HTML is no PNG
    status, _ = await _upload(api, token, b"\x89PNG\r\n\x1a\n" + html, filename="a.png")
    assert status in (400, 415)
    assert not any((api.node.cfg.data_path / "media").iterdir())


async def test_truncated_image_refused(api: Api) -> None:
    _, token = await api.user()
    for fmt in ("PNG", "JPEG", "GIF", "WEBP"):
        raw = image_bytes(fmt, (300, 300), "RGB", (10, 200, 10))
        status, body = await _upload(api, token, raw[: len(raw) // 2])
        assert (status, body["code"]) == (400, -1), (fmt, body)


async def test_decompression_bomb_refused(api: Api) -> None:
    _, token = await api.user()
    bomb = image_bytes("PNG", (12_000, 12_000), "1", 0, optimize=True)
    assert len(bomb) < 100_000  # tiny on the wire, 144 megapixels decoded
    status, body = await _upload(api, token, bomb)
    assert (status, body["code"]) == (413, -1), body
    # just past chatd's limit (under twice Pillow's own): refused too
    bomb = image_bytes("PNG", (8_000, 7_000), "1", 0)
    status, body = await _upload(api, token, bomb)
    assert (status, body["code"]) == (413, -1), body


async def test_upload_size_limit(api_factory: Any) -> None:
    api = await api_factory(max_upload_bytes=64 * 1024)
    _, token = await api.user()
    # a declared length past the limit: refused before the body is read
    raw = (f"POST /attach/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
           "Content-Type: multipart/form-data; boundary=b\r\n"
           f"Content-Length: {10 * 1024 * 1024}\r\n\r\n").encode()
    status, _, body = await http_request(api.port, raw)
    assert status == 413 and b'"code":-1' in body
    # no length (chunked): counted while the part streams in
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
            + b"OggS" + b"\x00" * (100 * 1024) + b"\r\n--b--\r\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part[i:i + 8192]), part[i:i + 8192])
                       for i in range(0, len(part), 8192)) + b"0\r\n\r\n"
    raw = (f"POST /attach/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
           "Content-Type: multipart/form-data; boundary=b\r\nConnection: close\r\n"
           "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked
    status, _, body = await http_request(api.port, raw)
    assert status == 413 and b'"code":-1' in body
    # just under the limit is fine
    data = await _upload_ok(api, data=_form(b"OggS" + b"\x00" * (60 * 1024)),
                        token=token)
    assert data["size"] == 60 * 1024 + 4


async def test_upload_auth(api: Api) -> None:
    uid, token = await api.user()
    other, _ = await api.user()
    png = image_bytes()
    status, _ = await api.call("/attach/upload", data=_form(png))
    assert status == 401
    # the seed's way: userid and token as form fields next to the file
    data = await _upload_ok(api, data=_form(png, userid=uid, token=token))
    assert data["media"] == 4
    status, _ = await api.call("/attach/upload", data=_form(png, userid=other, token=token))
    assert status == 403
    status, _ = await api.call("/attach/upload", data={"nofile": "1"}, token=token)
    assert status == 400
    form = aiohttp.FormData()
    form.add_field("other", b"x", filename="x")
    status, _ = await api.call("/attach/upload", data=form, token=token)
    assert status == 400


async def test_no_path_traversal(api: Api) -> None:
    _, token = await api.user()
    digest_url = (await _upload_ok(api, data=_form(image_bytes()), token=token))["url"]
    digest = digest_url[len("/media/"):-len(".png")]
    paths = [
        "/media/../chatd.db", "/media/..%2fchatd.db", "/media/%2e%2e/chatd.db",
        "/media/%2e%2e%2fchatd.db", "/media/..%5cchatd.db", "/media/....//chatd.db",
        "/media/%252e%252e%252fchatd.db", "/media/secret", "/media/chatd.db",
        f"/media/{digest}.PNG", f"/media/{digest}.html", f"/media/{digest}.png/",
        f"/media/{digest}.png.gz", f"/media/{digest}", f"/media/{digest[:-1]}.png",
        f"/media/{'0' * 64}.png", f"/media/{digest}.preview.png", "/media/",
        f"/media//{digest}.png", "/media/.upload-x",
    ]
    for path in paths:
        raw = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        status, headers, body = await http_request(api.port, raw)
        assert status == 404, path
        assert b"SQLite format" not in body and headers["content-type"].startswith(
            "application/json"), path


async def test_a_chunked_body_of_many_fields_is_refused_before_it_is_all_read(
        api: Api) -> None:
    """No Content-Length, no token, endless small fields: 413, not buffered."""
    from conftest import http_request

    field = b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n' + b"y" * 4000 + b"\r\n"
    parts = b"".join(field % i for i in range(6000)) + b"--b--\r\n"  # ~24 MB
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(parts[i:i + 65536]), parts[i:i + 65536])
                       for i in range(0, len(parts), 65536)) + b"0\r\n\r\n"
    raw = (b"POST /attach/upload HTTP/1.1\r\nHost: x\r\n"
           b"Content-Type: multipart/form-data; boundary=b\r\n"
           b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n") + chunked
    status, _, _ = await http_request(api.port, raw, timeout=30)
    assert status == 413


async def test_an_image_message_gets_the_preview_only_for_a_stored_upload(api: Api) -> None:
    from conftest import connect

    node = api.node
    uid, token = await api.user()
    bob = await node.user()
    body = await _upload_ok(api, data=_form(image_bytes("PNG", (600, 300))), token=token)
    a, b = await connect(node.url(uid)), await connect(node.url(bob))
    stranger = "/media/" + "0" * 64 + ".png"  # the right shape, never uploaded
    for i, url in enumerate([body["url"], stranger, body["url"]]):
        a.send(cmd=10, dstid=bob, media=4, url=url, cid=f"i{i}")
    got = [await b.recv_until(lambda f, i=i: f.get("cid") == f"i{i}") for i in range(3)]
    assert [g.get("pic", "") for g in got] == [body["pic"], "", body["pic"]]
