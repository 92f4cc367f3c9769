"""Uploaded resources ("content => url"): sniffing, limits, storage, previews.

An upload is stored content-addressed: its name is the SHA-256 of its bytes
in hex plus an extension chosen by the server from the sniffed type, under
``DATA_DIR/media/``. Nothing the client says (file name, Content-Type) is
trusted. An image also gets a JPEG preview whose longer edge is at most
``PREVIEW_EDGE_PX``, named ``<digest>.preview.jpg``.

Sniffing (``sniff``) and the name rules (``parse_name``) are pure. Decoding
and storing (``store_upload``) is CPU work for a worker thread or process,
never for the event loop: it takes bytes and a folder and returns an
``Upload`` or raises ``MediaError`` with the HTTP status that answers it.

Guards: a size limit (the caller counts bytes while streaming), an image
pixel limit checked from the header before anything is decoded (Pillow's own
``MAX_IMAGE_PIXELS`` check and its ``DecompressionBombWarning`` are both
errors too), decoders restricted to the allowed image formats, and a full
decode of every image so a truncated or damaged one is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Final

from PIL import Image, ImageOps, UnidentifiedImageError

from chatd.errors import ChatdError
from chatd.wire import MEDIA_IMAGE, MEDIA_VIDEO, MEDIA_VOICE

#: default largest upload accepted; bigger bodies get 413 before they are buffered
MAX_UPLOAD_BYTES: Final = 20 * 1024 * 1024
#: largest image (width x height) decoded; bigger ones are refused as bombs
MAX_IMAGE_PIXELS: Final = 50_000_000
#: longer edge of a preview
PREVIEW_EDGE_PX: Final = 256
PREVIEW_QUALITY: Final = 80
#: bytes of the head that ``sniff`` needs
SNIFF_BYTES: Final = 64
#: URL prefix under which uploads are served
URL_PREFIX: Final = "/media/"
PREVIEW_SUFFIX: Final = ".preview.jpg"

# Pillow's own bomb checks use the same limit (it raises past twice the limit
# and warns past it; the warning is an error here)
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)


class MediaError(ChatdError):
    """An upload that is refused; ``status`` is the HTTP status that answers it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Kind:
    """What an upload is, decided from its bytes."""

    ext: str  # file extension the server gives it
    mime: str  # the Content-Type it is served with
    media: int  # the wire's media value (4 image, 3 voice, 8 video)
    pil_format: str = ""  # Pillow format name, for images

    @property
    def is_image(self) -> bool:
        return self.media == MEDIA_IMAGE


JPEG: Final = Kind("jpg", "image/jpeg", MEDIA_IMAGE, "JPEG")
PNG: Final = Kind("png", "image/png", MEDIA_IMAGE, "PNG")
GIF: Final = Kind("gif", "image/gif", MEDIA_IMAGE, "GIF")
WEBP: Final = Kind("webp", "image/webp", MEDIA_IMAGE, "WEBP")
OGG: Final = Kind("ogg", "audio/ogg", MEDIA_VOICE)
MP3: Final = Kind("mp3", "audio/mpeg", MEDIA_VOICE)
AMR: Final = Kind("amr", "audio/amr", MEDIA_VOICE)
AAC: Final = Kind("aac", "audio/aac", MEDIA_VOICE)
M4A: Final = Kind("m4a", "audio/mp4", MEDIA_VOICE)
MP4: Final = Kind("mp4", "video/mp4", MEDIA_VIDEO)
WEBM: Final = Kind("webm", "video/webm", MEDIA_VIDEO)
PREVIEW: Final = Kind("preview.jpg", "image/jpeg", MEDIA_IMAGE, "JPEG")

KINDS: Final = (JPEG, PNG, GIF, WEBP, OGG, MP3, AMR, AAC, M4A, MP4, WEBM)
KIND_BY_EXT: Final = {k.ext: k for k in KINDS}
IMAGE_FORMATS: Final = tuple(k.pil_format for k in KINDS if k.is_image)

_AUDIO_BRANDS: Final = frozenset({b"M4A ", b"M4B ", b"F4A "})
_VIDEO_BRANDS: Final = frozenset(
    {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"M4V ", b"dash",
     b"MSNV", b"qt  "}
)
_EXIF_ORIENTATION: Final = 0x0112
_ORIENTATIONS_SWAPPED: Final = frozenset({5, 6, 7, 8})
_NAME_RE: Final = re.compile(r"([0-9a-f]{64})\.(" + "|".join(re.escape(k.ext) for k in KINDS)
                             + r"|preview\.jpg)")


def sniff(head: bytes) -> Kind | None:
    """The allowed kind that ``head`` (the first bytes of a file) starts as, else None.

    Only magic bytes count; a name or a declared type is never consulted.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head.startswith(b"OggS"):
        return OGG
    if head.startswith((b"#!AMR\n", b"#!AMR-WB\n")):
        return AMR
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        # EBML: WebM only, not any Matroska file
        return WEBM if b"webm" in head[:SNIFF_BYTES] else None
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AUDIO_BRANDS:
            return M4A
        if brand in _VIDEO_BRANDS:
            return MP4
        return None
    if head.startswith(b"ID3"):
        return MP3
    if len(head) >= 2 and head[0] == 0xFF:
        second = head[1]
        if second & 0xF6 == 0xF0:  # ADTS sync word, layer 0: AAC
            return AAC
        if second & 0xE0 == 0xE0 and (second >> 1) & 0x3 == 0x1:  # MPEG audio layer III
            return MP3
    return None


def parse_name(name: str) -> tuple[str, Kind] | None:
    """``(digest, kind)`` for a name the server could have chosen, else None.

    Only ``<64 hex>.<ext>`` and ``<64 hex>.preview.jpg`` are names; anything
    else (separators, dots, other case, other extensions) is not.
    """
    m = _NAME_RE.fullmatch(name)
    if m is None:
        return None
    ext = m.group(2)
    return m.group(1), (PREVIEW if ext == PREVIEW.ext else KIND_BY_EXT[ext])


def preview_url_for(url: str, media_dir: Path) -> str | None:
    """The preview's url for ``url`` when it is a stored image upload that has one.

    ``url`` must be ``/media/<digest>.<ext>`` of an image; the answer is
    ``/media/<digest>.preview.jpg`` if that file exists, else None.
    """
    if not url.startswith(URL_PREFIX):
        return None
    parsed = parse_name(url[len(URL_PREFIX):])
    if parsed is None or parsed[1] is PREVIEW or not parsed[1].is_image:
        return None
    name = parsed[0] + PREVIEW_SUFFIX
    return URL_PREFIX + name if (media_dir / name).is_file() else None


@dataclasses.dataclass(frozen=True)
class Upload:
    """A stored upload, as the API answers it."""

    digest: str
    kind: Kind
    size: int
    width: int = 0
    height: int = 0

    @property
    def url(self) -> str:
        return f"{URL_PREFIX}{self.digest}.{self.kind.ext}"

    @property
    def pic(self) -> str:
        return f"{URL_PREFIX}{self.digest}{PREVIEW_SUFFIX}" if self.kind.is_image else ""


def make_preview(data: bytes, kind: Kind, max_pixels: int = MAX_IMAGE_PIXELS,
                 edge_px: int = PREVIEW_EDGE_PX) -> tuple[bytes, int, int]:
    """Decode image ``data`` of ``kind`` fully; ``(preview JPEG, width, height)``.

    Raises ``MediaError``: 415 if it is not an image of that kind, 413 if it has
    more than ``max_pixels`` pixels, 400 if it is truncated or damaged.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=[kind.pil_format])
        with im:
            width, height = im.size
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise MediaError(413, f"image of {width}x{height} pixels is too large")
            if im.getexif().get(_EXIF_ORIENTATION, 1) in _ORIENTATIONS_SWAPPED:
                width, height = height, width  # as it is shown
            # JPEG can decode at a reduced scale: far less work for a preview
            im.draft("RGB", (edge_px * 2, edge_px * 2))
            im.load()
            frame = ImageOps.exif_transpose(im)
            frame.thumbnail((edge_px, edge_px), Image.Resampling.LANCZOS, reducing_gap=2.0)
            frame = _flatten(frame)
            out = io.BytesIO()
            frame.save(out, "JPEG", quality=PREVIEW_QUALITY, optimize=True)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(413, f"image is too large: {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(415, f"not a valid {kind.pil_format} image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(400, f"image is damaged or truncated: {exc}") from None
    return out.getvalue(), width, height


def _shown_size(data: bytes, kind: Kind) -> tuple[int, int]:
    """Width and height as shown (EXIF rotation applied), from the header only."""
    with Image.open(io.BytesIO(data), formats=[kind.pil_format]) as im:
        width, height = im.size
        if im.getexif().get(_EXIF_ORIENTATION, 1) in _ORIENTATIONS_SWAPPED:
            return height, width
    return width, height


def _flatten(im: Image.Image) -> Image.Image:
    """``im`` as RGB, transparent parts on white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def store_upload(data: bytes, media_dir: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Upload:
    """Sniff, check and store ``data`` under ``media_dir``; the stored ``Upload``.

    Blocking CPU and disk work: run it in an executor. Raises ``MediaError``
    (415 for a type not on the allow-list, see ``make_preview`` for images).
    Storing the same bytes twice gives the same ``Upload`` and one file.
    """
    if not data:
        raise MediaError(400, "the file is empty")
    kind = sniff(data[:SNIFF_BYTES])
    if kind is None:
        raise MediaError(415, "unsupported file type")
    digest = hashlib.sha256(data).hexdigest()
    path = media_dir / f"{digest}.{kind.ext}"
    width = height = 0
    preview = b""
    if kind.is_image:
        if path.is_file() and (media_dir / f"{digest}{PREVIEW_SUFFIX}").is_file():
            # stored and checked before: the header alone gives the size
            width, height = _shown_size(data, kind)
            return Upload(digest, kind, len(data), width, height)
        preview, width, height = make_preview(data, kind, max_pixels)
    media_dir.mkdir(parents=True, exist_ok=True)
    if preview:
        _write_once(media_dir / f"{digest}{PREVIEW_SUFFIX}", preview)
    _write_once(path, data)
    return Upload(digest, kind, len(data), width, height)


def _write_once(path: Path, data: bytes) -> None:
    """Write ``path`` atomically unless it exists (content-addressed: same bytes)."""
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
