"""chatd.media: sniffing, names, previews and their guards, storage."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from chatd import media
from chatd.media import MediaError, make_preview, parse_name, preview_url_for, sniff, store_upload

DIGEST = "ab" * 32


def _image(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 0).save(out, fmt, **save)
    return out.getvalue()


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (_image("JPEG"), media.JPEG),
        (_image("PNG"), media.PNG),
        (_image("GIF"), media.GIF),
        (_image("WEBP"), media.WEBP),
        (b"OggS\x00\x02", media.OGG),
        (b"ID3\x03\x00", media.MP3),
        (b"\xff\xfb\x90\x00", media.MP3),
        (b"\xff\xf3\x90\x00", media.MP3),
        (b"\xff\xf1\x50\x80", media.AAC),
        (b"#!AMR\n\x3c", media.AMR),
        (b"#!AMR-WB\n", media.AMR),
        (b"\x00\x00\x00\x1cftypM4A \x00\x00\x00\x00", media.M4A),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", media.MP4),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", media.MP4),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", media.WEBM),
    ],
)
def test_sniff_allowed(head: bytes, kind: media.Kind) -> None:
    assert sniff(head[: media.SNIFF_BYTES]) is kind


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"<!DOCTYPE html><html>",
        b"<svg xmlns='http://www.w3.org/2000/svg'>",
        b"<?xml version='1.0'?>",
        b"%PDF-1.7",
        b"PK\x03\x04",
        b"\x7fELF\x02",
        b"MZ\x90\x00",
        b"BM\x00\x00",
        b"II*\x00",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00",
        b"\xff\xd8",
        b"\xff\x00",
        b"GIF88a",
        b"#!/bin/sh\n",
    ],
)
def test_sniff_refuses(head: bytes) -> None:
    assert sniff(head) is None


@pytest.mark.parametrize("ext", ["jpg", "png", "gif", "webp", "ogg", "mp3", "amr", "aac", "m4a",
                                 "mp4", "webm", "preview.jpg"])
def test_parse_name_accepts_server_names(ext: str) -> None:
    parsed = parse_name(f"{DIGEST}.{ext}")
    assert parsed is not None and parsed[0] == DIGEST


@pytest.mark.parametrize(
    "name",
    [
        "", "chatd.db", "../chatd.db", f"../{DIGEST}.png", f"{DIGEST}.png/..", f"{DIGEST}",
        f"{DIGEST}.PNG", f"{DIGEST.upper()}.png", f"{DIGEST}.html", f"{DIGEST}.svg",
        f"{DIGEST}.png.gz", f"{DIGEST}.preview.png", f"{DIGEST[:-1]}.png", f"{DIGEST}0.png",
        f"{DIGEST}.png\x00", f"{DIGEST}.png\n", f"x/{DIGEST}.png", f".{DIGEST}.png",
    ],
)
def test_parse_name_refuses_anything_else(name: str) -> None:
    assert parse_name(name) is None


def test_preview_bounded_and_flattened() -> None:
    raw = _image("PNG", (1000, 500), "RGBA")
    preview, width, height = make_preview(raw, media.PNG)
    assert (width, height) == (1000, 500)
    with Image.open(io.BytesIO(preview)) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 128)


def test_preview_of_small_image_is_not_enlarged() -> None:
    preview, width, height = make_preview(_image("GIF", (20, 10), "P"), media.GIF)
    with Image.open(io.BytesIO(preview)) as im:
        assert im.size == (20, 10) == (width, height)


def test_exif_rotation_reported_as_shown() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    raw = _image("JPEG", (400, 200), exif=exif)
    preview, width, height = make_preview(raw, media.JPEG)
    assert (width, height) == (200, 400)
    with Image.open(io.BytesIO(preview)) as im:
        assert im.size == (128, 256)


def test_pixel_limit_checked_before_decoding() -> None:
    raw = _image("PNG", (2000, 1000), "1")
    with pytest.raises(MediaError) as err:
        make_preview(raw, media.PNG, max_pixels=1_000_000)
    assert err.value.status == 413


def test_pillow_bomb_error_is_413() -> None:
    # past twice Pillow's MAX_IMAGE_PIXELS: Pillow itself raises at open
    raw = _image("PNG", (12_000, 12_000), "1")
    with pytest.raises(MediaError) as err:
        make_preview(raw, media.PNG, max_pixels=10**12)
    assert err.value.status == 413


def test_decompression_bomb_warning_is_an_error() -> None:
    raw = _image("PNG", (8_000, 7_000), "1")  # between the limit and twice it
    with pytest.raises(MediaError) as err:
        make_preview(raw, media.PNG, max_pixels=10**12)
    assert err.value.status == 413


def test_truncated_and_mislabelled_images() -> None:
    raw = _image("JPEG", (300, 300))
    with pytest.raises(MediaError) as err:
        make_preview(raw[:400], media.JPEG)
    assert err.value.status == 400
    with pytest.raises(MediaError) as err:
        make_preview(_image("PNG"), media.JPEG)  # decoders are limited to the sniffed format
    assert err.value.status == 415


def test_store_upload_content_addressed(tmp_path: Path) -> None:
    raw = _image("PNG", (64, 64))
    first = store_upload(raw, tmp_path)
    second = store_upload(raw, tmp_path)
    assert first == second and first.kind is media.PNG and first.size == len(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{first.digest}.png", f"{first.digest}.preview.jpg"])
    assert (tmp_path / f"{first.digest}.png").read_bytes() == raw
    assert first.url == f"/media/{first.digest}.png"
    assert first.pic == f"/media/{first.digest}.preview.jpg"


def test_store_upload_refusals_store_nothing(tmp_path: Path) -> None:
    for raw, status in [(b"", 400), (b"<html>", 415), (_image("BMP"), 415),
                        (_image("PNG")[:60], 400)]:
        with pytest.raises(MediaError) as err:
            store_upload(raw, tmp_path)
        assert err.value.status == status
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_voice_has_no_preview(tmp_path: Path) -> None:
    up = store_upload(b"OggS" + b"\x01" * 50, tmp_path)
    assert (up.kind, up.pic, up.width) == (media.OGG, "", 0)
    assert preview_url_for(up.url, tmp_path) is None


def test_preview_url_for(tmp_path: Path) -> None:
    up = store_upload(_image("JPEG"), tmp_path)
    assert preview_url_for(up.url, tmp_path) == up.pic
    assert preview_url_for(up.pic, tmp_path) is None
    assert preview_url_for(f"/media/{DIGEST}.jpg", tmp_path) is None  # not stored
    assert preview_url_for("https://example.com/media/" + up.url[7:], tmp_path) is None
    assert preview_url_for("/media/../" + up.url[7:], tmp_path) is None
    assert preview_url_for("", tmp_path) is None
